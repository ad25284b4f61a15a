"""A lean load generator for streamed /generate: one asyncio thread, raw sockets, tokens counted
without parsing JSON. It shares the machine with the server it measures, so it spends as little
CPU per token as it can (a thread per client measured several times its cost).

Each client keeps its own session and asks for `max_tokens` per request on a fresh connection
(as separate users would: a kept-alive connection stays with the worker that accepted it).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .common import percentile

MARK = b'data: {"token"'


@dataclass
class _Stats:
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in that read)
    first_token: list[float] = field(default_factory=list)  # request sent -> first token event
    durations: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: int = 0


async def _request(port: int, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection; (status, body bytes, chunk framing left in)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def stream(port: int, body: dict[str, Any], stats: _Stats) -> None:
    """One streamed /generate: count token events as they arrive; the final event must come."""
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    status_line = await reader.readline()
    carry, tail, tokens, first = b"", b"", 0, None
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        now = time.perf_counter()
        buf = carry + data
        n = buf.count(MARK)
        carry = buf[-(len(MARK) - 1) :]
        if n:
            if first is None:
                first = now
                stats.first_token.append(now - start)
            tokens += n
            stats.token_times.append((now, n))
        tail = (tail + data)[-8192:]
    writer.close()
    ok = b" 200 " in status_line and b'"finish_reason"' in tail and b'{"error"' not in tail
    if not ok:
        stats.errors += 1
        return
    stats.durations.append((start, time.perf_counter() - start))


async def _client(port: int, index: int, max_tokens: int, deadline: float, stats: _Stats) -> None:
    status, raw = await _request(port, "/sessions", {"text": "ROMEO:\n"})
    if status != 201:
        stats.errors += 1
        return
    session_id = json.loads(raw[raw.index(b"{") : raw.rindex(b"}") + 1])["session_id"]
    n = 0
    while time.perf_counter() < deadline:
        body = {
            "session_id": session_id,
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0.8,
            "seed": index * 100_000 + n,
        }
        n += 1
        try:
            await stream(port, body, stats)
        except (OSError, ValueError, IndexError):
            stats.errors += 1


def run_load(port: int, clients: int, seconds: float, max_tokens: int, warmup: float = 2.0) -> dict[str, Any]:
    """`clients` concurrent streaming clients for warmup + seconds; figures from the window only."""
    stats = _Stats()
    started = time.perf_counter()
    window = (started + warmup, started + warmup + seconds)

    async def main() -> None:
        await asyncio.gather(*(_client(port, i, max_tokens, window[1], stats) for i in range(clients)))

    asyncio.run(main())
    in_window = sum(n for t, n in stats.token_times if window[0] <= t < window[1])
    durations = [d for s, d in stats.durations if s >= window[0]]
    return {
        "clients": clients,
        "aggregate_tokens_per_second": in_window / seconds,
        "first_token_ms_p50": 1000 * percentile(stats.first_token, 50),
        "first_token_ms_p99": 1000 * percentile(stats.first_token, 99),
        "per_request_s_p50": percentile(durations, 50),
        "per_request_s_p99": percentile(durations, 99),
        "requests": len(durations),
        "errors": stats.errors,
    }
