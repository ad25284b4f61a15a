"""Faults, for real: a worker killed mid-stream, Redis paused mid-stream, Redis full, a flood of
costly inputs. Each against the Procfile's gunicorn and a private redis-server of its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servers import Gunicorn, RedisServer, wait_until


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)  # this test may pause, fill or restart it
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


def start(char_lm_dir: Path, redis_server: RedisServer, tmp_path: Path, **env: str) -> Gunicorn:
    base = {
        "MODEL_DIR": str(char_lm_dir),
        "REDIS_URL": redis_server.url,
        "WEB_CONCURRENCY": "2",
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "WARNING",
        "MAX_TOKENS_LIMIT": "100000",
    }
    return Gunicorn({**base, **env}, tmp_path / "gunicorn.log")


def post(server: Gunicorn, path: str, body: dict[str, object], **kw: object) -> requests.Response:
    return requests.post(f"{server.base}{path}", json=body, timeout=60, headers={"Connection": "close"}, **kw)  # type: ignore[arg-type]


def events(lines: Iterator[bytes]) -> Iterator[dict[str, object]]:
    for line in lines:
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def test_worker_killed_mid_stream_costs_only_that_stream(
    char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path
) -> None:
    server = start(char_lm_dir, own_redis, tmp_path)
    try:
        sid = post(server, "/sessions", {"text": "HAMLET:\n"}).json()["session_id"]
        r = post(server, "/generate", {"session_id": sid, "max_tokens": 100000, "stream": True}, stream=True)
        worker = int(r.headers["X-Worker-Pid"])
        got = events(r.iter_lines())
        next(got)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            for _ in got:  # the stream breaks: its worker is gone
                pass
        wait_until(lambda: len(server.worker_pids()) == 2 and worker not in server.worker_pids(), 60, "a new worker")
        info = requests.get(f"{server.base}/sessions/{sid}", timeout=10).json()
        assert info["tokens"] == len("HAMLET:\n")  # nothing of the killed stream was committed
        done = post(server, "/generate", {"session_id": sid, "max_tokens": 5, "seed": 1})
        assert done.status_code == 200 and done.json()["usage"]["session_tokens"] == len("HAMLET:\n") + 5
    finally:
        server.stop()


def test_redis_paused_mid_stream_ends_with_an_error_event(
    char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path
) -> None:
    server = start(char_lm_dir, own_redis, tmp_path)
    try:
        sid = post(server, "/sessions", {"text": "KING:\n"}).json()["session_id"]
        r = post(server, "/generate", {"session_id": sid, "max_tokens": 400, "stream": True}, stream=True)
        got = events(r.iter_lines())
        next(got)
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # Redis hangs: the final save times out
        try:
            rest = list(got)  # the stream still ends properly (requests would raise on a cut chunked body)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        final = rest[-1]
        assert final["error"] == {  # type: ignore[comparison-overlap]
            "code": "store_unavailable",
            "message": "the session store is unavailable; nothing was saved, retry",
            "details": None,
        }
        assert "127.0.0.1" not in json.dumps(rest)  # no internal address reaches the client
        assert all("token" in e for e in rest[:-1])
        info = requests.get(f"{server.base}/sessions/{sid}", timeout=10).json()
        assert info["tokens"] == len("KING:\n")
    finally:
        server.stop()


def test_full_redis_answers_503_and_recovers(char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path) -> None:
    server = start(char_lm_dir, own_redis, tmp_path)
    admin = own_redis.client()
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # below what is used: every write is refused (OOM)
        r = post(server, "/sessions", {"text": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert r.headers["Retry-After"] == "1"
        ready = requests.get(f"{server.base}/ready", timeout=10)
        assert ready.status_code == 503  # a Redis that refuses writes is not ready
        assert "127.0.0.1" not in ready.text and "OOM" not in ready.text
        assert post(server, "/generate", {"prompt": "a", "max_tokens": 3}).status_code == 200  # no session needed
        admin.config_set("maxmemory", "0")
        assert requests.get(f"{server.base}/ready", timeout=10).status_code == 200
        assert post(server, "/sessions", {"text": "a"}).status_code == 201
    finally:
        server.stop()


def test_creation_flood_against_a_full_redis_recovers(
    char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis at its memory limit evicts (volatile-lru) the least recently used keys. Everything the
    service writes has a TTL and its index is bounded, so after a flood of new sessions the
    flood's own sessions are what goes, and new sessions live on."""
    server = start(char_lm_dir, own_redis, tmp_path, SESSION_TTL_SECONDS="3600")
    admin = own_redis.client()
    try:
        used = int(admin.info("memory")["used_memory"])
        # room for a few hundred of the tiny model's sessions (and the connections' buffers)
        admin.config_set("maxmemory", str(used + 1024 * 1024))
        admin.config_set("maxmemory-policy", "volatile-lru")

        def flood(n: int) -> None:
            for _ in range(n):
                post(server, "/sessions", {"text": "x"})

        threads = [threading.Thread(target=flood, args=(700,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert admin.info("stats")["evicted_keys"] > 0  # the flood really hit the limit
        fresh = [post(server, "/sessions", {"text": "ROMEO:"}).json()["session_id"] for _ in range(5)]
        time.sleep(2)
        for sid in fresh:
            assert requests.get(f"{server.base}/sessions/{sid}", timeout=10).status_code == 200
        # TTL -1: a key without an expiry; -2: evicted since the scan listed it (not a fault)
        no_ttl = [k for k in admin.scan_iter("*") if admin.ttl(k) == -1]
        assert no_ttl == [], "every key must expire"
    finally:
        server.stop()


def test_a_flood_of_costly_inputs_is_bounded(char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path) -> None:
    """More 100,000-character requests than the budget admits: the rest wait or get 503 with
    Retry-After at once; nothing crashes and memory stays bounded."""
    server = start(
        char_lm_dir, own_redis, tmp_path, ADMISSION_TOKENS="100000", ADMISSION_QUEUE="1", ADMISSION_WAIT_SECONDS="0.5"
    )
    text = ("To be, or not to be, that is the question. " * 2400)[:100_000]
    try:
        results: list[requests.Response] = []

        def score() -> None:
            results.append(post(server, "/score", {"text": text}))

        threads = [threading.Thread(target=score) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results)
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        for r in results:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert requests.get(f"{server.base}/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_redis_errors_never_leak_addresses(char_lm_dir: Path, own_redis: RedisServer, tmp_path: Path) -> None:
    server = start(char_lm_dir, own_redis, tmp_path)
    try:
        sid = post(server, "/sessions", {}).json()["session_id"]
        own_redis.stop()
        for r in (
            post(server, "/next", {"session_id": sid}),
            requests.get(f"{server.base}/ready", timeout=10),
            requests.get(f"{server.base}/sessions/{sid}", timeout=10),
        ):
            assert r.status_code == 503
            assert str(own_redis.port) not in r.text and "127.0.0.1" not in r.text and "Error" not in r.text
    finally:
        server.stop()
