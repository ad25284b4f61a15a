"""The session contract on Redis beyond one node: a 3-master Cluster and a Sentinel deployment,
real redis-server processes on loopback, reached through REDIS_URL as the service reads it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask import Flask
from redis_topologies import Cluster, Sentinels, TLSNode, make_certificates
from test_sessions import FP, store_contract

from model import load
from service import Settings, create_app
from service.redis_client import connect
from service.sessions import RedisSessionStore
from service.state_codec import store_namespace

from servers import wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture()
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    s = Sentinels(tmp_path)
    yield s
    s.stop()


def app_on(url: str, model_dir: Path, **settings: object) -> Flask:
    return create_app(Settings(model_dir=model_dir, redis_url=url, torch_threads=1, **settings))  # type: ignore[arg-type]


def session_flow(app: Flask) -> None:
    """Create, continue, fork, race and delete sessions through the app."""
    client = app.test_client()
    sid = client.post("/sessions", json={"text": "ROMEO:\n"}).get_json()["session_id"]
    r = client.post("/generate", json={"session_id": sid, "max_tokens": 8, "seed": 1})
    assert r.status_code == 200 and r.get_json()["usage"]["session_tokens"] == 7 + 8
    fork = client.post(f"/sessions/{sid}/fork").get_json()["session_id"]
    assert client.post("/next", json={"session_id": fork, "text": "ab", "commit": True}).status_code == 200
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == 15
    assert client.get(f"/sessions/{fork}").get_json()["tokens"] == 17

    def write(text: str) -> int:
        return int(app.test_client().post("/next", json={"session_id": sid, "text": text, "commit": True}).status_code)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(write, ["x"] * 16))
    assert set(statuses) <= {200, 409} and 200 in statuses
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == 15 + statuses.count(200)  # nothing lost
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert client.get(f"/sessions/{sid}").status_code == 404


def test_cluster_store_contract_and_hash_tags(cluster: Cluster) -> None:
    client = connect(cluster.url)
    store = RedisSessionStore(client, FP, ttl_seconds=60)
    store_contract(store)
    # a session's key carries its id as hash tag: whatever the prefix, one slot per session
    slots = {client.keyslot(store.key_for(f"{i:032d}")) for i in range(50)}
    assert len(slots) > 10  # sessions spread over the cluster...
    assert client.keyslot(store.key_for("s" * 32)) == client.keyslot("{" + "s" * 32 + "}")  # ...by their id


def test_cluster_serves_sessions(cluster: Cluster, char_lm_dir: Path) -> None:
    app = app_on(cluster.url, char_lm_dir)
    session_flow(app)
    masters = {node.port for node in cluster.nodes}
    used = {n.port for n in cluster.nodes if n.client().dbsize() > 0}
    assert used and used <= masters


def test_sentinel_store_contract(sentinels: Sentinels) -> None:
    store_contract(RedisSessionStore(connect(sentinels.url), FP, ttl_seconds=60))


def test_sentinel_failover(sentinels: Sentinels, char_lm_dir: Path) -> None:
    """Kill the master: requests with a session get 503 while there is none, then the service
    follows the promoted replica by itself; sessions written with REDIS_WAIT_REPLICAS=1 survive."""
    app = app_on(sentinels.url, char_lm_dir, redis_wait_replicas=1)
    session_flow(app)
    client = app.test_client()
    sids = [client.post("/sessions", json={"text": f"KING {i}:"}).get_json()["session_id"] for i in range(5)]
    for sid in sids:
        r = client.post("/next", json={"session_id": sid, "text": "ab", "commit": True})
        assert r.status_code == 200
    before = {sid: client.get(f"/sessions/{sid}").get_json()["tokens"] for sid in sids}
    old = sentinels.master.port
    sentinels.master.kill()
    r = client.post("/next", json={"session_id": sids[0]})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "store_unavailable"
    assert client.get("/ready").status_code == 503
    assert client.post("/generate", json={"prompt": "a", "max_tokens": 3}).status_code == 200  # no session needed
    wait_until(lambda: sentinels.current_master_port() != old, 30, "the sentinels to promote the replica")
    wait_until(lambda: client.get("/ready").status_code == 200, 30, "the service to follow the new master")
    after = {sid: client.get(f"/sessions/{sid}").get_json()["tokens"] for sid in sids}
    assert after == before  # every acknowledged write survived the failover
    # the promoted node has no replica until the old master comes back as one: writes still go
    # through (a write cannot be taken back, and refusing it would make a retry apply it twice),
    # and the shortfall is counted in lstm_store_errors_total{kind="unreplicated"}
    assert client.post("/next", json={"session_id": sids[0], "text": "c", "commit": True}).status_code == 200
    assert client.get(f"/sessions/{sids[0]}").get_json()["tokens"] == before[sids[0]] + 1
    assert 'lstm_store_errors_total{kind="unreplicated"} 1.0' in client.get("/metrics").get_data(as_text=True)


def test_durability_setting_waits_for_a_replica(sentinels: Sentinels, char_lm_dir: Path) -> None:
    fp = load(char_lm_dir).fingerprint
    store = RedisSessionStore(connect(sentinels.url), store_namespace(fp), 60, wait_replicas=1, wait_timeout_ms=1000)
    app = create_app(Settings(model_dir=char_lm_dir, torch_threads=1), store=store)
    client = app.test_client()
    sid = client.post("/sessions", json={"text": "abc"}).get_json()["session_id"]
    # acknowledged means on the replica already, not a second later
    assert sentinels.replica.client().exists(store.key_for(sid))
    sentinels.replica.kill()  # the replica crashes: nothing acknowledges from now on
    started = time.monotonic()
    assert client.post("/sessions", json={}).status_code == 201  # no replica: written, after the wait
    assert time.monotonic() - started >= 0.9


def test_tls_with_client_certificates(tmp_path: Path, char_lm_dir: Path) -> None:
    """rediss:// with the TLS options from the environment (CA, client certificate and key)."""
    certs = make_certificates(tmp_path / "certs")
    node = TLSNode(tmp_path / "tls", certs)
    try:
        url = f"rediss://127.0.0.1:{node.port}/0"
        env = {
            "REDIS_URL": url,
            "REDIS_TLS_CA_FILE": str(certs["ca.crt"]),
            "REDIS_TLS_CERT_FILE": str(certs["client.crt"]),
            "REDIS_TLS_KEY_FILE": str(certs["client.key"]),
            "MODEL_DIR": str(char_lm_dir),
            "TORCH_THREADS": "1",
        }
        app = create_app(Settings.from_env(env))
        session_flow(app)
        assert app.test_client().get("/ready").status_code == 200
        # without the client certificate the server refuses the connection: 503, not a crash
        no_cert = {k: v for k, v in env.items() if k not in ("REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")}
        refused = create_app(Settings.from_env(no_cert)).test_client()
        assert refused.get("/ready").status_code == 503
        assert refused.post("/sessions", json={}).status_code == 503
    finally:
        node.stop()
