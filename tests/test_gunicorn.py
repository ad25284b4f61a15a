"""The Procfile command for real: gunicorn, two gthread workers, a private Redis, HTTP over loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from servers import ROOT, Gunicorn, RedisServer, serving, wait_until


@pytest.fixture(scope="module")
def server(
    char_lm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    redis_server.client().flushall()
    with serving(
        char_lm_dir,
        tmp_path_factory.mktemp("gunicorn"),
        redis_server.url,
        GUNICORN_THREADS="16",
        MAX_TOKENS_LIMIT="200000",
    ) as g:
        yield g


def post(server: Gunicorn, path: str, body: dict, **kw) -> requests.Response:  # type: ignore[type-arg, no-untyped-def]
    # a new connection per request (no requests.Session), so the two workers share the load
    return requests.post(f"{server.base}{path}", json=body, timeout=30, headers={"Connection": "close"}, **kw)


def tokens(server: Gunicorn, sid: str) -> int:
    return int(requests.get(f"{server.base}/sessions/{sid}", timeout=10).json()["tokens"])


def metric(server: Gunicorn, name: str) -> float:
    text = requests.get(f"{server.base}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_session_continues_across_workers(server: Gunicorn) -> None:
    # Both workers accept from one shared socket, and an idle one may win every accept; pausing
    # one worker (SIGSTOP) makes the other take the next connection, so the session is handed
    # back and forth between the workers deterministically.
    sid = post(server, "/sessions", {"text": "ROMEO:\n"}).json()["session_id"]
    workers = sorted(server.worker_pids())
    assert len(workers) == 2
    served = []
    for i in range(4):
        paused = workers[i % 2]
        os.kill(paused, signal.SIGSTOP)
        try:
            r = post(server, "/next", {"session_id": sid, "text": "ab", "commit": True})
        finally:
            os.kill(paused, signal.SIGCONT)
        assert r.status_code == 200
        served.append(int(r.headers["X-Worker-Pid"]))
    assert served == [workers[1], workers[0], workers[1], workers[0]]
    assert tokens(server, sid) == len("ROMEO:\n") + 4 * len("ab")
    # the state that moved between workers is the state of the whole text fed at once
    moved = post(server, "/next", {"session_id": sid, "commit": False, "top_n": 5}).json()["next"]
    whole = post(server, "/next", {"text": "ROMEO:\nabababab", "top_n": 5}).json()["next"]
    assert [t["id"] for t in moved] == [t["id"] for t in whole]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(moved, whole)) <= 1e-4


def test_session_survives_worker_restart(server: Gunicorn) -> None:
    sid = post(server, "/sessions", {"text": "JULIET:\nO Romeo, Romeo"}).json()["session_id"]
    before = post(server, "/next", {"session_id": sid, "commit": False, "top_n": 5}).json()["next"]
    old = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGHUP)  # gunicorn replaces every worker
    wait_until(
        lambda: server.worker_pids() and not (server.worker_pids() & old) and len(server.worker_pids()) == 2,
        60,
        "new workers",
    )
    wait_until(lambda: requests.get(f"{server.base}/ready", timeout=2).status_code == 200, 60, "ready")
    after = post(server, "/next", {"session_id": sid, "commit": False, "top_n": 5}).json()["next"]
    assert [t["id"] for t in after] == [t["id"] for t in before]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(after, before)) < 1e-5
    assert tokens(server, sid) == len("JULIET:\nO Romeo, Romeo")


def test_concurrent_writers_lose_nothing(server: Gunicorn) -> None:
    sid = post(server, "/sessions", {}).json()["session_id"]
    texts = ["a", "bb", "ccc", "dddd"] * 12

    def send(text: str) -> tuple[int, int]:
        r = post(server, "/next", {"session_id": sid, "text": text, "commit": True})
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "session_conflict"
        return r.status_code, r.json().get("tokens_processed", 0)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, texts))
    statuses = {s for s, _ in results}
    assert statuses <= {200, 409}
    added = sum(n for s, n in results if s == 200)
    assert tokens(server, sid) == added
    assert added > 0  # some won; conflicts, if any, were reported, not lost


def test_stream_over_http(server: Gunicorn) -> None:
    r = post(server, "/generate", {"prompt": "KING:", "max_tokens": 30, "seed": 3, "stream": True}, stream=True)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: ") :]) for line in r.iter_lines(decode_unicode=True) if line]
    assert len(events) == 31 and events[-1]["finish_reason"] == "length"
    text = "".join(e["token"] for e in events[:-1])
    assert events[-1]["text"] == text and events[-1]["usage"]["completion_tokens"] == 30
    plain = post(server, "/generate", {"prompt": "KING:", "max_tokens": 30, "seed": 3}).json()
    assert plain["text"] == text


def test_abandoned_stream_stops_and_leaves_session_unchanged(server: Gunicorn) -> None:
    sid = post(server, "/sessions", {"text": "HAMLET:\n"}).json()["session_id"]
    r = post(server, "/generate", {"session_id": sid, "max_tokens": 200000, "stream": True}, stream=True)
    worker = int(r.headers["X-Worker-Pid"])
    lines = r.iter_lines()
    got = [next(lines) for _ in range(6)]
    assert any(line.startswith(b"data: ") for line in got)
    r.close()  # the client goes away mid-stream

    def ticks_settled() -> bool:
        first = metric(server, "lstm_batch_size_count")
        time.sleep(0.5)
        return metric(server, "lstm_batch_size_count") == first

    wait_until(ticks_settled, 20, "the scheduler to stop stepping the abandoned stream")
    assert tokens(server, sid) == len("HAMLET:\n")  # nothing of the abandoned request was saved
    # New generations on the abandoned stream's worker (the other one paused, so it takes every
    # connection) must run alone: every tick a batch of one, so the tick count and the sum of
    # batch sizes grow by the same amount. A sequence left in the batch would make them differ.
    ticks, rows = metric(server, "lstm_batch_size_count"), metric(server, "lstm_batch_size_sum")
    other = next(pid for pid in server.worker_pids() if pid != worker)
    os.kill(other, signal.SIGSTOP)
    try:
        for seed in range(3):
            done = post(server, "/generate", {"prompt": "A", "max_tokens": 20, "seed": seed})
            assert done.status_code == 200 and int(done.headers["X-Worker-Pid"]) == worker
    finally:
        os.kill(other, signal.SIGCONT)
    added_ticks = metric(server, "lstm_batch_size_count") - ticks
    assert added_ticks == 3 * 20
    assert metric(server, "lstm_batch_size_sum") - rows == added_ticks


def test_metrics_aggregate_workers(server: Gunicorn) -> None:
    before = metric(server, "lstm_requests_total")
    with ThreadPoolExecutor(4) as pool:
        pids = set(pool.map(lambda _: post(server, "/tokenize", {"text": "abc"}).headers["X-Worker-Pid"], range(20)))
    after = metric(server, "lstm_requests_total")
    assert len(pids) == 2 and after - before >= 20
    text = requests.get(f"{server.base}/metrics", timeout=10).text
    for name in (
        "lstm_request_duration_seconds_bucket",
        "lstm_generated_tokens_total",
        "lstm_active_sessions",
        "lstm_store_errors_total",
        "lstm_generation_tokens_per_second_bucket",
    ):
        assert name in text


def test_multiple_workers_without_redis_refuse_to_start(char_lm_dir: Path) -> None:
    env = {**os.environ, "MODEL_DIR": str(char_lm_dir), "WEB_CONCURRENCY": "2", "PORT": "8999"}
    env.pop("REDIS_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = subprocess.run(
        ["gunicorn", "-c", "service/gunicorn.conf.py", "service:create_app()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "REDIS_URL" in out.stderr and "WEB_CONCURRENCY=2" in out.stderr


def test_chunked_body_is_held_to_the_limit_and_options_answer_without_html(server: Gunicorn) -> None:
    chunks = iter([b" " * 65536] * 40)  # 2.5 MiB with no Content-Length: counted as it is read
    r = requests.post(f"{server.base}/score", data=chunks, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = iter([b'{"text": ', b'"To be"}'])  # chunked but small: fine
    assert requests.post(f"{server.base}/score", data=small, headers={"Content-Type": "application/json"}).ok
    r = requests.options(f"{server.base}/generate", timeout=10)
    assert r.status_code == 204 and r.content == b"" and "POST" in r.headers["Allow"]
    assert "text/html" not in r.headers.get("Content-Type", "")


def test_one_worker_with_two_blas_threads_serves_concurrent_streams(redis_server: RedisServer, tmp_path: Path) -> None:
    """One worker with 2 BLAS threads (what a lone worker takes on 2 cores) under concurrent
    prefills and streams. Before the fused step serialised its BLAS calls, OpenBLAS called from
    several threads at once collapsed to ~0.1 tokens/s here: a liveness check, not a timing."""
    from conftest import SHIPPED

    env = {
        "MODEL_DIR": str(SHIPPED["shakespeare-char"]),
        "REDIS_URL": redis_server.url,
        "WEB_CONCURRENCY": "1",
        "BLAS_THREADS": "2",
        "LOG_LEVEL": "WARNING",
    }
    g = Gunicorn(env, tmp_path / "gunicorn.log")
    try:

        def one(i: int) -> int:
            sid = post(g, "/sessions", {"text": "ROMEO:\n" * (1 + i % 3)}).json()["session_id"]
            body = {"session_id": sid, "max_tokens": 60, "stream": True, "seed": i}
            with requests.post(f"{g.base}/generate", json=body, stream=True, timeout=90) as r:
                r.raise_for_status()
                return sum(line.startswith(b'data: {"token"') for line in r.iter_lines())

        # ~6 s here with the fix, over 60 without it: the bound only tells a crawl from a run
        deadline = time.monotonic() + 90
        with ThreadPoolExecutor(32) as pool:
            for _ in range(2):
                assert list(pool.map(one, range(32))) == [60] * 32
                assert time.monotonic() < deadline, "concurrent streams crawled (BLAS threads fighting?)"
    finally:
        g.stop()
