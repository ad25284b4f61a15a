"""OpenAI's presence and frequency penalties: logits minus c * frequency + (c > 0) * presence,
c counting the tokens generated so far (not the prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from model import LanguageModel
from model.engine import Engine
from model.generation import Decoder, Finished, GenerationParams, generate, start_decoders, step_decoders
from model.sampling import SamplingParams, apply_count_penalties, sample_rows

LOGITS = np.array([0.0, 0.0, 4.0, 3.5, 1.0, 0.5])


def test_penalties_follow_openais_formula() -> None:
    counts = np.array([0, 0, 3, 1, 0, 0], dtype=float)
    out = apply_count_penalties(LOGITS.copy(), counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, 0.0, 4.0 - 0.75 - 0.5, 3.5 - 0.25 - 0.5, 1.0, 0.5]
    # negative penalties encourage repetition
    assert apply_count_penalties(LOGITS.copy(), counts, -1.0, 0.0)[2] == 5.0


def test_penalties_change_greedy_choice_and_nothing_without_counts() -> None:
    penalised = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    seen = np.zeros(6)
    seen[2] = 1
    assert sample_rows(LOGITS[None, :], [penalised], [0.0], None, [seen]) == [3]
    assert sample_rows(LOGITS[None, :], [penalised], [0.0], None, [np.zeros(6)]) == [2]
    assert sample_rows(LOGITS[None, :], [SamplingParams(temperature=0.0)], [0.0], None, [seen]) == [2]


def test_a_row_is_penalised_the_same_alone_or_in_a_batch() -> None:
    params = [SamplingParams(presence_penalty=1.5), SamplingParams(), SamplingParams(frequency_penalty=-0.5)]
    counts = [np.array([0, 0, 2, 0, 1, 0.0]), None, np.array([0, 0, 0, 0, 3, 0.0])]
    logits = np.stack([LOGITS, LOGITS[::-1], LOGITS])
    u = [0.31, 0.62, 0.93]
    batched = sample_rows(logits, params, u, None, counts)
    alone = [sample_rows(logits[i : i + 1], [params[i]], [u[i]], None, [counts[i]])[0] for i in range(3)]
    assert batched == alone


def test_penalties_are_validated() -> None:
    with pytest.raises(ValueError):
        SamplingParams(presence_penalty=float("nan"))
    assert not SamplingParams().counts_tokens and SamplingParams(frequency_penalty=0.1).counts_tokens


def test_decoder_counts_generated_tokens_only(char_lm: LanguageModel) -> None:
    engine = Engine(char_lm.model)
    prompt = char_lm.tokenizer.encode("ROMEO:\n")
    rows = engine.prefill(prompt, engine.start())
    params = GenerationParams(max_tokens=30, sampling=SamplingParams(temperature=0.0, frequency_penalty=0.7))
    decoder = Decoder(engine, char_lm.tokenizer, rows, params, prompt)
    start_decoders(engine, [decoder])
    generated: list[int] = []
    while decoder.finished is None:
        step_decoders(engine, [decoder])
        generated += [e.id for e in decoder.take_events() if e.id is not None]
    counts = decoder.generated_counts()
    assert counts is not None
    assert counts.tolist() == np.bincount(generated, minlength=char_lm.tokenizer.vocab_size).tolist()


def test_a_strong_frequency_penalty_stops_greedy_repetition(char_lm: LanguageModel) -> None:
    engine = Engine(char_lm.model)
    rows = engine.prefill(char_lm.tokenizer.encode("ROMEO:\n"), engine.start())

    def text(penalty: float) -> str:
        params = GenerationParams(max_tokens=40, sampling=SamplingParams(temperature=0.0, frequency_penalty=penalty))
        done = [x for x in generate(engine, char_lm.tokenizer, rows, params) if isinstance(x, Finished)][0]
        return done.text

    # with 2.0 per use, no character can win more than a few times in 40 greedy steps
    assert max(text(2.0).count(c) for c in set(text(2.0))) < max(text(0.0).count(c) for c in set(text(0.0)))
