"""A worker's budget of concurrent prefill and scoring work, so no burst of costly inputs can
exhaust its CPU or memory.

Reading a text (a prompt, a session's priming text, a text to score) is the work that grows with
the input and is not shared between requests: every request asks for its cost (the input's
characters, which bound its tokens) before reading and gives it back when done. While the budget
is spent, requests wait in a bounded queue for a bounded time; a full queue or a wait that runs
out is a 503 with Retry-After at once, never an unbounded pile-up of work or memory. A single
input costlier than the whole budget is admitted alone. (Decoding is bounded elsewhere: the
scheduler steps at most MAX_BATCH sequences per tick, each request holds one of the worker's
threads, and GENERATION_TIMEOUT_SECONDS caps a generation's wall time.)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .errors import ApiError


def overloaded(reason: str, retry_after: int = 1) -> ApiError:
    return ApiError(
        503,
        "overloaded",
        f"this worker is busy ({reason}); retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


@dataclass
class Ticket:
    """An admitted request's share of the budget; release() is idempotent."""

    admission: Admission
    cost: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._give_back(self.cost)


class Admission:
    def __init__(self, budget: int, queue: int, wait_seconds: float):
        self.budget = budget
        self.queue = queue
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def admit(self, cost: int) -> Ticket:
        """Take `cost` from the budget, waiting if needed; raises ApiError 503 when it cannot."""
        cost = max(0, min(cost, self.budget))
        with self._cond:
            if self.in_use + cost <= self.budget and not self.waiting:
                self.in_use += cost
                return Ticket(self, cost)
            if self.waiting >= self.queue:
                raise overloaded(f"{self.waiting} requests already waiting")
            self.waiting += 1
            deadline = time.monotonic() + self.wait_seconds
            try:
                while self.in_use + cost > self.budget:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise overloaded(f"no room within {self.wait_seconds:g} s")
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
            self.in_use += cost
            return Ticket(self, cost)

    def _give_back(self, cost: int) -> None:
        with self._cond:
            self.in_use -= cost
            self._cond.notify_all()
