"""A prefix cache: the model's state after the beginnings of prompts, so re-sent history is free.

OpenAI clients re-send the whole conversation every turn. An LSTM's state after a text is a few
KB whatever the text's length, so the service keeps the state at each *boundary* of a prompt
(after each rendered chat message; after a whole completion prompt) in the session store, under
a hash of the token ids before it (sha256 of their int32 bytes, in the model's namespace: the
key carries the fingerprint). A request looks up all its boundaries in one round trip, starts
from the longest one found, and prefills only the rest.

Exactness: a prompt is always prefilled the same way, one segment (message) at a time from one
boundary to the next, whether or not the cache holds anything. A cached state is therefore the
very rows the same computation would produce: a hit changes how long a request takes, never its
output (bit-identical rows, the same seeded text).

The cache is an optimisation. A store that fails is logged and counted, the request prefills
everything, and the cache rests for a few seconds so an outage does not add a timeout to every
request. Entries expire after the session TTL like everything else in the store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from model.engine import Engine

from . import metrics
from .sessions import SessionStore, StoreUnavailable
from .state_codec import SessionState, StateDecodeError, decode_state, encode_state

log = logging.getLogger(__name__)

MAX_BOUNDARIES = 64  # boundaries looked up and stored per request (the most recent ones)
PAUSE_SECONDS = 5.0  # after a store failure, how long requests skip the cache


def digest(ids: Sequence[int]) -> str:
    """The cache key of a token sequence (the whole sequence from <s>)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def boundary_digests(segments: Sequence[Sequence[int]]) -> list[str]:
    """digest(segments[0] + ... + segments[i]) for every i, hashing each token once."""
    hasher = hashlib.sha256()
    out = []
    for segment in segments:
        hasher.update(np.asarray(segment, dtype="<i4").tobytes())
        out.append(hasher.copy().hexdigest())
    return out


@dataclass
class Plan:
    """A prompt cut into segments, and where reading it starts: the longest cached boundary."""

    segments: Sequence[list[int]]
    cacheable: int  # boundaries after segments[:cacheable] are cached (the rest, e.g. a reply's heading, not)
    digests: list[str]  # digest of each cacheable boundary
    ends: list[int]  # ends[i]: tokens before segment i (ends[-1]: all of them)
    start: int  # the boundary found (after segments[start]), or -1: read from <s>
    rows: np.ndarray  # (1, S) at that boundary

    @property
    def cached_tokens(self) -> int:
        return self.ends[self.start + 1]

    @property
    def uncached_tokens(self) -> int:
        return self.ends[-1] - self.cached_tokens


@dataclass
class Prefilled:
    """A prompt read from <s>: the state after it, and what the cache contributed."""

    rows: np.ndarray  # (1, S) after every segment
    ids: list[int]  # every token of the prompt
    cached_tokens: int  # tokens of the longest cached boundary the prefill started from
    boundary_rows: np.ndarray  # (1, S) at the last cacheable boundary
    boundary_tokens: int  # tokens up to that boundary


class PrefixCache:
    def __init__(
        self,
        store: SessionStore,
        engine: Engine,
        fingerprint: str,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.engine = engine
        self.fingerprint = fingerprint
        self.enabled = enabled
        self._clock = clock
        self._paused_until = 0.0

    @property
    def active(self) -> bool:
        return self.enabled and self._clock() >= self._paused_until

    def _failed(self, action: str, exc: Exception) -> None:
        metrics.STORE_ERRORS.labels("unavailable").inc()
        log.warning("prefix cache %s failed, prefilling without it for %.0f s: %s", action, PAUSE_SECONDS, exc)
        self._paused_until = self._clock() + PAUSE_SECONDS

    def lookup(self, segments: Sequence[list[int]], cacheable: int) -> Plan:
        """Find the longest cached boundary among those after each of the first `cacheable`
        segments (the most recent MAX_BOUNDARIES, in one round trip)."""
        ends = np.cumsum([0, *(len(s) for s in segments)]).tolist()
        digests = boundary_digests(segments[:cacheable])
        plan = Plan(segments, cacheable, digests, ends, -1, self.engine.start())
        probe = list(range(max(0, cacheable - MAX_BOUNDARIES), cacheable))  # boundary i: after segment i
        if probe and self.active:
            hit = self._lookup([digests[i] for i in probe], [ends[i + 1] for i in probe], probe)
            if hit is not None:
                plan.start, plan.rows = hit
        elif probe:
            metrics.PREFIX_LOOKUPS.labels("skipped").inc()
        return plan

    def prefill(self, plan: Plan) -> Prefilled:
        """Read the segments after the boundary found, one at a time, and store the boundaries
        that were not cached (touching the one that was)."""
        rows = boundary_rows = plan.rows
        fresh: dict[str, bytes] = {}
        for i in range(plan.start + 1, len(plan.segments)):
            rows = self.engine.prefill(plan.segments[i], rows)
            if i < plan.cacheable:
                boundary_rows = rows
                if i >= plan.cacheable - MAX_BOUNDARIES:
                    fresh[plan.digests[i]] = self._blob(rows, plan.ends[i + 1])
        if self.active and (fresh or plan.start >= 0):
            self._put(fresh, [plan.digests[plan.start]] if plan.start >= 0 else [])
        ids = [t for s in plan.segments for t in s]
        return Prefilled(rows, ids, plan.cached_tokens, boundary_rows, plan.ends[plan.cacheable])

    def extend(self, prefilled: Prefilled, segment: list[int]) -> None:
        """Store the boundary after one more segment read from the last cacheable boundary: the
        state a client's next request starts from when it sends this turn's reply back."""
        if not self.active:
            return
        ids = prefilled.ids[: prefilled.boundary_tokens] + list(segment)
        rows = self.engine.prefill(segment, prefilled.boundary_rows)
        self._put({digest(ids): self._blob(rows, len(ids))}, [])

    # ---- store access, never failing a request ---------------------------------------------

    def _lookup(self, keys: list[str], tokens: list[int], boundaries: list[int]) -> tuple[int, np.ndarray] | None:
        """(index of the longest boundary found, its rows), or None."""
        try:
            blobs = self.store.get_prefixes(keys)
        except StoreUnavailable as exc:
            metrics.PREFIX_LOOKUPS.labels("error").inc()
            self._failed("lookup", exc)
            return None
        for blob, n, boundary in reversed(list(zip(blobs, tokens, boundaries))):
            if blob is None:
                continue
            try:
                saved = decode_state(blob, self.fingerprint, self.engine.state_size)
            except StateDecodeError as exc:
                metrics.STORE_ERRORS.labels("corrupt_state").inc()
                log.error("prefix cache entry cannot be decoded, ignoring it: %s", exc)
                continue
            if saved.tokens != n:  # a hash collision would have to agree on the length too
                continue
            metrics.PREFIX_LOOKUPS.labels("hit").inc()
            metrics.PREFIX_CACHED_TOKENS.inc(n)
            return boundary, saved.rows
        metrics.PREFIX_LOOKUPS.labels("miss").inc()
        return None

    def _put(self, blobs: dict[str, bytes], touch: list[str]) -> None:
        try:
            self.store.put_prefixes(blobs, touch)
        except StoreUnavailable as exc:
            self._failed("store", exc)

    def _blob(self, rows: np.ndarray, tokens: int) -> bytes:
        now = time.time()
        return encode_state(SessionState(rows, tokens, 0, now, now), self.fingerprint)
