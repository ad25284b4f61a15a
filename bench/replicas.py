"""Replicas behind nginx on this machine: scripts/stack.sh for real (a private Redis, REPLICAS
Procfile gunicorns of one worker each, nginx in front) serving the shipped model.

- aggregate streaming throughput through nginx at 1, 2 and 3 replicas: concurrent clients, each
  streaming /generate (100 tokens a request) on its own session (bench.load.run_load); first-token
  latency p50/p99, errors, and how nginx spread the requests over the replicas;
- Redis round trips: INFO commandstats (and Redis's count of reply writes) before and after a fixed
  number of streamed requests on sessions, at two lengths: what a request costs Redis, and that a
  token costs nothing.

    python -m bench.replicas [--checkpoint DIR] [--replicas 1,2,3] [--clients 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import requests

from .common import DEFAULT_CHECKPOINT, save, table
from .load import run_load
from servers import Stack  # noqa: I001 - on sys.path via .common

# commands a streamed request on a session may send, and what each is for
ROLES = {
    "getex": "read the state (GETEX, refreshes the TTL)",
    "pfadd": "active-session count (PFADD), in the read's pipeline",
    "expire": "its bucket's TTL (EXPIRE), in the read's pipeline",
    "evalsha": "compare-and-set (EVALSHA of the CAS script)",
    "eval": "compare-and-set (EVAL: script not yet cached)",
    "get": "inside the CAS script (GET): no round trip",
    "set": "inside the CAS script (SET ... EX): no round trip",
}


def _redis_counts(client: redis.Redis) -> tuple[Counter[str], int]:
    """Calls per command so far, and how many times Redis has written replies to its clients: once
    per round trip (a pipeline's replies go out together; a large command may arrive in several
    socket reads, so reads would overcount)."""
    stats = client.info("commandstats")
    calls: Counter[str] = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
    return calls, int(client.info("stats")["total_writes_processed"])


def _stream(base: str, body: dict[str, Any]) -> None:
    """One streamed /generate, read to its final event, which must be a success."""
    with requests.post(f"{base}/generate", json={**body, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        last = b""
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                last = line
    final = json.loads(last[len(b"data: ") :])
    if "finish_reason" not in final:
        raise RuntimeError(f"stream ended without success: {final}")


def redis_round_trips(stack: Stack, requests_per_length: int, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Redis commands and round trips per streamed request on a session, at each length."""
    client = redis.Redis.from_url(stack.redis_url)
    # what our own INFO calls cost between two snapshots, taken away below
    calls_a, writes_a = _redis_counts(client)
    calls_b, writes_b = _redis_counts(client)
    own_calls, own_writes = calls_b - calls_a, writes_b - writes_a
    out: dict[str, Any] = {"requests": requests_per_length, "per_request": {}}
    for max_tokens in lengths:
        sessions = []
        for _ in range(requests_per_length):  # made before the count starts
            r = requests.post(f"{stack.base}/sessions", json={"text": "ROMEO:\n"}, timeout=60)
            r.raise_for_status()
            sessions.append(r.json()["session_id"])
        calls_before, writes_before = _redis_counts(client)
        for i, sid in enumerate(sessions):
            _stream(stack.base, {"session_id": sid, "max_tokens": max_tokens, "temperature": 0.8, "seed": i})
        calls_after, writes_after = _redis_counts(client)
        calls = calls_after - calls_before - own_calls
        n = requests_per_length
        out["per_request"][str(max_tokens)] = {
            "commands": {name: c / n for name, c in sorted(calls.items()) if c},
            "round_trips": (writes_after - writes_before - own_writes) / n,
        }
    client.close()
    return out


def _served_by(stack: Stack) -> dict[str, int]:
    """Streamed /generate requests per replica, from nginx's access log."""
    log = (stack.runtime / "nginx.log").read_text(errors="replace")
    return dict(sorted(Counter(re.findall(r'"POST /generate HTTP/1\.1" 200 .* replica=(replica-\d+)', log)).items()))


def run(
    checkpoint: Path,
    replicas: list[int],
    clients: int,
    seconds: float,
    max_tokens: int,
    redis_requests: int = 20,
    redis_lengths: tuple[int, ...] = (10, 100),
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-replicas-"))
    runs = []
    for n in replicas:
        env = {"MODEL_DIR": str(checkpoint), "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING"}
        stack = Stack(env, tmp / f"stack-{n}.log", replicas=n)
        try:
            load = run_load(stack.port, clients, seconds, max_tokens)
            served = _served_by(stack)
            trips = redis_round_trips(stack, redis_requests, redis_lengths)
        finally:
            stack.stop()
            stack.kill_leftovers()
        runs.append({"replicas": n, **load, "served_by": served, "redis": trips})
    return {
        "checkpoint": str(checkpoint),
        "clients": clients,
        "max_tokens": max_tokens,
        "seconds": seconds,
        "workers_per_replica": 1,
        "runs": runs,
    }


def _replicas(n: int) -> str:
    return f"{n} replica" + ("" if n == 1 else "s")


def report(r: dict[str, Any]) -> str:
    base = r["runs"][0]["aggregate_tokens_per_second"]
    rows = []
    for x in r["runs"]:
        tps = x["aggregate_tokens_per_second"]
        spread = ", ".join(f"{v}" for v in x["served_by"].values())
        rows.append(
            [
                x["replicas"],
                tps,
                f"{tps / base:.2f}x" if base else "-",
                x["first_token_ms_p50"],
                x["first_token_ms_p99"],
                x["per_request_s_p50"],
                x["errors"],
                spread,
            ]
        )
    text = table(
        [
            "replicas (1 worker each)",
            "tokens/s",
            f"vs {_replicas(r['runs'][0]['replicas'])}",
            "first token ms p50",
            "first token ms p99",
            "s/request p50",
            "errors",
            "requests per replica",
        ],
        rows,
    )
    text += (
        f"\n\n{r['clients']} streaming clients through nginx, {r['max_tokens']} tokens per request, "
        f"{r['seconds']:g} s per row; the load generator shares the machine's cores with the stack\n\n"
    )
    trips = r["runs"][-1]["redis"]
    lengths = list(trips["per_request"])
    short, long = trips["per_request"][lengths[0]], trips["per_request"][lengths[-1]]
    extra_tokens = int(lengths[-1]) - int(lengths[0])
    seen = set(short["commands"]) | set(long["commands"])
    names = [c for c in ROLES if c in seen] + sorted(seen - set(ROLES))

    def per_token(a: float, b: float) -> str:
        return f"{(b - a) / extra_tokens:.3f}" if extra_tokens else "-"

    rows = [
        [
            f"`{name}`: {ROLES.get(name, 'other')}",
            f"{short['commands'].get(name, 0):.2f}",
            f"{long['commands'].get(name, 0):.2f}",
            per_token(short["commands"].get(name, 0), long["commands"].get(name, 0)),
        ]
        for name in names
    ]
    rows.append(
        [
            "**round trips** (Redis reply writes)",
            f"{short['round_trips']:.2f}",
            f"{long['round_trips']:.2f}",
            per_token(short["round_trips"], long["round_trips"]),
        ]
    )
    text += table(
        [
            f"Redis per streamed request on a session ({_replicas(r['runs'][-1]['replicas'])})",
            f"{lengths[0]} tokens",
            f"{lengths[-1]} tokens",
            "per extra token",
        ],
        rows,
    )
    text += (
        f"\n\nmeans over {trips['requests']} requests of each length, from INFO commandstats and INFO stats "
        "(total_writes_processed) before and after"
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts, one stack each")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--seconds", type=float, default=20, help="measurement window per replica count")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens per streamed request")
    p.add_argument("--redis-requests", type=int, default=20, help="streamed requests per length for the Redis count")
    args = p.parse_args()
    result = run(
        args.checkpoint,
        [int(n) for n in args.replicas.split(",")],
        args.clients,
        args.seconds,
        args.max_tokens,
        args.redis_requests,
    )
    save("replicas", result)
    print(report(result))


if __name__ == "__main__":
    main()
