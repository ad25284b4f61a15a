"""The decode loop tick by tick, on the real tiny model and without threads: step_decoders (the one
step every caller uses) and the scheduler's ticks, driven by interleaving its generators."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from model import LanguageModel
from model.engine import Engine
from model.generation import Decoder, Finished, GenerationParams, generate, start_decoders, step_decoders
from model.sampling import SamplingParams
from service.scheduler import BatchScheduler, run_inline


def _decoder(engine: Engine, lm: LanguageModel, prompt: str, **kw: object) -> Decoder:
    ids = lm.tokenizer.encode(prompt)
    return Decoder(engine, lm.tokenizer, engine.prefill(ids, engine.start()), GenerationParams(**kw), ids)  # type: ignore[arg-type]


def _alone(engine: Engine, lm: LanguageModel, prompt: str, **kw: object) -> Finished:
    ids = lm.tokenizer.encode(prompt)
    *_, last = generate(engine, lm.tokenizer, engine.prefill(ids, engine.start()), GenerationParams(**kw), ids)  # type: ignore[arg-type]
    assert isinstance(last, Finished)
    return last


SPECS = [
    ("KING:", dict(max_tokens=25, seed=1)),
    ("A", dict(max_tokens=7, seed=2, sampling=SamplingParams(temperature=0.7, top_k=5))),  # finishes early
    ("To be", dict(max_tokens=25, seed=3, sampling=SamplingParams(temperature=0.0))),
    ("First", dict(max_tokens=25, seed=4, stop=("e ",), sampling=SamplingParams(top_p=0.9))),
]


def test_a_decoder_starts_only_when_told(char_lm: LanguageModel) -> None:
    engine = Engine(char_lm.model)
    d = _decoder(engine, char_lm, "A", max_tokens=3, seed=1)
    assert not d.started
    with pytest.raises(RuntimeError, match="not started"):
        d.next_input()
    start_decoders(engine, [d])
    assert d.started and 2 <= d.next_input() < char_lm.tokenizer.vocab_size


def test_step_decoders_batch_equals_each_alone(char_lm: LanguageModel) -> None:
    """Four requests stepped together tick by tick (joining at different ticks, one finishing
    early, one stopping on a stop string) give exactly what each gives alone."""
    engine = Engine(char_lm.model)
    expected = [_alone(engine, char_lm, prompt, **kw) for prompt, kw in SPECS]
    decoders = [_decoder(engine, char_lm, prompt, **kw) for prompt, kw in SPECS]
    active: list[Decoder] = []
    rows = None
    sizes = []
    for tick in range(200):
        joining = [d for d in decoders[: tick + 1] if not d.started]  # one more joins each tick
        if joining:
            start_decoders(engine, joining)
            active += joining
            rows = None  # membership changed: gather the rows again
        if not active:
            break
        rows = step_decoders(engine, active, rows)
        for i, d in enumerate(active):
            assert np.shares_memory(d.row, rows) or d.finished is not None  # a view of the step's output
            assert i < len(rows)
        sizes.append(len(active))
        still = [d for d in active if d.finished is None]
        if len(still) != len(active):
            active, rows = still, None
    assert max(sizes) == 4  # they really were stepped together
    for d, want in zip(decoders, expected):
        assert d.finished is not None
        assert (d.finished.text, d.finished.finish_reason) == (want.text, want.finish_reason)
        assert d.finished.completion_tokens == want.completion_tokens
        # BLAS sums a batch's rows in another order than a single row's: the text is the same,
        # the state agrees to float32 rounding
        assert np.allclose(d.finished.rows, want.rows, rtol=0, atol=1e-5)


def test_scheduler_ticks_without_threads(char_lm: LanguageModel) -> None:
    """The scheduler has no thread: whoever asks for events runs the tick. Two generators pulled in
    turn by one thread share ticks; closing one drops it at the next tick."""
    engine = Engine(char_lm.model)
    sizes: list[int] = []
    scheduler = BatchScheduler(engine, max_batch=8, on_tick=sizes.append)
    a = scheduler.run(_decoder(engine, char_lm, "KING:", max_tokens=40, seed=1))
    b = scheduler.run(_decoder(engine, char_lm, "A", max_tokens=40, seed=2))
    got_a = next(a)  # a alone: the first tick is a batch of one
    assert sizes == [1] and len(got_a) == 1
    got_b = next(b)  # b joins; its tick steps both
    assert sizes == [1, 2] and len(got_b) == 1
    got_a += next(a)  # a has one event waiting from b's tick: no tick needed
    assert sizes == [1, 2]
    for _ in range(5):
        got_a += next(a)
        next(b)
    assert set(sizes[1:]) == {2}
    b.close()  # b's client went away
    got_a += next(a)
    got_a += next(a)
    assert sizes[-1] == 1  # b is no longer stepped
    got_a += [e for chunk in a for e in chunk]
    assert len(got_a) == 40  # a got every token, once
    assert scheduler.ticks == len(sizes) and scheduler.batch_sizes_total == sum(sizes)


def test_scheduler_output_equals_generate(char_lm: LanguageModel) -> None:
    engine = Engine(char_lm.model)
    scheduler = BatchScheduler(engine, max_batch=2)  # fewer rows than requests: some wait their turn
    runs = [scheduler.run(_decoder(engine, char_lm, prompt, **kw)) for prompt, kw in SPECS]
    texts = ["" for _ in runs]
    live = list(range(len(runs)))
    while live:
        for i in list(live):
            try:
                texts[i] += "".join(e.text for e in next(runs[i]))
            except StopIteration:
                live.remove(i)
    assert texts == [_alone(engine, char_lm, prompt, **kw).text for prompt, kw in SPECS]


def test_a_stream_gets_its_first_token_at_once_and_the_rest_per_flush_interval(char_lm: LanguageModel) -> None:
    """With a flush interval longer than the whole generation, a consumer wakes exactly twice:
    for its first token (never held back) and at the end, with every other token in one list."""
    engine = Engine(char_lm.model)
    want = _alone(engine, char_lm, "KING:", max_tokens=30, seed=5)
    scheduler = BatchScheduler(engine, max_batch=8, flush_interval=60.0)
    chunks = list(scheduler.run(_decoder(engine, char_lm, "KING:", max_tokens=30, seed=5)))
    assert [len(c) for c in chunks] == [1, 29]
    assert "".join(e.text for c in chunks for e in c) == want.text
    inline = list(run_inline(engine, _decoder(engine, char_lm, "KING:", max_tokens=30, seed=5), 60.0))
    assert [len(c) for c in inline] == [1, 29]  # the unbatched path delivers the same way


PROMPTS = [("KING:", 11), ("A", 12), ("To be", 13), ("First", 14), ("O", 15), ("My lord", 16), ("So", 17), ("We", 18)]


@pytest.mark.parametrize("interval", [60.0, 0.0])
def test_threads_sleep_until_their_events_are_due(char_lm: LanguageModel, interval: float) -> None:
    """Eight request threads share one scheduler with a long flush interval: each is woken only for
    its first events and its end (the ticker wakes no one else), all finish, none is starved of a
    ticker, and each text equals the sequence decoded alone; the same with a zero interval."""
    engine = Engine(char_lm.model)
    want = [_alone(engine, char_lm, p, max_tokens=20 + i, seed=s).text for i, (p, s) in enumerate(PROMPTS)]
    sizes: list[int] = []

    def on_tick(size: int) -> None:
        if not sizes:
            time.sleep(0.3)  # the first tick waits: every thread has joined by the second
        sizes.append(size)

    scheduler = BatchScheduler(engine, max_batch=8, on_tick=on_tick, flush_interval=interval)
    got: list[list[list[str]]] = [[] for _ in PROMPTS]

    def consume(i: int, prompt: str, seed: int) -> None:
        for chunk in scheduler.run(_decoder(engine, char_lm, prompt, max_tokens=20 + i, seed=seed)):
            got[i].append([e.text for e in chunk])

    threads = [threading.Thread(target=consume, args=(i, p, s), daemon=True) for i, (p, s) in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a consumer never woke"
    assert ["".join(t for c in chunks for t in c) for chunks in got] == want
    assert max(sizes) == 8  # they were stepped together
    if interval:
        # woken for the first events (more if other ticks ran before it woke) and for the end
        assert all(len(chunks) <= 2 for chunks in got), [[len(c) for c in chunks] for chunks in got]
