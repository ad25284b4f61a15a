"""Where session states live: Redis (shared by workers and replicas) or an in-process LRU.

Stores hold opaque blobs (see state_codec) under keys that include the model fingerprint, so a
redeployed model never reads another model's states. Writes of an existing session are
compare-and-set on the version counter in the blob header: of two requests racing on one
session, one wins and the other is told (CasResult.CONFLICT -> HTTP 409), never silently lost.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis
from redis.exceptions import RedisError

from .state_codec import VERSION_FORMAT, VERSION_OFFSET, version_bytes


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


# KEYS[1] session key, KEYS[2] index of live sessions; ARGV: version bytes, new blob, ttl, id, expiry
_CAS_SCRIPT = f"""
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if string.sub(current, {VERSION_OFFSET + 1}, {VERSION_OFFSET + 8}) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
return 1
"""


# KEYS[1] session key, KEYS[2] index; ARGV: ttl, expiry, id. Refreshes the TTL of a live session;
# drops the index entry of one that has expired.
_GET_SCRIPT = """
local blob = redis.call('GETEX', KEYS[1], 'EX', ARGV[1])
if blob then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3]) else redis.call('ZREM', KEYS[2], ARGV[3]) end
return blob
"""


class RedisSessionStore:
    """Sessions in Redis: one key per session (SET ... EX), a sorted set indexing live sessions
    by expiry so counting them never scans the keyspace."""

    kind = "redis"

    def __init__(self, client: redis.Redis | str, namespace: str, ttl_seconds: int, prefix: str = "lstm-lm"):
        if isinstance(client, str):
            client = redis.Redis.from_url(client, socket_timeout=2.0, socket_connect_timeout=1.0)
        self.client = client
        self.ttl_seconds = ttl_seconds
        self._prefix = f"{prefix}:{namespace}"
        self._index = f"{self._prefix}:live"
        self._cas = client.register_script(_CAS_SCRIPT)
        self._get = client.register_script(_GET_SCRIPT)

    def key_for(self, session_id: str) -> str:
        return f"{self._prefix}:session:{session_id}"

    def _expiry(self) -> float:
        return time.time() + self.ttl_seconds

    def get(self, session_id: str) -> bytes | None:
        try:
            blob = self._get(
                keys=[self.key_for(session_id), self._index], args=[self.ttl_seconds, self._expiry(), session_id]
            )
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return None if blob is None else bytes(blob)

    def create(self, session_id: str, blob: bytes) -> bool:
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.key_for(session_id), blob, ex=self.ttl_seconds, nx=True)
            pipe.zadd(self._index, {session_id: self._expiry()})
            created, _ = pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return bool(created)

    def compare_and_set(self, session_id: str, expected_version: int, blob: bytes) -> CasResult:
        try:
            result = self._cas(
                keys=[self.key_for(session_id), self._index],
                args=[version_bytes(expected_version), blob, self.ttl_seconds, session_id, self._expiry()],
            )
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return {1: CasResult.OK, 0: CasResult.CONFLICT}.get(int(result), CasResult.MISSING)

    def delete(self, session_id: str) -> bool:
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key_for(session_id))
            pipe.zrem(self._index, session_id)
            deleted, _ = pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return bool(deleted)

    def ttl(self, session_id: str) -> int | None:
        try:
            seconds = int(self.client.ttl(self.key_for(session_id)))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return None if seconds < 0 else seconds

    def ping(self) -> None:
        try:
            self.client.ping()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    def count(self) -> int:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zremrangebyscore(self._index, "-inf", time.time())
            pipe.zcard(self._index)
            _, live = pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return int(live)
