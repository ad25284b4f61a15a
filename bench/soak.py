"""Soak: mixed traffic against the Procfile's gunicorn and a private Redis for a long while, and
the slope of each worker's memory after a warm-up. A service that leaks a little per request
(a cache without a bound, a list that only grows) shows it here, not in a test.

    python -m bench.soak [--minutes 30] [--warmup 5] [--clients 8] [--workers 2]

Traffic (each client loops, a new connection per request): create a session, stream and plain
/generate on it, /next peeks and commits, /score, fork and delete, stateless /generate and
/v1/chat/completions, with texts from 10 to 5,000 characters. Reported: requests and errors,
and for each worker, sampled every 5 s: the slope in MB/min after the warm-up of its RSS floor
(the least RSS of each minute: what it keeps between requests; target < 1 MB/min), and of every
sample (which also follows the buffers of whichever requests are running at the instant).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .common import DEFAULT_CHECKPOINT, ROOT, process_memory_mb, save, table
from servers import Gunicorn, RedisServer  # noqa: I001 - on sys.path via .common


def floors(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The least RSS in each whole minute, at that minute's middle: a request's transient buffers
    come and go; memory that stays shows in the floor."""
    by_minute: dict[int, float] = {}
    for t, mb in points:
        by_minute[int(t)] = min(mb, by_minute.get(int(t), mb))
    return [(m + 0.5, mb) for m, mb in sorted(by_minute.items())]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB) points, in MB per minute."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


class _Client(threading.Thread):
    def __init__(self, base: str, seed: int, stop: threading.Event, corpus: str, model_id: str):
        super().__init__(daemon=True)
        self.base, self.rng, self.stop_event, self.corpus = base, random.Random(seed), stop, corpus
        self.model_id = model_id
        self.requests = 0
        self.errors: dict[str, int] = {}

    def _text(self) -> str:
        n = self.rng.choice([10, 100, 1000, 5000])
        start = self.rng.randrange(0, len(self.corpus) - n)
        return self.corpus[start : start + n]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, stream: bool = False) -> Any:
        self.requests += 1
        try:
            r = requests.request(
                method, self.base + path, json=body, timeout=120, stream=stream, headers={"Connection": "close"}
            )
            if stream:
                for _ in r.iter_lines():
                    pass
                return None
            if r.status_code >= 500 or r.status_code in (400, 422):
                self.errors[f"{path} {r.status_code}"] = self.errors.get(f"{path} {r.status_code}", 0) + 1
            return r.json() if r.content and r.headers.get("Content-Type", "").startswith("application/json") else None
        except (requests.RequestException, ValueError) as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return None

    def run(self) -> None:
        while not self.stop_event.is_set():
            created = self._call("POST", "/sessions", {"text": self._text()[:1000]})
            sid = (created or {}).get("session_id")
            if sid:
                self._call("POST", "/generate", {"session_id": sid, "max_tokens": 50, "stream": True})
                self._call("POST", "/next", {"session_id": sid, "text": self._text()[:100], "top_n": 5})
                self._call("POST", "/next", {"session_id": sid, "text": " and", "commit": True})
                self._call("POST", "/generate", {"session_id": sid, "max_tokens": 30, "stop": ["\n\n"]})
                fork = (self._call("POST", f"/sessions/{sid}/fork") or {}).get("session_id")
                if fork:
                    self._call("DELETE", f"/sessions/{fork}")
                self._call("DELETE", f"/sessions/{sid}")
            self._call("POST", "/score", {"text": self._text()})
            self._call("POST", "/generate", {"prompt": self._text()[:200], "max_tokens": 40, "logprobs": 2})
            self._call(
                "POST",
                "/v1/chat/completions",
                {
                    "model": self.model_id,
                    "messages": [{"role": "user", "content": self._text()[:300]}],
                    "max_tokens": 20,
                },
            )


def run(
    checkpoint: Path, minutes: float, warmup: float, clients: int, workers: int, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lstm-soak-"))
    redis = RedisServer(tmp)
    env = {
        "MODEL_DIR": str(checkpoint),
        "REDIS_URL": redis.url,
        "WEB_CONCURRENCY": str(workers),
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    server = Gunicorn(env, tmp / "gunicorn.log")
    corpus = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    model_id = requests.get(f"{server.base}/v1/models", timeout=10).json()["data"][0]["id"]
    stop = threading.Event()
    pool = [_Client(server.base, i, stop, corpus, model_id) for i in range(clients)]
    samples: dict[int, list[tuple[float, float]]] = {}
    try:
        for c in pool:
            c.start()
        started = time.monotonic()
        while (elapsed := (time.monotonic() - started) / 60) < minutes:
            for pid in server.worker_pids():
                mb = process_memory_mb(pid)
                if mb is not None:
                    samples.setdefault(pid, []).append((elapsed, mb))
            time.sleep(5)
        stop.set()
        for c in pool:
            c.join(timeout=180)
    finally:
        server.stop()
        redis.stop()
    workers_report = []
    for pid, points in samples.items():
        after = [p for p in points if p[0] >= warmup]
        floor = [p for p in floors(points) if p[0] >= warmup and p[0] + 0.5 <= minutes]  # whole minutes
        workers_report.append(
            {
                "pid": pid,
                "rss_mb_start": points[0][1],
                "floor_mb_after_warmup": floor[0][1] if floor else None,
                "floor_mb_end": floor[-1][1] if floor else None,
                "rss_mb_peak": max(mb for _, mb in points),
                "floor_slope_mb_per_min": slope(floor),
                "slope_mb_per_min_after_warmup": slope(after),
                "samples": points,
            }
        )
    errors: dict[str, int] = {}
    for c in pool:
        for k, v in c.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "checkpoint": str(checkpoint),
        "minutes": minutes,
        "warmup_minutes": warmup,
        "clients": clients,
        "workers": workers,
        "env": extra_env or {},
        "requests": sum(c.requests for c in pool),
        "errors": errors,
        "worker_memory": workers_report,
    }


def report(r: dict[str, Any]) -> str:
    rows = [
        [
            w["pid"],
            w["rss_mb_start"],
            w["floor_mb_after_warmup"] or float("nan"),
            w["floor_mb_end"] or float("nan"),
            w["rss_mb_peak"],
            f"{w['floor_slope_mb_per_min']:+.3f}",
            f"{w['slope_mb_per_min_after_warmup']:+.3f}",
        ]
        for w in r["worker_memory"]
    ]
    headers = [
        "worker",
        "RSS MB at start",
        "floor after warm-up",
        "floor at end",
        "peak",
        "floor MB/min",
        "all samples MB/min",
    ]
    text = table(headers, rows)
    return text + (
        f"\n\n{r['minutes']:g} minutes ({r['warmup_minutes']:g} of warm-up), {r['clients']} clients, "
        f"{r['requests']:,} requests, errors: {json.dumps(r['errors']) if r['errors'] else 'none'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--minutes", type=float, default=30, help="how long the traffic runs")
    p.add_argument("--warmup", type=float, default=5, help="minutes left out of the memory slope")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients looping over the mix")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for gunicorn (repeatable), e.g. MALLOC_ARENA_MAX=4 to compare allocator settings",
    )
    p.add_argument("--save-as", default="soak", help="name of the results file in bench/results/ (without .json)")
    args = p.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    result = run(args.checkpoint, args.minutes, args.warmup, args.clients, args.workers, extra)
    save(args.save_as, result)
    print(report(result))


if __name__ == "__main__":
    main()
