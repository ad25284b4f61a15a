"""The decode path's targets, as ratios of figures measured in one bench.run: the HTTP path
against the engine it runs, the bound and the peer (in alternating rounds: bench.side_by_side),
short requests against /health, many streams against the in-process scheduler. Each row says
whether it is met."""

from __future__ import annotations

from typing import Any

from .common import table
from .service import TARGET_CLIENTS, baseline
from .side_by_side import median_ratio


def _row(name: str, value: float, target: float, at_least: bool = True) -> list[Any]:
    met = value >= target if at_least else value <= target
    return [name, f"{value:.2f}x", f"{'>=' if at_least else '<='} {target:g}x", "met" if met else "**missed**"]


def rows(decode: dict[str, Any], service: dict[str, Any], batch1: dict[str, Any]) -> list[list[Any]]:
    """`batch1`: bench.side_by_side's result (the batch-1 ratios come from its alternating rounds)."""
    one = service["single_worker"]
    naive = decode["tokens_per_second"]["naive nn.LSTM per token"]
    out = [
        _row(
            "batch-1 /generate over HTTP / engine in process (2 threads)",
            median_ratio(batch1, "http", "engine [2]"),
            0.8,
        ),
        _row(
            "batch-1 /generate over HTTP / weight-sweep bound (2 threads)",
            median_ratio(batch1, "http", "bound [2]"),
            0.7,
        ),
        _row(
            "/generate of 10 tokens / /health (median latency)",
            one["generate_10_tokens_ms"] / one["health_ms"],
            5,
            False,
        ),
        _row("/next on a session / /health (median latency)", one["next_session_ms"] / one["health_ms"], 3, False),
    ]
    loads = {x["clients"]: x for x in service["load"]}
    if TARGET_CLIENTS in loads:
        load = loads[TARGET_CLIENTS]
        streams = load["aggregate_tokens_per_second"]
        # the baselines measured beside the load, where the run has them (bench.service)
        naive = baseline(load, "naive") or naive
        out.append(_row("32 SSE streams (2 workers) / naive nn.LSTM loop", streams / naive, 20))
        scheduler = decode.get("scheduler_tokens_per_second", {})
        rate32 = baseline(load, "scheduler_32") or scheduler.get(32) or scheduler.get("32")
        if rate32:
            out.append(_row("32 SSE streams / in-process scheduler at 32 rows", streams / rate32, 0.5))
        out.append(["32 SSE streams: errors", str(load["errors"]), "0", "met" if load["errors"] == 0 else "**missed**"])
    if "onnxruntime [2]" in batch1["tokens_per_second"]:
        out.append(
            _row(
                "batch-1 /generate over HTTP / onnxruntime loop at 2 threads",
                median_ratio(batch1, "http", "onnxruntime [2]"),
                1.0,
            )
        )
        for t in (1, 2):
            name = f"engine / onnxruntime loop, {t} thread{'s' if t > 1 else ''}"
            out.append(_row(name, median_ratio(batch1, f"engine [{t}]", f"onnxruntime [{t}]"), 1.3))
    cont = service["continuation"]
    out.append(_row("/next on a 10,000-token session / on a 10-token one", cont["long_vs_short"], 1.2, False))
    return out


def report(decode: dict[str, Any], service: dict[str, Any], batch1: dict[str, Any]) -> str:
    return table(["target", "measured", "target", ""], rows(decode, service, batch1))
