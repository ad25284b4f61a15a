"""The edge, attacked for real: scripts/stack.sh (nginx in front of two Procfile replicas and a
private Redis) under slow and non-reading clients, and the bare Procfile gunicorn's own limits.

The 1 s bounds below are functional bounds under attack (the issue's acceptance criterion), not
speed measurements: without the defences the same requests wait for tens of seconds or forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from servers import ROOT, Gunicorn, Stack, serving, wait_until

SLOW_CLIENTS = 200
NON_READING_STREAMS = 100
FAST = {"TORCH_THREADS": "1", "BLAS_THREADS": "1"}  # busy-waiting BLAS threads collapse on shared cores


class SlowHeaders:
    """`n` connections that send a request line and one header line, then another header line
    every `every` s, never ending their headers: slow clients, kept up by a thread."""

    def __init__(self, port: int, n: int, every: float):
        self.started = time.monotonic()
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
        for s in self.socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, args=(every,), daemon=True)
        self._thread.start()

    def _trickle(self, every: float) -> None:
        line = 0
        while not self._stop.wait(every):
            line += 1
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow-%d: x\r\n" % line)

    def still_waiting(self) -> int:
        """How many the server has neither answered nor closed."""
        waiting = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                waiting += 1
            except OSError:
                pass
            finally:
                s.setblocking(True)
        return waiting

    def answers(self, timeout: float) -> list[tuple[float, bytes]]:
        """Stop trickling; each connection's (seconds from the start until closed, what it got)."""
        self._stop.set()
        self._thread.join()
        out = []
        for s in self.socks:
            s.settimeout(timeout)
            data = read_until_closed(s)
            out.append((time.monotonic() - self.started, data))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def non_reading_stream(port: int, max_tokens: int) -> socket.socket:
    """POST /generate with stream: true from a client that never reads its answer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its window fills and stays shut
    s.connect(("127.0.0.1", port))
    s.sendall(post_generate({"prompt": "KING:", "max_tokens": max_tokens, "stream": True}))
    return s


def post_generate(body: dict[str, object], close: bool = False) -> bytes:
    """A raw POST /generate request."""
    raw = json.dumps(body).encode()
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    return head.encode() + (b"Connection: close\r\n" if close else b"") + b"\r\n" + raw


def response_head(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer to the end (error answers close): status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = read_until_closed(s)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def post_tiny(stack: Stack) -> requests.Response:
    return requests.post(f"{stack.base}/generate", json={"prompt": "A", "max_tokens": 5}, timeout=10)


def timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def assert_json_error(body: bytes, code: str) -> None:
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and "details" in error, error


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
]


# ---- the stack: nginx in front of two replicas -----------------------------------------------


@pytest.fixture(scope="module")
def stack(char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack({"MODEL_DIR": str(char_lm_dir), **FAST}, tmp_path_factory.mktemp("stack") / "stack.log")
    yield s
    s.stop()
    s.kill_leftovers()


def test_slow_and_non_reading_clients_do_not_starve_the_stack(stack: Stack) -> None:
    slow = SlowHeaders(stack.port, SLOW_CLIENTS, every=2.0)
    streams = [non_reading_stream(stack.port, 2048) for _ in range(NON_READING_STREAMS)]
    body: dict[str, Any] = {"prompt": "ROMEO:\n", "max_tokens": 10}
    try:
        time.sleep(1.0)  # the streams are generating into windows nobody reads; the slow trickle on
        for _ in range(3):
            health, health_s = timed(lambda: requests.get(f"{stack.base}/health", timeout=10))
            gen, gen_s = timed(lambda: requests.post(f"{stack.base}/generate", json=body, timeout=10))
            assert health.status_code == 200 and gen.status_code == 200, (health.text, gen.text)
            assert gen.json()["usage"]["completion_tokens"] == 10
            assert health_s < 1.0 and gen_s < 1.0, f"/health {health_s:.2f} s, /generate {gen_s:.2f} s"
        assert slow.still_waiting() == SLOW_CLIENTS  # the attack lasted as long as the probes
    finally:
        slow.close()
    # every non-reading stream was taken, not turned away: each answer starts as a 200 stream
    for s in streams:
        head = response_head(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head


def test_every_response_names_its_replica_and_both_serve(stack: Stack) -> None:
    seen = [requests.get(f"{stack.base}/health", timeout=10).headers["X-Replica"] for _ in range(20)]
    assert set(seen) == {"replica-1", "replica-2"}
    for name, url in stack.replicas.items():  # each on its own loopback port, past nginx
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(f"{url}/health", timeout=10).headers["X-Replica"] == name
    gen = requests.post(f"{stack.base}/generate", json={"prompt": "A", "max_tokens": 3}, timeout=10)
    missing = requests.get(f"{stack.base}/sessions/no-such-session", timeout=10)
    assert missing.status_code == 404
    for r in (gen, missing):
        assert r.headers["X-Replica"] in {"replica-1", "replica-2"}


def test_an_oversized_body_gets_the_json_413(stack: Stack) -> None:
    too_big = b"{" + b" " * (2 << 20)  # MAX_BODY_BYTES (2 MiB) + 1
    r = requests.post(f"{stack.base}/generate", data=too_big, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and r.headers["Content-Type"] == "application/json"
    assert_json_error(r.content, "body_too_large")
    # chunked: no Content-Length to refuse up front, nginx counts as it reads
    chunks = iter([b" " * 65536] * 33)
    r = requests.post(f"{stack.base}/score", data=chunks, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert_json_error(r.content, "body_too_large")


@pytest.mark.parametrize("raw, status, code", MALFORMED, ids=["400", "414", "431"])
def test_nginx_answers_its_own_errors_in_json(stack: Stack, raw: bytes, status: int, code: str) -> None:
    got, headers, body = exchange(stack.port, raw)
    assert got == status and headers["content-type"] == "application/json"
    assert_json_error(body, code)


def test_the_access_log_of_nginx_never_holds_a_whole_session_id(stack: Stack) -> None:
    sid = requests.post(f"{stack.base}/sessions", json={"text": "ROMEO:"}, timeout=10).json()["session_id"]
    assert requests.post(f"{stack.base}/sessions/{sid}/fork", timeout=10).status_code == 201
    logs = [stack.runtime / "nginx.log", stack.runtime / "replica-1.log", stack.runtime / "replica-2.log"]
    wait_until(lambda: f"/sessions/{sid[:4]}.../fork" in logs[0].read_text(), 10, "nginx's access line")
    wait_until(lambda: any(f"/sessions/{sid[:4]}.../fork" in p.read_text() for p in logs[1:]), 10, "gunicorn's")
    for path in logs:
        assert sid not in path.read_text(), path


# ---- one replica whose worker has 9 threads, 8 of them reserved: one generation at a time -----


@pytest.fixture(scope="module")
def one(char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"MODEL_DIR": str(char_lm_dir), **FAST, "GUNICORN_THREADS": "9", "STACK_RESERVED_THREADS": "8"}
    s = Stack({**env, "MAX_TOKENS_LIMIT": "1000000"}, tmp_path_factory.mktemp("one") / "stack.log", replicas=1)
    yield s
    s.stop()
    s.kill_leftovers()


def test_a_stream_arrives_token_by_token_through_nginx(one: Stack) -> None:
    (worker,) = child_pids(one.named_pids()["replica-1"])
    request = post_generate({"prompt": "KING:", "max_tokens": 20_000, "stream": True}, close=True)
    with socket.create_connection(("127.0.0.1", one.port), timeout=30) as s:
        # as a browser's EventSource would: a proxy that compressed the stream would also hold it back
        s.sendall(request.replace(b"\r\n\r\n", b"\r\nAccept-Encoding: gzip\r\n\r\n", 1))
        data = b""
        while b"data: " not in data and (chunk := s.recv(65536)):
            data += chunk
        assert b"data: " in data, data[:300]  # the first event
        os.kill(worker, signal.SIGSTOP)  # the replica stops, 20,000 tokens from done
        try:
            s.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while chunk := s.recv(65536):  # whatever was on its way, until a second of silence
                    data += chunk
        finally:
            os.kill(worker, signal.SIGCONT)
        on_the_way = data.count(b"data: ")
        s.settimeout(30)
        data += read_until_closed(s)
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"text/event-stream" in head.lower() and b"content-encoding" not in head.lower()
    # the first events came while the replica was still generating: not all at once at the end
    assert 1 <= on_the_way < 20_000
    events = dechunked(body)  # nginx's chunks can split an event anywhere
    assert events.count(b"data: ") == 20_001 and b'"finish_reason"' in events


def dechunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body without its framing (the last chunk has size 0)."""
    out, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def test_generations_never_take_the_threads_kept_for_the_rest(one: Stack) -> None:
    hog = non_reading_stream(one.port, 1_000_000)  # takes the one generation slot and keeps it
    try:
        # its answer has begun before anything else asks: a probe sent at once could win the slot
        # and the hog be the one turned away (seen on a slow host)
        assert response_head(hog).startswith(b"HTTP/1.1 200")
        wait_until(lambda: post_tiny(one).status_code == 503, 10, "the hog to take the generation slot")
        busy = post_tiny(one)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert_json_error(busy.content, "overloaded")
        assert requests.get(f"{one.base}/health", timeout=5).status_code == 200  # the reserve
        assert requests.post(f"{one.base}/tokenize", json={"text": "abc"}, timeout=5).status_code == 200
    finally:
        hog.close()
    # the slot comes back as soon as its client is gone
    wait_until(lambda: post_tiny(one).status_code == 200, 15, "the generation slot to come back")


def test_sigterm_stops_everything_the_stack_started(one: Stack) -> None:
    started = one.pids()
    named = one.named_pids()
    assert set(named) == {"redis", "replica-1", "nginx"} and set(named.values()) <= started
    assert len(started) >= 5  # redis, gunicorn master and worker, nginx master and worker(s)
    assert one.stop(signal.SIGTERM) == 0
    assert not one.pids(), f"left running: {one.pids()}"
    assert not one.runtime.exists()
    assert "stopped" in one.output()


def test_stack_says_how_to_install_nginx_when_it_is_missing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # the tools stack.sh needs before it looks for nginx, and no nginx
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "grep", "id", "mktemp"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "stack.sh")],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "nginx was not found" in out.stderr
    assert "sudo apt-get install nginx" in out.stderr and "brew install nginx" in out.stderr


# ---- the bare Procfile gunicorn, without a proxy ---------------------------------------------

HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def bare(char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(  # the embedded store: no REDIS_URL
        char_lm_dir,
        tmp_path_factory.mktemp("bare"),
        **FAST,
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="4",
        HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        BODY_TIMEOUT_SECONDS="2",
        SEND_TIMEOUT_SECONDS="2",
        MAX_TOKENS_LIMIT="1000000",
        LOG_LEVEL="INFO",  # the tests read its access lines
    ) as g:
        yield g


def test_bare_gunicorn_cuts_off_slow_headers_after_the_read_timeout(bare: Gunicorn) -> None:
    slow = SlowHeaders(bare.port, 4, every=0.3)  # as many as the worker has threads
    try:
        # queued behind them: it is answered once the header deadline has freed a thread
        health = requests.get(f"{bare.base}/health", timeout=HEADER_TIMEOUT + 10)
        assert health.status_code == 200
        answers = slow.answers(timeout=HEADER_TIMEOUT + 5)
    finally:
        slow.close()
    for seconds, data in answers:
        assert HEADER_TIMEOUT - 0.1 <= seconds <= HEADER_TIMEOUT + 3, seconds  # not early, not never
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"Content-Type: application/json" in head, data
        assert_json_error(body, "request_timeout")


def test_bare_gunicorn_cuts_off_a_slow_body(bare: Gunicorn) -> None:
    head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", bare.port), timeout=10) as s:
        s.sendall(head + b"{")
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(40):  # a byte every 0.25 s: never an idle gap, never done
                time.sleep(0.25)
                s.sendall(b" ")
        data = read_until_closed(s)
    assert time.monotonic() - start < 8
    status, _, body = data.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), data
    assert_json_error(body.partition(b"\r\n\r\n")[2], "request_timeout")


def test_bare_gunicorn_drops_a_client_that_stops_reading(bare: Gunicorn) -> None:
    s = non_reading_stream(bare.port, 1_000_000)
    try:
        wait_until(lambda: "took no response bytes for 2 s" in bare.log.read_text(), 30, "the send timeout")
        s.settimeout(10)
        data = read_until_closed(s)  # what the windows held, then the end: the server closed it
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200") and b"data: " in data
    assert b"finish_reason" not in data  # cut off long before its million tokens
    assert requests.get(f"{bare.base}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("raw, status, code", MALFORMED, ids=["400", "414", "431"])
def test_bare_gunicorn_answers_its_own_errors_in_json(bare: Gunicorn, raw: bytes, status: int, code: str) -> None:
    got, headers, body = exchange(bare.port, raw)
    assert got == status and headers["content-type"] == "application/json" and headers["x-replica"]
    assert_json_error(body, code)


def test_bare_gunicorn_access_log_never_holds_a_whole_session_id(bare: Gunicorn) -> None:
    sid = requests.post(f"{bare.base}/sessions", json={"text": "ROMEO:"}, timeout=10).json()["session_id"]
    assert requests.get(f"{bare.base}/sessions/{sid}", timeout=10).status_code == 200
    assert requests.post(f"{bare.base}/sessions/{sid}/fork", timeout=10).status_code == 201
    assert requests.delete(f"{bare.base}/sessions/{sid}", timeout=10).status_code == 204
    wait_until(lambda: f'"DELETE /sessions/{sid[:4]}... HTTP/1.1" 204' in bare.log.read_text(), 10, "the access line")
    log = bare.log.read_text()
    assert f'"POST /sessions/{sid[:4]}.../fork HTTP/1.1" 201' in log
    assert sid not in log and sid[4:] not in log
