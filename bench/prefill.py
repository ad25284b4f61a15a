"""Prefill tokens/s: one whole-sequence call (the engine) against feeding the same prompt token by
token through the model, for 100 / 1,000 / 10,000-token prompts.

    python -m bench.prefill [--checkpoint DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch

from model import load
from model.engine import Engine

from .common import DEFAULT_CHECKPOINT, ROOT, median_time, save, set_threads, table


def run(checkpoint: Path, threads: int, lengths: tuple[int, ...] = (100, 1000, 10000)) -> dict[str, Any]:
    set_threads(threads)
    lm = load(checkpoint)
    engine = Engine(lm.model)
    corpus = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids_all = lm.tokenizer.encode(corpus[: 12 * max(lengths)])
    rows = []

    def whole_sequence(ids: list[int]) -> None:
        engine.prefill(ids, engine.start())

    def token_loop(ids: list[int]) -> None:
        state = None  # the naive loop's own state format (nn.LSTM tuples)
        with torch.no_grad():
            for t in ids:
                _, state = lm.model(torch.tensor([[t]]), state)

    for n in lengths:
        whole = n / median_time(functools.partial(whole_sequence, ids_all[:n]), 3)
        loop_n = min(n, 1000)  # the loop's rate is flat in n; 10,000 tokens of it would take minutes
        loop = loop_n / median_time(functools.partial(token_loop, ids_all[:loop_n]), 3)
        rows.append(
            {
                "tokens": n,
                "whole_sequence_tokens_per_second": whole,
                "token_loop_tokens_per_second": loop,
                "ratio": whole / loop,
            }
        )
    return {"checkpoint": str(checkpoint), "threads": threads, "prefill": rows}


def report(r: dict[str, Any]) -> str:
    return table(
        ["prompt tokens", "whole-sequence tokens/s", "token loop tokens/s", "ratio"],
        [
            [
                x["tokens"],
                x["whole_sequence_tokens_per_second"],
                x["token_loop_tokens_per_second"],
                f"{x['ratio']:.1f}x",
            ]
            for x in r["prefill"]
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    args = p.parse_args()
    result = run(args.checkpoint, args.threads)
    save("prefill", result)
    print(report(result))


if __name__ == "__main__":
    main()
