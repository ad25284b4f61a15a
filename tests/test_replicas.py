"""Replicas that share everything through Redis: scripts/stack.sh with three Procfile replicas (one
worker each) behind nginx and one private Redis, on the tiny real model.

A request is pinned to a chosen replica by calling its loopback port directly (stack.replicas), or
sent through nginx and followed by the X-Replica header that names who answered. The kill test
comes last: it leaves the stack whole again (stack.sh restarts the replica), but with new pids.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from servers import Stack, wait_until

FAST = {"TORCH_THREADS": "1", "BLAS_THREADS": "1"}  # busy-waiting BLAS threads collapse on shared cores
NAMES = ("replica-1", "replica-2", "replica-3")
PARTS = [  # texts every replica sees the same way: characters of the tiny model's vocabulary
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
    "All:\nResolved. resolved.\n\n",
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n",
]
LONG = 20_000  # tokens: a stream that is still running while the test does something else
MARK = b'data: {"token"'


@pytest.fixture(scope="module")
def stack(char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"MODEL_DIR": str(char_lm_dir), **FAST, "MAX_TOKENS_LIMIT": str(LONG)}
    s = Stack(env, tmp_path_factory.mktemp("replicas") / "stack.log", replicas=3)
    assert sorted(s.replicas) == list(NAMES)
    yield s
    s.stop()
    s.kill_leftovers()


# ---- helpers ---------------------------------------------------------------------------------


def call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.request(method, base + path, json=body, timeout=30)


def create(base: str, text: str) -> tuple[str, int]:
    r = call(base, "POST", "/sessions", {"text": text})
    assert r.status_code == 201, r.text
    return r.json()["session_id"], r.json()["tokens"]


def session_tokens(base: str, session_id: str) -> int:
    r = call(base, "GET", f"/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return int(r.json()["tokens"])


def distribution(base: str, text: str = "", session_id: str | None = None) -> dict[str, Any]:
    """The whole next-token distribution (a peek: commit false, top_n 0) after session + text."""
    body: dict[str, Any] = {"text": text, "top_n": 0, "commit": False}
    if session_id is not None:
        body["session_id"] = session_id
    r = call(base, "POST", "/next", body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_same_distribution(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert [t["id"] for t in got["next"]] == [t["id"] for t in want["next"]]
    worst = max(abs(a["logprob"] - b["logprob"]) for a, b in zip(got["next"], want["next"], strict=True))
    assert worst <= 1e-4, f"logprobs differ by up to {worst:.2e}"


class Stream:
    """One streamed /generate read by a thread of its own: each read's arrival and the token events
    counted so far, and how it ended (its final event, or cut before it)."""

    def __init__(self, base: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        url = urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        headers = {"Content-Type": "application/json", **(headers or {})}
        self.conn.request("POST", "/generate", json.dumps({**body, "stream": True}), headers)
        self.response = self.conn.getresponse()  # the headers: the session has been read by now
        assert self.response.status == 200, self.response.read()
        self.replica = self.response.getheader("X-Replica")
        self.reads: list[tuple[float, int]] = []  # (arrival, token events so far)
        self.tokens = 0
        self.data = b""
        self.cut = False  # the connection broke before the response ended
        self.first_token = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        tail = b""
        try:
            while chunk := self.response.read1(65536):  # what arrived, de-chunked
                self.tokens += (tail + chunk).count(MARK)  # tail < MARK: every match is new
                tail = chunk[-(len(MARK) - 1) :]
                self.data += chunk
                self.reads.append((time.monotonic(), self.tokens))
                if self.tokens:
                    self.first_token.set()
        except (OSError, http.client.HTTPException):
            self.cut = True
        finally:
            self.conn.close()
            self.done.set()

    def final(self, timeout: float = 60) -> dict[str, Any] | None:
        """Wait for the end: its final event (a summary or an error), or None if it was cut."""
        assert self.done.wait(timeout), "the stream did not end"
        last = self.data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        if self.cut or not last.startswith(b"data: "):
            return None
        try:
            event = json.loads(last[len(b"data: ") :])
        except ValueError:
            return None
        return None if "token" in event else dict(event)


# ---- a session moves between replicas -------------------------------------------------------


def test_a_session_continues_exactly_on_any_replica(stack: Stack) -> None:
    r1, r2, r3 = (stack.replicas[name] for name in NAMES)
    created = call(r1, "POST", "/sessions", {"text": PARTS[0]})
    assert created.status_code == 201 and created.headers["X-Replica"] == "replica-1"
    sid, tokens = created.json()["session_id"], created.json()["tokens"]
    text = PARTS[0]

    # replica-2: append with /next commit
    r = call(r2, "POST", "/next", {"session_id": sid, "text": PARTS[1], "commit": True, "top_n": 1})
    assert r.status_code == 200 and r.headers["X-Replica"] == "replica-2", r.text
    text, tokens = text + PARTS[1], tokens + r.json()["tokens_processed"]

    # replica-3: a sampled generation
    body = {"session_id": sid, "prompt": PARTS[2], "max_tokens": 40, "temperature": 0.8, "seed": 3}
    r = call(r3, "POST", "/generate", body)
    assert r.status_code == 200 and r.headers["X-Replica"] == "replica-3", r.text
    usage = r.json()["usage"]
    assert usage["session_tokens"] == tokens + usage["prompt_tokens"] + usage["completion_tokens"]
    text, tokens = text + PARTS[2] + r.json()["text"], usage["session_tokens"]

    # through nginx: /score with commit, wherever nginx sends it
    r = call(stack.base, "POST", "/score", {"session_id": sid, "text": PARTS[3], "commit": True})
    assert r.status_code == 200, r.text
    via = r.headers["X-Replica"]
    text, tokens = text + PARTS[3], tokens + r.json()["num_tokens"]

    # a stream pinned to a replica nginx did not pick
    other = next(name for name in NAMES if name != via)
    stream = Stream(stack.replicas[other], {"session_id": sid, "prompt": PARTS[4], "max_tokens": 30, "seed": 4})
    final = stream.final()
    assert final is not None and "error" not in final and stream.replica == other, final
    n = len(PARTS[4])  # characters: one token each
    assert final["usage"] == {"prompt_tokens": n, "completion_tokens": 30, "session_tokens": tokens + n + 30}
    text, tokens = text + PARTS[4] + final["text"], final["usage"]["session_tokens"]

    # every replica, and nginx, sees the same session: its token count and its distribution, equal
    # to feeding the whole text at once
    whole = distribution(r2, text)
    assert whole["tokens_processed"] == tokens
    for base in (r1, r2, r3, stack.base):
        assert session_tokens(base, sid) == tokens
        assert_same_distribution(distribution(base, session_id=sid), whole)
    after = "Second Citizen:\n"  # the same with new text on top (still a peek)
    assert_same_distribution(distribution(r3, after, sid), distribution(r1, text + after))
    assert session_tokens(stack.base, sid) == tokens  # the peeks changed nothing


# ---- races: compare-and-set across replicas -------------------------------------------------


def test_a_commit_on_one_replica_beats_a_stream_on_another(stack: Stack) -> None:
    sid, tokens = create(stack.replicas["replica-3"], PARTS[0])
    # A, through nginx, reads the session at version v and streams for a while ...
    a = Stream(stack.base, {"session_id": sid, "max_tokens": LONG, "temperature": 0.8, "seed": 1})
    assert a.first_token.wait(30)
    # ... while B, on another replica, commits on top of the same version v
    b_name = next(name for name in NAMES if name != a.replica)
    b = call(stack.replicas[b_name], "POST", "/next", {"session_id": sid, "text": "abc", "commit": True})
    assert b.status_code == 200 and b.headers["X-Replica"] == b_name, b.text
    final = a.final()
    assert final is not None and final.get("error", {}).get("code") == "session_conflict", final
    assert a.tokens == LONG  # A streamed everything, and saved none of it
    # the session holds exactly B's tokens, on every replica
    for name in NAMES:
        assert session_tokens(stack.replicas[name], sid) == tokens + 3
    assert_same_distribution(distribution(stack.base, session_id=sid), distribution(stack.base, PARTS[0] + "abc"))


def test_many_writers_on_three_replicas_lose_nothing(stack: Stack) -> None:
    sid, start = create(stack.replicas["replica-1"], PARTS[0])
    writers = [(name, w) for w in range(4) for name in NAMES]  # 12 writers, 4 per replica

    def write(name: str, w: int) -> list[tuple[int, str, dict[str, Any]]]:
        out = []
        prompt = "ABCDEFGHIJKL"[w * 3 + NAMES.index(name)] + ":\n"  # tells the writers apart
        for k in range(6):
            body = {"session_id": sid, "prompt": prompt, "max_tokens": 20, "temperature": 0.8, "seed": 100 * w + k}
            r = call(stack.replicas[name], "POST", "/generate", body)
            out.append((r.status_code, prompt, r.json()))
        return out

    with ThreadPoolExecutor(len(writers)) as pool:
        results = [x for batch in pool.map(lambda nw: write(*nw), writers) for x in batch]
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 409}, statuses
    assert all(body["error"]["code"] == "session_conflict" for status, _, body in results if status == 409)
    wins = sorted(((b["usage"]["session_tokens"], p, b) for s, p, b in results if s == 200), key=lambda w: w[0])
    assert wins and statuses.count(409), f"no real race: {statuses.count(200)} x 200, {statuses.count(409)} x 409"
    assert len({w[0] for w in wins}) == len(wins), "two writers saved over the same version: an update was lost"
    # the winners form one chain: each started from the state the previous one saved
    text, tokens = PARTS[0], start
    for session_tokens_after, prompt, body in wins:
        usage = body["usage"]
        assert session_tokens_after - usage["prompt_tokens"] - usage["completion_tokens"] == tokens
        text, tokens = text + prompt + body["text"], session_tokens_after
    added = sum(b["usage"]["prompt_tokens"] + b["usage"]["completion_tokens"] for _, _, b in wins)
    assert tokens == start + added == session_tokens(stack.base, sid)
    assert_same_distribution(distribution(stack.base, session_id=sid), distribution(stack.base, text))


# ---- streaming through nginx -----------------------------------------------------------------


def test_sse_through_nginx_arrives_token_by_token(stack: Stack) -> None:
    # as a browser's EventSource would ask: a proxy that compressed the stream would hold it back
    # 1,000 tokens: the service writes a stream's tokens every STREAM_FLUSH_MS (25 ms) after the
    # first, so the stream must last several of those for its reads to show it arriving
    body = {"prompt": "KING:", "max_tokens": 1000, "temperature": 0.8, "seed": 9}
    s = Stream(stack.base, body, {"Accept-Encoding": "gzip"})
    assert s.response.getheader("Content-Type", "").startswith("text/event-stream")
    assert s.response.getheader("Content-Encoding") is None
    final = s.final()
    assert final is not None and final["finish_reason"] == "length" and s.tokens == 1000, final
    counts = [n for _, n in s.reads]
    partial = sorted({n for n in counts if 0 < n < 1000})  # reads that came while it was generating
    first = next(i for i, n in enumerate(counts) if n)
    assert len(partial) >= 3, f"token events arrived in {len(set(counts))} reads: {counts}"
    assert counts[first] <= 100, f"the first read already held {counts[first]} of 1000 events"


# ---- a replica killed mid-stream (last: the stack comes back with a new replica-1) ----------


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for stack.sh to reap it: either way its sockets are closed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def close_waits(port: int) -> int:
    """Sockets on this host still open though their peer, 127.0.0.1:port, has closed (CLOSE_WAIT)."""
    peer = f"0100007F:{port:04X}"  # /proc/net/tcp: address little-endian, port big-endian, in hex
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[2] == peer and row[3] == "08")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="watches the dead replica's sockets through /proc")
def test_a_replica_killed_mid_stream_costs_only_its_own_requests(stack: Stack) -> None:
    victim, r2, r3 = (stack.replicas[name] for name in NAMES)
    # sessions made on the victim before it dies; one of them is streaming when it does
    kept, kept_tokens = create(victim, PARTS[0])
    streaming, streaming_tokens = create(victim, PARTS[1])
    others = {name: create(stack.replicas[name], PARTS[2]) for name in NAMES[1:]}
    sampled = {"temperature": 0.8, "seed": 5}
    doomed = [
        Stream(victim, {"session_id": streaming, "max_tokens": LONG, **sampled}),
        Stream(victim, {"prompt": "KING:", "max_tokens": LONG, **sampled}),
    ]
    # the others: long enough to be in flight at the kill, and they must all end well
    survivors = [
        Stream(stack.replicas[name], {"session_id": sid, "max_tokens": LONG, **sampled})
        for name, (sid, _) in others.items()
    ]
    via_nginx = [Stream(stack.base, {"prompt": "KING:", "max_tokens": LONG, **sampled}) for _ in range(3)]
    for s in doomed + survivors + via_nginx:
        assert s.first_token.wait(30)
    pids = stack.replica_pids("replica-1")
    assert len(pids) == 2  # gunicorn's master and its one worker
    for pid in pids:  # the master first: it cannot start a new worker
        os.kill(pid, signal.SIGKILL)
    in_flight = [not s.done.is_set() for s in survivors + via_nginx]

    # New requests: those nginx gets once the replica is gone (its processes dead) and nginx has
    # let go of every connection the dead replica closed. Before that, nginx may send a POST on one
    # of its kept-alive connections to the dying replica: the POST fails with 502, since nginx never
    # sends a POST twice (it may have run). GETs are retried on another replica.
    wait_until(lambda: all(dead(pid) for pid in pids), 10, "the killed processes to be gone")
    wait_until(lambda: close_waits(stack.replica_port("replica-1")) == 0, 10, "nginx to drop its connections")
    # all answered, by the others (or by replica-1 once stack.sh has restarted it: never by the
    # processes just killed)
    answers = []
    for i in range(30):
        if i % 3 == 0:
            r = call(stack.base, "POST", "/generate", {"prompt": "KING:", "max_tokens": 5})
        elif i % 3 == 1:
            r = call(stack.base, "POST", "/next", {"session_id": kept, "text": "x"})
        else:
            r = call(stack.base, "GET", f"/sessions/{kept}")
        answers.append((r.status_code, r.headers.get("X-Replica"), int(r.headers.get("X-Worker-Pid", 0))))
    assert all(status == 200 for status, _, _ in answers), answers
    assert not {pid for _, _, pid in answers} & set(pids)

    # the victim's own streams were cut; every other stream ends with its final event
    for s in doomed:
        assert s.final() is None and s.tokens < LONG
    assert all(in_flight), "a survivor had finished before the kill: the test proved nothing"
    for s in survivors + via_nginx:
        final = s.final()
        if s in via_nginx and s.replica == "replica-1":  # nginx had put it on the victim
            assert final is None
            continue
        assert final is not None and final.get("finish_reason") == "length" and s.tokens == LONG, (s.replica, final)
    for name, (sid, tokens) in others.items():
        assert session_tokens(stack.replicas[name], sid) == tokens + LONG

    # the victim's sessions live on: the streamed one is as it was before its stream (nothing of a
    # cut stream is saved), and both continue exactly on the others
    assert session_tokens(r2, kept) == kept_tokens
    assert session_tokens(r3, streaming) == streaming_tokens
    r = call(r2, "POST", "/next", {"session_id": streaming, "text": PARTS[3], "commit": True})
    assert r.status_code == 200, r.text
    assert session_tokens(r3, streaming) == streaming_tokens + len(PARTS[3])
    assert_same_distribution(distribution(r3, session_id=streaming), distribution(r2, PARTS[1] + PARTS[3]))
    assert_same_distribution(distribution(r3, session_id=kept), distribution(r2, PARTS[0]))

    # and stack.sh brings replica-1 back
    wait_until(lambda: call(victim, "GET", "/ready").status_code == 200, 90, "replica-1 to be restarted")
    assert not set(stack.replica_pids("replica-1")) & set(pids)
    assert call(victim, "GET", "/health").headers["X-Replica"] == "replica-1"
