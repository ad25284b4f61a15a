"""Continuous batching in a worker, run by the request threads themselves.

Request threads (gunicorn gthread) prefill their prompt, then hand a model.Decoder to the
scheduler and read its token events. There is no scheduler thread: whichever request thread
finds nobody stepping becomes the ticker for one tick, admits the decoders that joined, drops
the ones whose clients left, and advances every active decoder by one token with
model.generation.step_decoders (one engine step for the whole batch). Then it wakes only the
threads that have events due (a stream's first token at once, then what has gathered once its
flush interval has passed, everything at the end) and, if it has events due itself, one other
thread to tick next; with nothing due it simply ticks again.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from model.engine import Engine
from model.generation import Decoder, TokenEvent, start_decoders, step_decoders

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    decoder: Decoder
    wake: threading.Condition  # shares the scheduler's lock: the ticker wakes this job's thread alone
    flush_interval: float  # seconds between deliveries after the first; 0: every tick; inf: at the end
    events: list[TokenEvent] = field(default_factory=list)
    # set by the ticker under the lock together with the last events (the decoder's own
    # `finished` is set mid-tick, before its last events are handed over)
    ended: bool = False
    error: BaseException | None = None
    cancelled: bool = False
    waiting: bool = False  # its thread sleeps on `wake`
    delivered_at: float | None = None  # when its thread last took events (None: never yet)

    @property
    def done(self) -> bool:
        return self.ended or self.error is not None

    def due(self, now: float) -> bool:
        """Whether its thread should wake now: the end, an error, its first events (at once, so
        the first token is not delayed), or events held for at least the flush interval."""
        if self.done:
            return True
        return bool(self.events) and _flush_due(self.delivered_at, self.flush_interval, now)


def _flush_due(delivered_at: float | None, interval: float, now: float) -> bool:
    """Events waiting are due when none were delivered yet (the first token never waits) or the
    interval has passed since the last delivery."""
    return delivered_at is None or now - delivered_at >= interval


def run_inline(engine: Engine, decoder: Decoder, flush_interval: float = 0.0) -> Iterator[list[TokenEvent]]:
    """Decode one sequence in the calling thread, a batch of one (BATCHING=false); events are
    delivered as BatchScheduler.run delivers them."""
    batch: list[Decoder] = [decoder]
    rows: np.ndarray | None = None
    start_decoders(engine, batch)
    held: list[TokenEvent] = []
    delivered_at: float | None = None
    while decoder.finished is None:
        rows = step_decoders(engine, batch, rows)
        held += decoder.take_events()
        if held and _flush_due(delivered_at, flush_interval, time.monotonic()):
            yield held
            held, delivered_at = [], time.monotonic()
    yield held + decoder.take_events()


class BatchScheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 64,
        on_tick: Callable[[int], None] | None = None,
        flush_interval: float = 0.0,
    ):
        """`flush_interval`: how long a stream's events may be held to be delivered together
        (its first events never wait). Each delivery wakes the request's thread and writes to
        its socket; at 16 streams a worker ticks every ~1 ms, so delivering every tick spent more
        time waking threads than stepping the model."""
        self.engine = engine
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self._on_tick = on_tick  # called with the batch size of every tick (metrics)
        self._lock = threading.Lock()
        self._joining: list[_Job] = []
        self._active: list[_Job] = []
        self._rows: np.ndarray | None = None  # rows of _active, in order, while still current
        self._ticking = False
        self.ticks = 0
        self.batch_sizes_total = 0  # sum of batch sizes over ticks, for the mean batch size

    def run(self, decoder: Decoder, flush_interval: float | None = None) -> Iterator[list[TokenEvent]]:
        """Token events of `decoder` in lists: the first as soon as it exists, then whatever has
        arrived once `flush_interval` (default: the scheduler's) has passed since the caller last
        took some, and the rest at the end (math.inf: everything at the end, for a caller that
        only wants the result). A consumer slower than that gets fewer, larger lists. Closing the
        iterator early (the client went away) removes the sequence at the next tick."""
        if decoder.finished is not None:
            yield decoder.take_events()
            return
        interval = self.flush_interval if flush_interval is None else flush_interval
        job = _Job(decoder, threading.Condition(self._lock), interval)
        with self._lock:
            self._joining.append(job)
        try:
            while True:
                lead = False
                with self._lock:
                    while not job.due(time.monotonic()):
                        if not self._ticking:  # nobody steps the batch: this thread does, for a tick
                            self._ticking = lead = True
                            break
                        job.waiting = True
                        job.wake.wait()
                        job.waiting = False
                    if not lead:
                        events, job.events = job.events, []
                        job.delivered_at = time.monotonic()
                if lead:
                    stepped: list[_Job] = []
                    try:
                        stepped = self._tick()
                    finally:
                        self._hand_over(job, stepped)
                    continue
                if events:
                    yield events
                if job.error is not None:
                    raise job.error
                if job.ended and not job.events:
                    return
        finally:
            job.cancelled = True

    def _hand_over(self, leader: _Job, stepped: list[_Job]) -> None:
        """After a tick: wake the threads with events due, and if the leader is about to leave to
        deliver its own, one sleeping thread to run the next tick (a leader with nothing due
        simply ticks again)."""
        now = time.monotonic()
        with self._lock:
            self._ticking = False
            for job in stepped:  # those that finished in the tick have left _active
                if job.waiting and job.due(now):
                    job.wake.notify()
            if leader.due(now):
                successor = next((j for j in self._active + self._joining if j.waiting and not j.due(now)), None)
                if successor is not None:
                    successor.wake.notify()

    def _tick(self) -> list[_Job]:
        """One step of every active sequence (the calling thread holds the ticker role); returns
        the jobs it stepped."""
        with self._lock:
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
            return []
        decoders = [job.decoder for job in active]
        try:
            if joined:
                start_decoders(self.engine, decoders)
            rows = step_decoders(self.engine, decoders, self._rows)
        except Exception as exc:  # a failed tick fails its requests, never the worker
            log.exception("batch step failed")
            with self._lock:
                for job in active:
                    job.error = exc
            self._active, self._rows = [], None
            return active
        self.ticks += 1
        self.batch_sizes_total += len(active)
        if self._on_tick is not None:
            self._on_tick(len(active))
        still = [job for job in active if job.decoder.finished is None]
        with self._lock:
            for job in active:
                job.events.extend(job.decoder.take_events())
                job.ended = job.decoder.finished is not None
        self._active = still
        self._rows = rows if len(still) == len(active) else None
        return active
