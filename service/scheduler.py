"""Continuous batching: one thread steps every active generation in a worker together.

Request threads (gunicorn gthread) prefill their prompt themselves, then hand a model.Decoder
to the scheduler and read its token events from a queue. Each tick the scheduler takes the
decoders that joined, drops the ones whose clients left, stacks their states, runs one batched
engine step and one batched output projection, and lets every decoder sample its own token with
its own seeded generator. A sequence joins or leaves between ticks, so nobody waits on an
unrelated long generation for more than one tick.

Stepping B sequences together costs little more than stepping one (the weights are read once
per tick either way), which is where the aggregate throughput under load comes from.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from model.engine import Engine, stack_states
from model.generation import Decoder, TokenEvent, choose_batch

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Job:
    decoder: Decoder
    events: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False


def run_inline(engine: Engine, decoder: Decoder) -> Iterator[TokenEvent]:
    """Decode one sequence in the calling thread (BATCHING=false)."""
    while decoder.finished is None:
        decoder.advance(engine.step([decoder.next_input()], decoder.state))
        yield from decoder.take_events()
    yield from decoder.take_events()


class BatchScheduler:
    def __init__(self, engine: Engine, max_batch: int = 64):
        self.engine = engine
        self.max_batch = max_batch
        self._waiting: list[_Job] = []
        self._cond = threading.Condition()
        self._stopped = False
        self.ticks = 0
        self.batch_sizes_total = 0  # sum of batch sizes over ticks, for the mean batch size
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()

    def run(self, decoder: Decoder) -> Iterator[TokenEvent]:
        """Token events of `decoder` as the scheduler produces them. Closing the iterator early
        (the client went away) removes the sequence at the next tick."""
        job = _Job(decoder)
        yield from decoder.take_events()
        if decoder.finished is not None:
            return
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batch scheduler has stopped")
            self._waiting.append(job)
            self._cond.notify()
        try:
            while True:
                item = job.events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenEvent)
                yield item
        finally:
            job.cancelled = True

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        active: list[_Job] = []
        while True:
            with self._cond:
                while not active and not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for job in active + self._waiting:
                        job.events.put(RuntimeError("the batch scheduler has stopped"))
                    return
                room = self.max_batch - len(active)
                active.extend(self._waiting[:room])
                del self._waiting[:room]
            active = [job for job in active if not job.cancelled]
            if not active:
                continue
            try:
                active = self._tick(active)
            except Exception as exc:  # a failed tick fails its requests, never the scheduler
                log.exception("batch step failed")
                for job in active:
                    job.events.put(exc)
                active = []

    def _tick(self, active: list[_Job]) -> list[_Job]:
        engine = self.engine
        ids = [job.decoder.next_input() for job in active]
        state = engine.step(ids, stack_states([job.decoder.state for job in active]))
        logits = engine.logits(state)
        self.ticks += 1
        self.batch_sizes_total += len(active)
        still: list[_Job] = []
        rows: list[int] = []
        for row, job in enumerate(active):
            decoder = job.decoder
            try:
                decoder.accept(tuple((h[row : row + 1], c[row : row + 1]) for h, c in state))
            except Exception as exc:
                job.events.put(exc)
                continue
            for event in decoder.take_events():
                job.events.put(event)
            if decoder.finished is None:
                still.append(job)
                rows.append(row)
            else:
                job.events.put(_DONE)
        if still:
            # every continuing sequence samples its next token in one vectorised pass
            choose_batch([job.decoder for job in still], logits.numpy()[rows])
        return still
