from __future__ import annotations

import numpy as np
import pytest

from model import LanguageModel
from model.engine import Engine
from model.generation import Finished, GenerationParams, TokenEvent, generate
from model.sampling import SamplingParams


def run(lm: LanguageModel, prompt: str, **kw: object) -> tuple[list[TokenEvent], Finished, Engine]:
    engine = Engine(lm.model)
    ids = lm.tokenizer.encode(prompt)
    state = engine.prefill(ids, engine.start())
    items = list(generate(engine, lm.tokenizer, state, GenerationParams(**kw), ids))  # type: ignore[arg-type]
    finished = items[-1]
    assert isinstance(finished, Finished)
    return [e for e in items[:-1] if isinstance(e, TokenEvent)], finished, engine


def test_max_tokens_and_events_concatenate(any_lm: LanguageModel) -> None:
    events, fin, _ = run(any_lm, "ROMEO:\n", max_tokens=40, seed=1)
    assert fin.finish_reason == "length"
    assert fin.completion_tokens == 40 == len(events)
    assert "".join(e.text for e in events) == fin.text
    assert all(e.id not in (0, 1) for e in events)


def test_seed_reproduces(any_lm: LanguageModel) -> None:
    a = run(any_lm, "KING", max_tokens=30, seed=5)[1].text
    b = run(any_lm, "KING", max_tokens=30, seed=5)[1].text
    c = run(any_lm, "KING", max_tokens=30, seed=6)[1].text
    assert a == b and a != c


def test_greedy_is_argmax_chain(char_lm: LanguageModel) -> None:
    _, fin, engine = run(char_lm, "The ", max_tokens=15, sampling=SamplingParams(temperature=0))
    state = engine.prefill(char_lm.tokenizer.encode("The "), engine.start())
    out = []
    for _ in range(15):
        logits = engine.logits(state)[0]
        logits[:2] = -np.inf
        token = int(np.argmax(logits))
        out.append(token)
        state = engine.step(np.array([token]), state)
    assert fin.text == char_lm.tokenizer.decode(out)


def test_stop_string_excluded_from_text_and_state(char_lm: LanguageModel) -> None:
    # find a stop string the sample really produces: the 3 characters at offset 10 of a free run
    free = run(char_lm, "First", max_tokens=40, seed=11)[1].text
    stop = free[10:13]
    events, fin, engine = run(char_lm, "First", max_tokens=40, seed=11, stop=(stop,))
    assert fin.finish_reason == "stop"
    assert fin.text == free[: free.index(stop)]
    assert stop not in fin.text
    assert "".join(e.text for e in events) == fin.text
    assert fin.completion_tokens == len(fin.text)
    state = engine.prefill(char_lm.tokenizer.encode("First" + fin.text), engine.start())
    assert np.abs(engine.log_probs(state) - engine.log_probs(fin.rows)).max() <= 1e-4


def test_stop_string_cutting_a_subword(sp_lm: LanguageModel) -> None:
    free = run(sp_lm, "First", max_tokens=30, seed=3)[1].text
    # a stop that starts in the middle of the text (likely inside a piece)
    stop = free[7:9]
    events, fin, engine = run(sp_lm, "First", max_tokens=30, seed=3, stop=(stop,))
    assert fin.finish_reason == "stop"
    assert fin.text == free[: free.index(stop)]
    assert "".join(e.text for e in events) == fin.text
    # the state equals the state after the kept tokens plus the re-encoded cut piece
    kept = [e.id for e in events if e.id is not None]
    partial = "".join(e.text for e in events if e.id is None)
    ids = sp_lm.tokenizer.encode("First") + kept + sp_lm.tokenizer.encode(partial)
    state = engine.prefill(ids, engine.start())
    assert np.abs(engine.log_probs(state) - engine.log_probs(fin.rows)).max() <= 1e-4
    assert fin.completion_tokens == len(kept) + len(sp_lm.tokenizer.encode(partial))


def test_held_back_text_is_released_at_length(char_lm: LanguageModel) -> None:
    free = run(char_lm, "A", max_tokens=12, seed=9)[1].text
    # a stop string whose first characters match the end of the text but never completes
    stop = free[-2:] + "\x00never"
    events, fin, _ = run(char_lm, "A", max_tokens=12, seed=9, stop=(stop,))
    assert fin.finish_reason == "length" and fin.text == free
    assert "".join(e.text for e in events) == free


def test_logprobs(char_lm: LanguageModel) -> None:
    events, _, _ = run(char_lm, "A", max_tokens=5, seed=1, logprobs=3)
    for e in events:
        assert e.logprob is not None and e.logprob <= 0
        assert e.top is not None and len(e.top) == 3
        assert e.top[0][1] >= e.top[1][1] >= e.top[2][1]


def test_zero_max_tokens(char_lm: LanguageModel) -> None:
    events, fin, _ = run(char_lm, "A", max_tokens=0)
    assert events == [] and fin.text == "" and fin.completion_tokens == 0


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError):
        GenerationParams(stop=("",))


class CountingEngine(Engine):
    """The real engine, counting the rows it steps in decoding."""

    stepped = 0

    def step(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self.stepped += len(ids)
        return super().step(ids, rows)


@pytest.mark.parametrize("max_tokens", [1, 12])
def test_without_a_state_to_keep_the_last_token_is_not_stepped(char_lm: LanguageModel, max_tokens: int) -> None:
    """keep_state=False (a request with no session): the same text, usage and events, one engine
    step fewer; with a stop string the last step stays (a cut may need the state)."""
    results = {}
    for keep, stop in [(True, ()), (False, ()), (False, ("zzz",))]:
        engine = CountingEngine(char_lm.model)
        params = GenerationParams(max_tokens=max_tokens, seed=3, keep_state=keep, stop=stop)
        items = list(generate(engine, char_lm.tokenizer, engine.prefill([5, 6], engine.start()), params))
        fin = items[-1]
        assert isinstance(fin, Finished)
        results[keep, stop] = (engine.stepped, fin.text, fin.completion_tokens, len(items))
    kept, unkept, with_stop = results[True, ()], results[False, ()], results[False, ("zzz",)]
    assert kept[0] == max_tokens and unkept[0] == max_tokens - 1  # decode steps (prefill is not counted)
    assert kept[1:] == unkept[1:] == with_stop[1:]
    assert with_stop[0] == kept[0]
