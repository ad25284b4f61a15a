"""The service for real: gunicorn (the Procfile command) + a private Redis, over loopback.

- continuation cost: /next on a session holding 10 tokens vs 10,000 tokens, vs a stateless
  request that re-sends the 10,000 tokens;
- load: 1, 8, 32, 64 concurrent clients streaming /generate, each continuing its own session:
  aggregate tokens/s, p50/p99 time per token and per request, errors;
- memory: RSS per worker, Redis bytes per session.

    python -m bench.service [--checkpoint DIR] [--workers 1] [--clients 1,8,32,64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .common import DEFAULT_CHECKPOINT, ROOT, percentile, save, table
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


class _Client(threading.Thread):
    """One streaming client: keeps a session, asks for `max_tokens` per request, until told to stop."""

    def __init__(self, port: int, max_tokens: int, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.max_tokens, self.seed, self.stop_event = port, max_tokens, seed, stop
        self.token_times: list[float] = []  # arrival time of each token
        self.gaps: list[float] = []  # time between consecutive tokens of one request
        self.requests: list[tuple[float, float, int]] = []  # (start, end, tokens)
        self.errors = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/sessions", json.dumps({"text": "ROMEO:\n"}), {"Content-Type": "application/json"})
        session_id = json.loads(conn.getresponse().read())["session_id"]
        n = 0
        while not self.stop_event.is_set():
            body = {
                "session_id": session_id,
                "max_tokens": self.max_tokens,
                "stream": True,
                "temperature": 0.8,
                "seed": self.seed * 100_000 + n,
            }
            n += 1
            start = last = time.perf_counter()
            tokens = 0
            try:
                # a connection per request, as separate clients would open: a kept-alive connection
                # stays with whichever worker accepted it first, which measured lopsided (one worker
                # serving all 8 clients while the other idled); a fresh one goes to a free worker
                conn.close()
                conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    self.errors += 1
                    continue
                while True:
                    line = resp.readline()
                    if not line:
                        break
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    # a token event is counted without parsing it: this client shares the CPU
                    # with the server it measures, so it spends as little as it can
                    if line.startswith(b'data: {"token"'):
                        tokens += 1
                        self.token_times.append(now)
                        if tokens > 1:
                            self.gaps.append(now - last)
                        last = now
                        continue
                    if "error" in json.loads(line[6:]):
                        self.errors += 1
                    break  # the final event (or an error) ends the stream
                resp.read()
                self.requests.append((start, time.perf_counter(), tokens))
            except (OSError, http.client.HTTPException, ValueError):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.close()


def load(port: int, clients: int, seconds: float, max_tokens: int, warmup: float = 2.0) -> dict[str, Any]:
    stop = threading.Event()
    pool = [_Client(port, max_tokens, i, stop) for i in range(clients)]
    for c in pool:
        c.start()
    time.sleep(warmup)
    window_start = time.perf_counter()
    time.sleep(seconds)
    window_end = time.perf_counter()
    stop.set()
    for c in pool:
        c.join(timeout=120)
    in_window = sum(1 for c in pool for t in c.token_times if window_start <= t < window_end)
    gaps = [g for c in pool for g in c.gaps]
    durations = [end - start for c in pool for start, end, _ in c.requests if start >= window_start]
    return {
        "clients": clients,
        "aggregate_tokens_per_second": in_window / (window_end - window_start),
        "per_token_ms_p50": 1000 * percentile(gaps, 50),
        "per_token_ms_p99": 1000 * percentile(gaps, 99),
        "per_request_s_p50": percentile(durations, 50),
        "per_request_s_p99": percentile(durations, 99),
        "requests": len(durations),
        "errors": sum(c.errors for c in pool),
    }


def memory(server: Gunicorn, redis: RedisServer) -> dict[str, Any]:
    rss = {}
    for pid in server.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1]) * 1024
    client = redis.client()
    keys = list(client.scan_iter(match="lstm-lm:*:session:*", count=1000))
    per_key = [int(client.memory_usage(k) or 0) for k in keys[:200]]
    return {
        "worker_rss_mb": [v / 2**20 for v in rss.values()],
        "redis_bytes_per_session": statistics.median(per_key) if per_key else None,
        "sessions_sampled": len(per_key),
    }


def run(checkpoint: Path, workers: int, clients: list[int], seconds: float, max_tokens: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-"))
    redis = RedisServer(tmp)
    env = {
        "MODEL_DIR": str(checkpoint),
        "REDIS_URL": redis.url,
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(max(clients) + 8),
        "LOG_LEVEL": "WARNING",
        "MAX_BATCH": "64",
    }
    server = Gunicorn(env, tmp / "gunicorn.log")
    try:
        cont = continuation(server.base)
        runs = [load(server.port, n, seconds, max_tokens) for n in clients]
        mem = memory(server, redis)
    finally:
        server.stop()
        redis.stop()
    return {
        "checkpoint": str(checkpoint),
        "workers": workers,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "continuation": cont,
        "load": runs,
        "memory": mem,
    }


def report(r: dict[str, Any], naive_tokens_per_second: float | None = None) -> str:
    c = r["continuation"]
    text = table(
        ["/next (1 new token)", "median ms"],
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
        if naive_tokens_per_second:
            row.append(f"{x['aggregate_tokens_per_second'] / naive_tokens_per_second:.1f}x")
        row += [
            x["per_token_ms_p50"],
            x["per_token_ms_p99"],
            x["per_request_s_p50"],
            x["per_request_s_p99"],
            x["errors"],
        ]
        rows.append(row)
    headers = ["clients", "tokens/s", "vs 1 client"] + (["vs naive loop"] if naive_tokens_per_second else [])
    headers += ["ms/token p50", "ms/token p99", "s/request p50", "s/request p99", "errors"]
    text += table(headers, rows)
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
    args = p.parse_args()
    result = run(
        args.checkpoint, args.workers, [int(c) for c in args.clients.split(",")], args.seconds, args.max_tokens
    )
    save("service", result)
    print(report(result, args.naive))


if __name__ == "__main__":
    main()
