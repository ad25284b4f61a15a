"""Run every benchmark and write bench/results/*.json plus bench/results/summary.md.

    python -m bench.run [--checkpoint DIR] [--quick] [--replicas]

Each figure is a ratio against a baseline measured in the same run on the same machine; nothing
here is asserted by the tests (speed lives in benchmarks, not in tests).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import costly, decode, prefill, replicas, service, side_by_side, soak, targets
from .common import DEFAULT_CHECKPOINT, RESULTS, ROOT, environment, save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="threads for the in-process benchmarks")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers for the service benchmark (one per core)")
    p.add_argument("--seconds", type=float, default=20, help="measurement window per client count")
    p.add_argument("--quick", action="store_true", help="short windows and fewer tokens (a smoke run)")
    p.add_argument(
        "--replicas",
        action="store_true",
        help="also run bench.replicas: nginx in front of 1, 2 and 3 replicas (scripts/stack.sh; needs nginx)",
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="also replace the README's Performance tables (between its bench markers) with this run's",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: write summary.md (and the README with --update-readme) from bench/results/*.json",
    )
    args = p.parse_args()
    r = _load_results(args.replicas) if args.report_only else _measure(args)
    soak_file = RESULTS / "soak.json"  # 30 minutes: run on its own (python -m bench.soak), shown with its date
    if soak_file.exists():
        r["soak"] = json.loads(soak_file.read_text())
    summary = render(r, Path(args.checkpoint).name)
    (RESULTS / "summary.md").write_text(summary + "\n")
    print(summary)
    if args.update_readme:
        update_readme(ROOT / "README.md", summary)


NAMES = ("decode", "side_by_side", "prefill", "service", "costly", "replicas")


def _measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    seconds = 4 if args.quick else args.seconds
    r: dict[str, dict[str, Any]] = {}
    r["decode"] = decode.run(args.checkpoint, 300 if args.quick else 2000, args.threads)
    r["side_by_side"] = side_by_side.run(args.checkpoint, 300 if args.quick else 2000, 3 if args.quick else 9)
    if "skipped" in r["side_by_side"]["peer"]:
        print(f"onnxruntime peer skipped: {r['side_by_side']['peer']['skipped']}")
    r["prefill"] = prefill.run(args.checkpoint, args.threads, (100, 1000) if args.quick else (100, 1000, 10000))
    r["service"] = service.run(
        args.checkpoint, args.workers, [1, 8] if args.quick else [1, 8, 32, 64], seconds, 100, threads=args.threads
    )
    r["costly"] = costly.run(args.checkpoint, 20_000 if args.quick else 100_000, 8)
    if args.replicas:
        r["replicas"] = replicas.run(args.checkpoint, [1, 2, 3], 8 if args.quick else 32, seconds, 100)
    for name, result in r.items():
        save(name, result)
    return r


def _load_results(with_replicas: bool) -> dict[str, dict[str, Any]]:
    names = NAMES if with_replicas else NAMES[:-1]
    return {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in names}


def render(r: dict[str, dict[str, Any]], model: str) -> str:
    """The summary: every section from the results, the targets first; the date and machine are
    the decode run's."""
    d, s, b1 = r["decode"], r["service"], r["side_by_side"]
    sections = [
        "## Targets (decode path)\n\n" + targets.report(d, s, b1),
        "## Batch 1 side by side: the service, the engine, onnxruntime, the bound\n\n" + side_by_side.report(b1),
        "## Decode\n\n" + decode.report(d),
        "## Prefill\n\n" + prefill.report(r["prefill"]),
        "## Service (gunicorn + Redis, loopback)\n\n"
        + service.report(s, d["tokens_per_second"]["naive nn.LSTM per token"]),
        "## Costly inputs (one worker, default settings)\n\n" + costly.report(r["costly"]),
    ]
    if "replicas" in r:
        sections.append("## Replicas (nginx in front, scripts/stack.sh)\n\n" + replicas.report(r["replicas"]))
    if "soak" in r and all("floor_slope_mb_per_min" in w for w in r["soak"]["worker_memory"]):
        when = r["soak"].get("environment", {}).get("date", "")
        sections.append(
            f"## Soak (`python -m bench.soak`, run on its own: {when})\n\n"
            + soak.report(r["soak"])
            + "\n\nThe floor is each minute's least RSS (what a worker keeps between requests); target < 1 MB/min."
        )
    env = d.get("environment") or environment()
    quick = d.get("tokens", 2000) < 2000
    flags = (" --quick" if quick else "") + (" --replicas" if "replicas" in r else "")
    return "\n\n".join(
        [
            f"# Benchmarks: {model}\n\n{env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
            f"{env['date']}. Command: `python -m bench.run{flags}`",
            *sections,
        ]
    )


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(readme: Path, summary: str) -> None:
    """Put `summary` (its title demoted below the README's Performance heading) between the markers."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to replace")
    body = summary.replace("\n## ", "\n### ").replace("# Benchmarks: ", "Model: ", 1)
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(f"{before}{START}\n{body}\n{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    main()
