"""Costly inputs against the Procfile's gunicorn (one worker, default settings) and a private Redis:
what a 100,000-character request does to a worker's peak memory, and what eight of them at once do.

- one at a time: /score, /next and POST /sessions with 100,000 characters each; the rise of the
  worker's peak RSS (VmHWM) over its peak after warm-up requests of the same kinds, and the time;
- eight /score requests of 100,000 characters at once: how many the admission budget let in
  (200), how many it turned away (503 + Retry-After), the peak RSS rise, and /health meanwhile.

Windowed prefill and scoring carry the state across windows, so memory should not grow with the
text (issue target: <= 100 MB per 100,000-character request; before windows: +1.4 GB).

    python -m bench.costly [--checkpoint DIR] [--chars 100000] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from .common import DEFAULT_CHECKPOINT, ROOT, process_memory_mb, save, table
from servers import Gunicorn, RedisServer  # noqa: I001 - on sys.path via .common


def _peak_mb(pid: int) -> float:
    """The worker's peak resident memory so far (VmHWM), in MB."""
    peak = process_memory_mb(pid, "VmHWM")
    if peak is None:
        raise RuntimeError(f"worker {pid} is gone")
    return peak


def _requests(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("/score", "/score", {"text": text}),
        ("/next", "/next", {"text": text, "top_n": 5}),
        ("POST /sessions", "/sessions", {"text": text}),
    ]


def run(checkpoint: Path, chars: int, concurrent: int) -> dict[str, Any]:
    corpus = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    text = (corpus * (chars // len(corpus) + 1))[:chars]
    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-costly-"))
    redis = RedisServer(tmp)
    env = {"MODEL_DIR": str(checkpoint), "REDIS_URL": redis.url, "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING"}
    server = Gunicorn(env, tmp / "gunicorn.log")
    try:
        (pid,) = server.worker_pids()
        for _, path, body in _requests(corpus[:2000]) * 3:  # warm-up: every code path, small inputs
            requests.post(server.base + path, json=body, timeout=120).raise_for_status()
        baseline = _peak_mb(pid)
        single = []
        for name, path, body in _requests(text):
            start = time.perf_counter()
            r = requests.post(server.base + path, json=body, timeout=600)
            seconds = time.perf_counter() - start
            r.raise_for_status()
            single.append({"request": name, "seconds": seconds, "peak_rise_mb": _peak_mb(pid) - baseline})

        statuses: list[int] = []
        health_ms: list[float] = []
        done = threading.Event()

        def score() -> None:
            r = requests.post(server.base + "/score", json={"text": text}, timeout=600)
            statuses.append(r.status_code)

        def watch_health() -> None:
            while not done.is_set():
                start = time.perf_counter()
                requests.get(server.base + "/health", timeout=30).raise_for_status()
                health_ms.append(1000 * (time.perf_counter() - start))
                time.sleep(0.2)

        before = _peak_mb(pid)
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        start = time.perf_counter()
        threads = [threading.Thread(target=score) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flood_seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        flood = {
            "requests": concurrent,
            "statuses": dict(sorted(Counter(statuses).items())),
            "seconds": flood_seconds,
            "peak_rise_mb": _peak_mb(pid) - before,
            "peak_rise_from_warm_mb": _peak_mb(pid) - baseline,
            "health_ms_max": max(health_ms) if health_ms else None,
        }
    finally:
        server.stop()
        redis.stop()
    return {"checkpoint": str(checkpoint), "chars": chars, "warm_peak_mb": baseline, "single": single, "flood": flood}


def report(r: dict[str, Any]) -> str:
    rows = [[x["request"], f"{x['seconds']:.2f}", f"{x['peak_rise_mb']:.1f}"] for x in r["single"]]
    text = table([f"one request of {r['chars']:,} characters", "seconds", "worker peak RSS rise, MB"], rows)
    f = r["flood"]
    text += (
        f"\n\nworker peak RSS after warm-up: {r['warm_peak_mb']:.0f} MB (rises measured from it, cumulative)."
        f"\n\n{f['requests']} /score requests of {r['chars']:,} characters at once: statuses {f['statuses']}, "
        f"{f['seconds']:.1f} s, peak RSS +{f['peak_rise_mb']:.1f} MB (+{f['peak_rise_from_warm_mb']:.1f} MB from "
        f"warm), slowest /health meanwhile {f['health_ms_max']:.0f} ms"
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--chars", type=int, default=100_000, help="characters per costly request")
    p.add_argument("--concurrent", type=int, default=8, help="costly /score requests sent at once")
    args = p.parse_args()
    result = run(args.checkpoint, args.chars, args.concurrent)
    save("costly", result)
    print(report(result))


if __name__ == "__main__":
    main()
