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

import numpy as np

from model.engine import Engine
from model.generation import Decoder, TokenEvent, choose_batch

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Job:
    decoder: Decoder
    events: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False


def run_inline(engine: Engine, decoder: Decoder) -> Iterator[list[TokenEvent]]:
    """Decode one sequence in the calling thread (BATCHING=false); yields each step's events."""
    while decoder.finished is None:
        token = np.array([decoder.next_input()])
        decoder.advance(engine.step_rows(token, decoder.row[None])[0])
        yield decoder.take_events()
    yield decoder.take_events()


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

    def run(self, decoder: Decoder) -> Iterator[list[TokenEvent]]:
        """Token events of `decoder` as the scheduler produces them, in lists of whatever has
        arrived since the caller last asked (usually one token; more when the caller is slower
        than the ticks, so a slow consumer writes fewer, larger chunks). Closing the iterator
        early (the client went away) removes the sequence at the next tick."""
        job = _Job(decoder)
        first = decoder.take_events()
        if first:
            yield first
        if decoder.finished is not None:
            return
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batch scheduler has stopped")
            self._waiting.append(job)
            self._cond.notify()
        try:
            done = False
            while not done:
                items = [job.events.get()]
                while True:  # drain what else is there without waiting
                    try:
                        items.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                chunk: list[TokenEvent] = []
                for item in items:
                    if item is _DONE:
                        done = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        chunk.extend(item)  # type: ignore[arg-type]
                if chunk:
                    yield chunk
        finally:
            job.cancelled = True

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        active: list[_Job] = []
        rows: np.ndarray | None = None  # state rows of `active`, in order, when still current
        while True:
            with self._cond:
                while not active and not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for job in active + self._waiting:
                        job.events.put(RuntimeError("the batch scheduler has stopped"))
                    return
                room = self.max_batch - len(active)
                if self._waiting and room > 0:
                    active.extend(self._waiting[:room])
                    del self._waiting[:room]
                    rows = None
            if any(job.cancelled for job in active):
                active = [job for job in active if not job.cancelled]
                rows = None
            if not active:
                continue
            try:
                active, rows = self._tick(active, rows)
            except Exception as exc:  # a failed tick fails its requests, never the scheduler
                log.exception("batch step failed")
                for job in active:
                    job.events.put(exc)
                active, rows = [], None

    def _tick(self, active: list[_Job], rows: np.ndarray | None) -> tuple[list[_Job], np.ndarray | None]:
        """One step of every active sequence; returns those still going and their new rows
        (None when the membership changed and the rows must be gathered again)."""
        engine = self.engine
        if rows is None:
            rows = np.stack([job.decoder.row for job in active])
        ids = np.fromiter((job.decoder.next_input() for job in active), dtype=np.int64, count=len(active))
        rows = engine.step_rows(ids, rows)
        logits = engine.logits_rows(rows)
        self.ticks += 1
        self.batch_sizes_total += len(active)
        still: list[_Job] = []
        keep: list[int] = []
        for index, job in enumerate(active):
            decoder = job.decoder
            try:
                decoder.accept(rows[index])  # a view: free
            except Exception as exc:
                job.events.put(exc)
                continue
            events = decoder.take_events()
            if events:
                job.events.put(events)
            if decoder.finished is None:
                still.append(job)
                keep.append(index)
            else:
                job.events.put(_DONE)
        if still:
            # every continuing sequence samples its next token in one vectorised pass
            choose_batch([job.decoder for job in still], logits[keep] if len(keep) < len(active) else logits)
        return still, (rows if len(still) == len(active) else None)
