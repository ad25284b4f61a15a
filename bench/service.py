"""The service for real: gunicorn (the Procfile command) + a private Redis, over loopback.

- continuation cost: /next on a session holding 10 tokens vs 10,000 tokens, vs a stateless
  request that re-sends the 10,000 tokens;
- one worker with default settings: batch-1 /generate over HTTP, and the latency of short
  requests (/generate of 10 tokens, /next on a session) against /health;
- load (WORKERS workers): 1, 8, 32, 64 concurrent clients streaming /generate, each continuing
  its own session: aggregate tokens/s, time to the first token, time per request, errors;
- memory: RSS per worker, Redis bytes per session.

    python -m bench.service [--checkpoint DIR] [--workers 1] [--clients 1,8,32,64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from model import load
from model.engine import Engine

from .common import DEFAULT_CHECKPOINT, ROOT, process_memory_mb, save, set_threads, table
from .decode import stream_baselines
from .load import run_load
from servers import Gunicorn, RedisServer  # noqa: I001 - on sys.path via .common


def _post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(base + path, json=body, timeout=120)
    r.raise_for_status()
    return dict(r.json())


def continuation(base: str, repeats: int = 50) -> dict[str, Any]:
    corpus = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    long_text = corpus[:10_000]
    short = _post(base, "/sessions", {"text": corpus[:10]})
    long = _post(base, "/sessions", {"text": long_text})
    http_session = requests.Session()  # keep-alive: measure the service, not TCP setup

    def median_ms(body: dict[str, Any]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            http_session.post(base + "/next", json=body, timeout=120).raise_for_status()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    peek = {"text": "a", "top_n": 5, "commit": False}
    short_ms = median_ms({**peek, "session_id": short["session_id"]})
    long_ms = median_ms({**peek, "session_id": long["session_id"]})
    resend_ms = median_ms({"text": long_text + "a", "top_n": 5})
    return {
        "session_10_tokens_ms": short_ms,
        "session_10000_tokens_ms": long_ms,
        "stateless_resend_10000_tokens_ms": resend_ms,
        "long_vs_short": long_ms / short_ms,
        "resend_vs_session": resend_ms / long_ms,
        "session_tokens": [short["tokens"], long["tokens"]],
    }


def memory(server: Gunicorn, redis: RedisServer) -> dict[str, Any]:
    rss = [mb for pid in server.worker_pids() if (mb := process_memory_mb(pid)) is not None]
    client = redis.client()
    keys = list(client.scan_iter(match="lstm-lm:*:session:*", count=1000))
    per_key = [int(client.memory_usage(k) or 0) for k in keys[:200]]
    return {
        "worker_rss_mb": rss,
        "redis_bytes_per_session": statistics.median(per_key) if per_key else None,
        "sessions_sampled": len(per_key),
    }


def _timed_ms(conn: http.client.HTTPConnection, method: str, path: str, body: dict[str, Any] | None) -> float:
    """Wall time of one request on a kept-alive connection, in ms."""
    payload = None if body is None else json.dumps(body)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    start = time.perf_counter()
    conn.request(method, path, payload, headers)
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - start
    if resp.status >= 400:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}")
    return 1000 * elapsed


Request = tuple[str, str, dict[str, Any] | None]


def _median_ms(conn: http.client.HTTPConnection, method: str, path: str, body: dict[str, Any] | None, n: int) -> float:
    """Median wall time of n sequential requests on one kept-alive connection."""
    return _interleaved_ms(conn, {"only": (method, path, body)}, n, rounds=1)["only"]


def _interleaved_ms(
    conn: http.client.HTTPConnection, requests_: dict[str, Request], n: int, rounds: int = 3
) -> dict[str, float]:
    """Median ms of each request over n sends, made in `rounds` rounds that send each request
    n / rounds times in a row, in turn: requests compared with each other meet the same stretches
    of a shared machine's noise (in one block each, a noisy minute landed on one of them), while
    each is still timed in a run of its own kind. Sent one by one in turn instead, /health came
    out ~50% slower after each heavier request, which flattered every ratio to it."""
    times: dict[str, list[float]] = {name: [] for name in requests_}
    for method, path, body in requests_.values():  # warm-up
        for _ in range(10):
            _timed_ms(conn, method, path, body)
    for _ in range(rounds):
        for name, (method, path, body) in requests_.items():
            times[name] += [_timed_ms(conn, method, path, body) for _ in range(-(-n // rounds))]
    return {name: statistics.median(t) for name, t in times.items()}


def _batch1_ms(conn: http.client.HTTPConnection, tokens: int) -> float:
    body = {"prompt": "ROMEO:\n", "max_tokens": tokens, "temperature": 1.0}
    return _median_ms(conn, "POST", "/generate", body, 5)


def one_thread_rate(env: dict[str, str], log: Path, tokens: int) -> float:
    """Batch-1 /generate tokens/s of one worker held to one BLAS and one torch thread: what the
    default (threads per worker = cores / workers) is chosen against."""
    server = Gunicorn({**env, "WEB_CONCURRENCY": "1", "BLAS_THREADS": "1", "TORCH_THREADS": "1"}, log)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        rate = tokens / (_batch1_ms(conn, tokens) / 1000)
        conn.close()
        return rate
    finally:
        server.stop()


def single_worker(base: str, port: int, tokens: int) -> dict[str, Any]:
    """One worker with default settings: batch-1 rate over HTTP, and short-request latencies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    gen_ms = _batch1_ms(conn, tokens)
    sid = _post(base, "/sessions", {"text": "ROMEO:\n"})["session_id"]
    short = _interleaved_ms(
        conn,
        {
            "health_ms": ("GET", "/health", None),
            "generate_10_tokens_ms": ("POST", "/generate", {"prompt": "ROMEO:", "max_tokens": 10}),
            "next_session_ms": ("POST", "/next", {"session_id": sid, "text": "a"}),
        },
        300,
    )
    conn.close()
    stream = run_load(port, 1, 10, tokens, warmup=1.0)
    return {
        "generate_tokens": tokens,
        "generate_tokens_per_second": tokens / (gen_ms / 1000),
        "stream_tokens_per_second": stream["aggregate_tokens_per_second"],
        **short,
        "continuation": continuation(base),
    }


TARGET_CLIENTS = 32  # the load the stream targets are set at


def _load_with_baselines(port: int, checkpoint: Path, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """run_load, with the in-process figures the stream targets divide by measured just before and
    just after it (the server idle): a ratio of figures taken minutes apart on a shared machine
    measured the noise between them (the naive loop once came out at 190 tokens/s, not ~500)."""
    lm = load(checkpoint)
    engine = Engine(lm.model)
    before = stream_baselines(lm, engine, 2000)
    result = run_load(port, clients, seconds, max_tokens)
    after = stream_baselines(lm, engine, 2000)
    result["baselines"] = {k: {"before": before[k], "after": after[k]} for k in before}
    return result


def baseline(load_run: dict[str, Any], name: str) -> float | None:
    """The higher of a baseline's before and after figures, or None when the run has none. Noise
    only ever slows a run down, so the higher is the nearer to the quiet machine's figure, and
    as the denominator of an at-least target it is the stricter of the two."""
    b = load_run.get("baselines", {}).get(name)
    return None if b is None else max(b["before"], b["after"])


def run(
    checkpoint: Path,
    workers: int,
    clients: list[int],
    seconds: float,
    max_tokens: int,
    batch1_tokens: int = 2000,
    threads: int = 2,
) -> dict[str, Any]:
    """`threads`: the budget of the in-process baselines measured beside the 32-stream load."""
    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-"))
    redis = RedisServer(tmp)
    base_env = {"MODEL_DIR": str(checkpoint), "REDIS_URL": redis.url, "LOG_LEVEL": "WARNING"}
    try:
        server = Gunicorn({**base_env, "WEB_CONCURRENCY": "1"}, tmp / "gunicorn-1.log")  # default settings
        try:
            single = single_worker(server.base, server.port, batch1_tokens)
        finally:
            server.stop()
        single["generate_tokens_per_second_one_thread"] = one_thread_rate(
            base_env, tmp / "gunicorn-t1.log", batch1_tokens
        )
        env = {**base_env, "WEB_CONCURRENCY": str(workers), "GUNICORN_THREADS": str(max(clients) + 8)}
        server = Gunicorn(env, tmp / "gunicorn.log")
        try:
            set_threads(threads)
            runs = [
                _load_with_baselines(server.port, checkpoint, n, seconds, max_tokens)
                if n == TARGET_CLIENTS
                else run_load(server.port, n, seconds, max_tokens)
                for n in clients
            ]
            mem = memory(server, redis)
        finally:
            server.stop()
    finally:
        redis.stop()
    return {
        "checkpoint": str(checkpoint),
        "workers": workers,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "single_worker": single,
        "continuation": single["continuation"],
        "load": runs,
        "memory": mem,
    }


def report(r: dict[str, Any], naive_tokens_per_second: float | None = None) -> str:
    one = r["single_worker"]
    text = table(
        ["one worker, default settings", "figure"],
        [
            [
                f"/generate of {one['generate_tokens']} tokens (temperature 1), tokens/s",
                one["generate_tokens_per_second"],
            ],
            ["the same streamed (SSE), tokens/s", one["stream_tokens_per_second"]],
            [
                "the same, not streamed, with 1 BLAS thread instead of the default",
                one["generate_tokens_per_second_one_thread"],
            ],
            ["GET /health, median ms", one["health_ms"]],
            ["/generate of 10 tokens, median ms", one["generate_10_tokens_ms"]],
            ["/next on a session (Redis), median ms", one["next_session_ms"]],
        ],
    )
    text += (
        f"\n\n/generate of 10 tokens = {one['generate_10_tokens_ms'] / one['health_ms']:.1f}x /health; "
        f"/next on a session = {one['next_session_ms'] / one['health_ms']:.1f}x /health\n\n"
    )
    c = r["continuation"]
    text += table(
        ["/next (1 new token, peek)", "median ms"],
        [
            ["session holding 10 tokens", c["session_10_tokens_ms"]],
            ["session holding 10,000 tokens", c["session_10000_tokens_ms"]],
            ["stateless, re-sending 10,000 tokens", c["stateless_resend_10000_tokens_ms"]],
        ],
    )
    text += (
        f"\n\n10,000-token session = {c['long_vs_short']:.2f}x a 10-token one; "
        f"re-sending costs {c['resend_vs_session']:.0f}x the session request\n\n"
    )
    single = r["load"][0]["aggregate_tokens_per_second"]
    rows = []
    for x in r["load"]:
        row = [x["clients"], x["aggregate_tokens_per_second"], f"{x['aggregate_tokens_per_second'] / single:.1f}x"]
        if naive_tokens_per_second:  # the row's own baseline where it has one, as the targets use
            naive = baseline(x, "naive") or naive_tokens_per_second
            row.append(f"{x['aggregate_tokens_per_second'] / naive:.1f}x")
        row += [
            x["first_token_ms_p50"],
            x["first_token_ms_p99"],
            x["per_request_s_p50"],
            x["per_request_s_p99"],
            x["errors"],
        ]
        rows.append(row)
    headers = ["streaming clients", "tokens/s", "vs 1 client"] + (["vs naive loop"] if naive_tokens_per_second else [])
    headers += ["first token ms p50", "first token ms p99", "s/request p50", "s/request p99", "errors"]
    text += table(headers, rows)
    for x in r["load"]:
        if "baselines" in x:
            b = x["baselines"]
            text += (
                f"\n\nIn process just before and after the {x['clients']}-stream run (the targets divide by the "
                f"higher): naive loop {b['naive']['before']:,.0f} and {b['naive']['after']:,.0f} tokens/s, "
                f"scheduler at 32 rows {b['scheduler_32']['before']:,.0f} and {b['scheduler_32']['after']:,.0f}"
            )
    m = r["memory"]
    rss = ", ".join(f"{v:.0f} MB" for v in m["worker_rss_mb"])
    text += (
        f"\n\nworkers: {r['workers']}, {r['max_tokens']} tokens per request; RSS per worker {rss}; "
        f"Redis {m['redis_bytes_per_session']} bytes per session"
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY; one per core)")
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrent client counts")
    p.add_argument("--seconds", type=float, default=20, help="measurement window per client count")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens per streamed request")
    p.add_argument("--naive", type=float, default=None, help="naive loop tokens/s to compare with (from bench.decode)")
    p.add_argument(
        "--threads", type=int, default=2, help=f"threads of the baselines measured beside {TARGET_CLIENTS} clients"
    )
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    result = run(args.checkpoint, args.workers, clients, args.seconds, args.max_tokens, threads=args.threads)
    save("service", result)
    print(report(result, args.naive))


if __name__ == "__main__":
    main()
