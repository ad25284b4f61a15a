"""Continuous batching in a worker, run by the request threads themselves.

Request threads (gunicorn gthread) prefill their prompt, then hand a model.Decoder to the
scheduler and read its token events. There is no scheduler thread: whichever request thread
finds nobody stepping becomes the ticker for one tick, admits the decoders that joined, drops
the ones whose clients left, and advances every active decoder by one token with
model.generation.step_decoders (one engine step for the whole batch). Then it hands the events
out and goes back to being a request thread; the next tick is run by whichever thread is free
first.

Why no dedicated thread: alone, a request decodes in its own thread with no hand-off per token
(a thread switch per token cost ~30% of batch-1 speed); under load, the ticks are run by
threads that would otherwise wait, and while one thread steps, the others write their events to
their sockets. A thread whose client reads slowly does not hold anyone up: the others tick.

Stepping B sequences together costs little more than stepping one (the weights are read once
per tick either way), which is where the aggregate throughput under load comes from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from model.engine import Engine
from model.generation import Decoder, TokenEvent, start_decoders, step_decoders

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    decoder: Decoder
    events: list[TokenEvent] = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.decoder.finished is not None or self.error is not None


def run_inline(engine: Engine, decoder: Decoder) -> Iterator[list[TokenEvent]]:
    """Decode one sequence in the calling thread, a batch of one (BATCHING=false)."""
    batch: list[Decoder] = [decoder]
    rows: np.ndarray | None = None
    start_decoders(engine, batch)
    while decoder.finished is None:
        rows = step_decoders(engine, batch, rows)
        yield decoder.take_events()
    yield decoder.take_events()


class BatchScheduler:
    def __init__(self, engine: Engine, max_batch: int = 64, on_tick: Callable[[int], None] | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self._on_tick = on_tick  # called with the batch size of every tick (metrics)
        self._cond = threading.Condition()
        self._joining: list[_Job] = []
        self._active: list[_Job] = []
        self._rows: np.ndarray | None = None  # rows of _active, in order, while still current
        self._ticking = False
        self.ticks = 0
        self.batch_sizes_total = 0  # sum of batch sizes over ticks, for the mean batch size

    def run(self, decoder: Decoder) -> Iterator[list[TokenEvent]]:
        """Token events of `decoder` in lists of whatever has arrived since the caller last asked
        (one token when the caller keeps up; more when it is slower than the ticks, so a slow
        consumer writes fewer, larger chunks). Closing the iterator early (the client went away)
        removes the sequence at the next tick."""
        if decoder.finished is not None:
            yield decoder.take_events()
            return
        job = _Job(decoder)
        cond = self._cond
        with cond:
            self._joining.append(job)
        try:
            while True:
                lead = False
                with cond:
                    while not job.events and not job.done:
                        if not self._ticking:
                            self._ticking = lead = True
                            break
                        cond.wait()
                    events, job.events = job.events, []
                if lead:
                    try:
                        self._tick()
                    finally:
                        with cond:
                            self._ticking = False
                            cond.notify_all()
                    continue
                if events:
                    yield events
                if job.error is not None:
                    raise job.error
                if job.decoder.finished is not None and not job.events:
                    return
        finally:
            job.cancelled = True

    def _tick(self) -> None:
        """One step of every active sequence (the calling thread holds the ticker role)."""
        with self._cond:
            if self._joining:
                room = self.max_batch - len(self._active)
                joined, self._joining = self._joining[:room], self._joining[room:]
            else:
                joined = []
        active = self._active
        if joined or any(job.cancelled for job in active):
            active = [job for job in active if not job.cancelled] + [job for job in joined if not job.cancelled]
            self._rows = None
        if not active:
            self._active = []
            return
        decoders = [job.decoder for job in active]
        try:
            if joined:
                start_decoders(self.engine, decoders)
            rows = step_decoders(self.engine, decoders, self._rows)
        except Exception as exc:  # a failed tick fails its requests, never the worker
            log.exception("batch step failed")
            with self._cond:
                for job in active:
                    job.error = exc
            self._active, self._rows = [], None
            return
        self.ticks += 1
        self.batch_sizes_total += len(active)
        if self._on_tick is not None:
            self._on_tick(len(active))
        still = [job for job in active if job.decoder.finished is None]
        with self._cond:
            for job in active:
                job.events.extend(job.decoder.take_events())
        self._active = still
        self._rows = rows if len(still) == len(active) else None
