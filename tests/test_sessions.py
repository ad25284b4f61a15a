"""Session stores and the state codec, against a real (private) redis-server."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from service.sessions import CasResult, MemorySessionStore, RedisSessionStore, SessionStore
from service.state_codec import HEADER_SIZE, SessionState, StateDecodeError, decode_state, encode_state

from conftest import AppFactory
from servers import RedisServer

FP = "0123456789abcdef"


def blob(version: int, tokens: int = 3, cols: int = 8) -> bytes:
    return encode_state(SessionState(np.arange(cols, dtype=np.float32).reshape(1, -1), tokens, version, 1.0, 2.0), FP)


def test_codec_round_trip() -> None:
    data = blob(7, tokens=42)
    assert len(data) == HEADER_SIZE + 8 * 4
    back = decode_state(data, FP, 8)
    assert back.tokens == 42 and back.version == 7 and (back.created_at, back.updated_at) == (1.0, 2.0)
    assert np.array_equal(back.rows, np.arange(8, dtype=np.float32).reshape(1, -1))
    assert b"pickle" not in data and data[:4] == b"LSTM"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "shorter than its"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "codec version 9"),
        (lambda b: b[:5] + b"\x02" + b[6:], "dtype code 2"),
        (lambda b: b[:-4], "payload is 28 bytes"),
        (lambda b: b[:-4] + b"\x00\x00\xc0\x7f", "NaN"),
    ],
)
def test_codec_rejects_bad_blobs(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateDecodeError, match=message):
        decode_state(mutate(blob(1)), FP, 8)


def test_codec_rejects_other_models_and_shapes() -> None:
    with pytest.raises(StateDecodeError, match="belongs to model"):
        decode_state(blob(1), "fedcba9876543210", 8)
    with pytest.raises(StateDecodeError, match="does not fit this model"):
        decode_state(blob(1), FP, 16)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> SessionStore:
    if request.param == "memory":
        return MemorySessionStore(ttl_seconds=60, max_bytes=1 << 20)
    redis_server.client().flushall()
    return RedisSessionStore(redis_server.url, FP, ttl_seconds=60)


def test_store_contract(store: SessionStore) -> None:
    store_contract(store)


def store_contract(store: SessionStore) -> None:
    """What every store promises (also run against Redis Cluster and Sentinel: test_redis_topologies)."""
    sid = "s" * 32
    assert store.get(sid) is None
    assert store.create(sid, blob(0))
    assert not store.create(sid, blob(0))  # ids are never overwritten
    assert store.get(sid) == blob(0)
    assert store.compare_and_set(sid, 0, blob(1)) is CasResult.OK
    assert store.compare_and_set(sid, 0, blob(2)) is CasResult.CONFLICT  # stale writer loses
    assert store.get(sid) == blob(1)
    assert store.compare_and_set("m" * 32, 0, blob(1)) is CasResult.MISSING
    assert 55 <= (store.ttl(sid) or 0) <= 60
    # the count for /metrics: alive sessions in process; in Redis the ids used in the last hour,
    # estimated with HyperLogLogs of fixed size (so deleting one does not take it back)
    assert store.count() == 1
    assert store.delete(sid) and not store.delete(sid)
    assert store.get(sid) is None and store.ttl(sid) is None
    assert store.count() == (0 if store.kind == "memory" else 1)


def test_redis_keys_include_fingerprint_and_expire(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    a = RedisSessionStore(redis_server.url, FP, ttl_seconds=2)
    b = RedisSessionStore(redis_server.url, "ffffffffffffffff", ttl_seconds=2)
    sid = "k" * 32
    a.create(sid, blob(0))
    assert b.get(sid) is None  # another model never sees this state
    key = f"lstm-lm:{FP}:session:{{{sid}}}"  # the session id is the key's Cluster hash tag
    assert a.key_for(sid) == key and client.exists(key)
    assert 0 < client.ttl(key) <= 2
    a.compare_and_set(sid, 0, blob(1))
    a.ping()
    # every key the store writes expires (under volatile-lru, a key without a TTL is never evicted)
    assert all(client.ttl(k) > 0 for k in client.scan_iter("*")), {k: client.ttl(k) for k in client.scan_iter("*")}
    time.sleep(1.2)
    a.get(sid)  # use refreshes the TTL
    assert client.ttl(key) == 2
    time.sleep(2.2)
    assert a.get(sid) is None


def test_memory_store_ttl_and_lru_by_bytes() -> None:
    now = [0.0]
    store = MemorySessionStore(ttl_seconds=10, max_bytes=3 * len(blob(0)), clock=lambda: now[0])
    for i in range(3):
        store.create(f"{i}" * 32, blob(0))
    store.get("0" * 32)  # recently used: survives the next eviction
    store.create("3" * 32, blob(0))
    assert store.get("1" * 32) is None  # least recently used went first
    assert store.get("0" * 32) is not None and store.count() == 3
    now[0] = 9.0
    store.get("0" * 32)  # refreshed
    now[0] = 15.0
    assert store.get("2" * 32) is None and store.get("0" * 32) is not None
    assert store.count() == 1


def test_session_lifecycle_over_http(make_app: AppFactory) -> None:
    client = make_app(redis=True).test_client()
    r = client.post("/sessions", json={"text": "ROMEO:\n"})
    assert r.status_code == 201
    sid = r.get_json()["session_id"]
    assert r.get_json()["tokens"] == 7 and len(sid) >= 22  # >= 128 random bits
    info = client.get(f"/sessions/{sid}").get_json()
    assert (
        info["tokens"] == 7
        and info["expires_in"] > 0
        and info["model"] == client.get("/info").get_json()["model"]["fingerprint"]
    )
    fork = client.post(f"/sessions/{sid}/fork").get_json()
    assert fork["tokens"] == 7 and fork["session_id"] != sid
    # continuing the fork never changes the original
    client.post("/next", json={"session_id": fork["session_id"], "text": "But soft", "commit": True})
    assert client.get(f"/sessions/{fork['session_id']}").get_json()["tokens"] == 15
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == 7
    a = client.post("/next", json={"session_id": sid, "commit": False}).get_json()["next"]
    b = client.post("/next", json={"text": "ROMEO:\n", "commit": False}).get_json()["next"]
    assert a == b
    # /next is a peek unless told to commit: the session is unchanged
    client.post("/next", json={"session_id": sid, "text": "more text"})
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == 7
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert client.get(f"/sessions/{sid}").status_code == 404


def test_corrupt_state_is_an_explicit_logged_error(make_app: AppFactory, redis_server: RedisServer, caplog) -> None:  # type: ignore[no-untyped-def]
    app = make_app(redis=True)
    client = app.test_client()
    sid = client.post("/sessions", json={"text": "abc"}).get_json()["session_id"]
    key = app.extensions["lm_service"].store.key_for(sid)
    redis_server.client().set(key, b"LSTM garbage")
    with caplog.at_level(logging.ERROR):
        r = client.post("/next", json={"session_id": sid})
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "session_state_corrupt"
    assert "cannot be decoded" in caplog.text
    # and it was not silently replaced by a fresh state
    assert redis_server.client().get(key) == b"LSTM garbage"
