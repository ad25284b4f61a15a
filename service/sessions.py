"""Where session states live: Redis (shared by workers and replicas) or an in-process LRU.

Stores hold opaque blobs (see state_codec) under keys that include the model fingerprint, so a
redeployed model never reads another model's states. Writes of an existing session are
compare-and-set on the version counter in the blob header: of two requests racing on one
session, one wins and the other is told (CasResult.CONFLICT -> HTTP 409), never silently lost.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from redis.exceptions import RedisError

from .metrics import STORE_ERRORS
from .redis_client import Client, connect
from .state_codec import VERSION_FORMAT, VERSION_OFFSET, version_bytes

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The session store cannot be reached; requests that need it answer 503."""


class CasResult(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"  # someone else wrote the session since we read it
    MISSING = "missing"  # deleted or expired meanwhile


class SessionStore(Protocol):
    kind: str

    def get(self, session_id: str) -> bytes | None:
        """The blob, refreshing its TTL; None if unknown or expired."""

    def create(self, session_id: str, blob: bytes) -> bool:
        """Store a new session; False if the id exists."""

    def compare_and_set(self, session_id: str, expected_version: int, blob: bytes) -> CasResult:
        """Replace the blob only if the stored one still has `expected_version`."""

    def delete(self, session_id: str) -> bool: ...

    def ttl(self, session_id: str) -> int | None:
        """Seconds until expiry; None if unknown."""

    def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot serve requests."""

    def count(self) -> int:
        """Sessions currently alive (for metrics)."""

    # prefix-cache entries (service.prefix_cache): state blobs by a hash of the tokens they
    # consumed, apart from sessions, each expiring after the session TTL

    def get_prefixes(self, digests: Sequence[str]) -> list[bytes | None]:
        """The blobs stored under these digests, in one round trip (None where absent)."""

    def put_prefixes(self, blobs: Mapping[str, bytes], touch: Sequence[str] = ()) -> None:
        """Store blobs by digest and refresh the TTL of the `touch` digests, in one round trip."""


def _stored_version(blob: bytes) -> int:
    return int(VERSION_FORMAT.unpack_from(blob, VERSION_OFFSET)[0])


class MemorySessionStore:
    """In-process store for a single worker: TTL on every entry, LRU eviction by total bytes."""

    kind = "memory"

    def __init__(self, ttl_seconds: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._clock = clock  # injectable so tests can move time
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._prefixes = _PrefixEntries(ttl_seconds, max_bytes // 4, clock)  # apart: never evicts a session

    def _live(self, session_id: str) -> bytes | None:
        item = self._items.get(session_id)
        if item is None:
            return None
        blob, expires = item
        if expires <= self._clock():
            self._remove(session_id)
            return None
        return blob

    def _remove(self, session_id: str) -> None:
        blob, _ = self._items.pop(session_id)
        self._bytes -= len(blob)

    def _put(self, session_id: str, blob: bytes) -> None:
        if session_id in self._items:
            self._remove(session_id)
        self._items[session_id] = (blob, self._clock() + self.ttl_seconds)
        self._bytes += len(blob)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._remove(next(iter(self._items)))  # least recently used first

    def get(self, session_id: str) -> bytes | None:
        with self._lock:
            blob = self._live(session_id)
            if blob is not None:
                self._put(session_id, blob)  # refresh TTL and recency
            return blob

    def create(self, session_id: str, blob: bytes) -> bool:
        with self._lock:
            if self._live(session_id) is not None:
                return False
            self._put(session_id, blob)
            return True

    def compare_and_set(self, session_id: str, expected_version: int, blob: bytes) -> CasResult:
        with self._lock:
            current = self._live(session_id)
            if current is None:
                return CasResult.MISSING
            if _stored_version(current) != expected_version:
                return CasResult.CONFLICT
            self._put(session_id, blob)
            return CasResult.OK

    def delete(self, session_id: str) -> bool:
        with self._lock:
            if self._live(session_id) is None:
                return False
            self._remove(session_id)
            return True

    def ttl(self, session_id: str) -> int | None:
        with self._lock:
            if self._live(session_id) is None:
                return None
            return max(0, round(self._items[session_id][1] - self._clock()))

    def ping(self) -> None:
        return None

    def count(self) -> int:
        with self._lock:
            now = self._clock()
            for sid in [s for s, (_, exp) in self._items.items() if exp <= now]:
                self._remove(sid)
            return len(self._items)

    # ---- prefix-cache entries (service.prefix_cache) ------------------------------------------

    def get_prefixes(self, digests: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            return [self._prefixes.get(d) for d in digests]

    def put_prefixes(self, blobs: Mapping[str, bytes], touch: Sequence[str] = ()) -> None:
        with self._lock:
            for digest, blob in blobs.items():
                self._prefixes.put(digest, blob)
            for digest in touch:
                self._prefixes.touch(digest)


class _PrefixEntries:
    """Prefix-cache blobs of the in-process store: TTL on every entry, LRU within their own byte
    budget (a quarter of the store's), so caching a long conversation never evicts a session.
    Not thread-safe by itself: MemorySessionStore calls it under its lock."""

    def __init__(self, ttl_seconds: int, max_bytes: int, clock: Callable[[], float]):
        self.ttl_seconds, self.max_bytes, self._clock = ttl_seconds, max_bytes, clock
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> bytes | None:
        item = self._items.get(digest)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._drop(digest)
            return None
        return item[0]

    def put(self, digest: str, blob: bytes) -> None:
        if digest in self._items:
            self._drop(digest)
        self._items[digest] = (blob, self._clock() + self.ttl_seconds)
        self._bytes += len(blob)
        while self._bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))  # least recently stored or touched first

    def touch(self, digest: str) -> None:
        blob = self.get(digest)
        if blob is not None:
            self.put(digest, blob)

    def _drop(self, digest: str) -> None:
        blob, _ = self._items.pop(digest)
        self._bytes -= len(blob)


# KEYS[1] the session key; ARGV: expected version bytes, new blob, ttl. One key, so the script
# runs in Redis Cluster too (the key's hash tag is the session id).
_CAS_SCRIPT = f"""
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if string.sub(current, {VERSION_OFFSET + 1}, {VERSION_OFFSET + 8}) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

ACTIVE_WINDOW = 3600  # /metrics counts the sessions used within this many seconds
_BUCKET = 600  # ... as the union of HyperLogLogs of 10-minute buckets


class RedisSessionStore:
    """Sessions in Redis: one key per session (SET ... EX), named with the session id as its hash
    tag so everything about one session lives in one Cluster slot.

    Beside them, /metrics counts the sessions used in the last hour with HyperLogLogs, one per
    ten minutes: about 12 KB each whatever the number of sessions, each expiring on its own. Per
    session bookkeeping (say, a sorted set of ids) would grow with every session created, evicted
    or not, and under a creation flood would be what fills Redis."""

    kind = "redis"

    def __init__(
        self,
        client: Client | str,
        namespace: str,
        ttl_seconds: int,
        prefix: str = "lstm-lm",
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ):
        self.client: Client = connect(client) if isinstance(client, str) else client
        self.ttl_seconds = ttl_seconds
        # durability: a session write is acknowledged only once this many replicas hold it (WAIT),
        # so a master that dies right after answering loses nothing a client was told was saved
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self._prefix = f"{prefix}:{namespace}"
        self._active = f"{{{self._prefix}:active}}"  # one hash tag: PFCOUNT merges buckets in one slot
        self._probe = f"{prefix}:ready-probe"
        self._cas = self.client.register_script(_CAS_SCRIPT)

    def key_for(self, session_id: str) -> str:
        return f"{self._prefix}:session:{{{session_id}}}"

    def _active_key(self, bucket: int) -> str:
        return f"{self._active}:{bucket}"

    def _mark_used(self, pipe: Any, session_id: str) -> None:
        key = self._active_key(int(time.time()) // _BUCKET)
        pipe.pfadd(key, session_id)
        pipe.expire(key, ACTIVE_WINDOW + _BUCKET)

    def _run(self, build: Callable[[Any], None]) -> list[Any]:
        """One round trip: the commands `build` queues on a (non-transactional) pipeline."""
        try:
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            return list(pipe.execute())
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    def get(self, session_id: str) -> bytes | None:
        def build(pipe: Any) -> None:
            pipe.getex(self.key_for(session_id), ex=self.ttl_seconds)  # refreshes the TTL of a live session
            self._mark_used(pipe, session_id)  # bookkeeping for /metrics, in the same round trip

        blob = self._run(build)[0]
        return None if blob is None else bytes(blob)

    def _replicated(self, pipe: Any) -> None:
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)

    def _check_replicated(self, results: list[Any]) -> None:
        # WAIT cannot undo a write the master applied: failing the request would make a client's
        # retry apply it twice. So the write stands, and the shortfall is logged and counted.
        if self.wait_replicas and int(results[-1]) < self.wait_replicas:
            STORE_ERRORS.labels("unreplicated").inc()
            log.warning(
                "only %s of %d Redis replicas confirmed a session write within %d ms",
                results[-1],
                self.wait_replicas,
                self.wait_timeout_ms,
            )

    def create(self, session_id: str, blob: bytes) -> bool:
        def build(pipe: Any) -> None:
            pipe.set(self.key_for(session_id), blob, ex=self.ttl_seconds, nx=True)
            self._mark_used(pipe, session_id)
            self._replicated(pipe)

        results = self._run(build)
        self._check_replicated(results)
        return bool(results[0])

    def compare_and_set(self, session_id: str, expected_version: int, blob: bytes) -> CasResult:
        args: list[bytes | int] = [version_bytes(expected_version), blob, self.ttl_seconds]
        try:
            # one script call on one key: one round trip, atomic, and valid in Redis Cluster (where
            # scripts cannot be pipelined); WAIT then needs a round trip of its own
            result = self._cas(keys=[self.key_for(session_id)], args=args)
            outcome = {1: CasResult.OK, 0: CasResult.CONFLICT}.get(int(result), CasResult.MISSING)
            if outcome is CasResult.OK and self.wait_replicas:
                self._check_replicated([self.client.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)])
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return outcome

    def delete(self, session_id: str) -> bool:
        def build(pipe: Any) -> None:
            pipe.delete(self.key_for(session_id))

        return bool(self._run(build)[0])

    def ttl(self, session_id: str) -> int | None:
        seconds = int(self._run(lambda pipe: pipe.ttl(self.key_for(session_id)))[0])
        return None if seconds < 0 else seconds

    def ping(self) -> None:
        """Reachable and accepting writes: a Redis out of memory (noeviction) or a read-only
        replica fails here, so /ready says so."""
        try:
            self.client.set(self._probe, b"1", px=10_000)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable or refuses writes: {exc}") from exc

    def count(self) -> int:
        """Sessions created or written in the last hour (a HyperLogLog estimate, within ~1%)."""
        now = int(time.time()) // _BUCKET
        keys = [self._active_key(b) for b in range(now - ACTIVE_WINDOW // _BUCKET, now + 1)]
        try:
            return int(self.client.pfcount(*keys))  # not pipelined: Cluster clients refuse that for PFCOUNT
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    # ---- prefix-cache entries (service.prefix_cache) ------------------------------------------

    def prefix_key(self, digest: str) -> str:
        """Apart from sessions, in this model's namespace (the fingerprint is part of it)."""
        return f"{self._prefix}:prefix:{digest}"

    def get_prefixes(self, digests: Sequence[str]) -> list[bytes | None]:
        # a pipeline of GETs rather than one MGET: one round trip either way, and the keys need
        # not share a Cluster slot
        try:
            pipe = self.client.pipeline(transaction=False)
            for digest in digests:
                pipe.get(self.prefix_key(digest))
            values = pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return [None if v is None else bytes(v) for v in values]

    def put_prefixes(self, blobs: Mapping[str, bytes], touch: Sequence[str] = ()) -> None:
        # SET ... EX: every entry expires, so under volatile-lru they are evicted like sessions
        try:
            pipe = self.client.pipeline(transaction=False)
            for digest, blob in blobs.items():
                pipe.set(self.prefix_key(digest), blob, ex=self.ttl_seconds)
            for digest in touch:
                pipe.expire(self.prefix_key(digest), self.ttl_seconds)
            pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
