"""The peer a user would pick instead of our engine: the same checkpoint exported to ONNX (one
decode step: ids, (h, c) per layer -> logits, (h, c) per layer) and stepped token by token with
onnxruntime at 1 and 2 threads, against our engine at the same thread counts.

onnx and onnxruntime are the `bench` extra (`pip install -e '.[bench]'`), never a runtime
dependency. Without them this benchmark reports itself as skipped.

    python -m bench.onnx_peer [--checkpoint DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model import LanguageModel, load
from model.engine import Engine, greedy_steps

from .common import DEFAULT_CHECKPOINT, median_time, save, set_threads, table


class _OneStep(nn.Module):
    """ids (1, 1), then h and c of each layer (1, H_l) -> logits (1, V), then the new h and c."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.model = lm.model.eval()

    def forward(self, ids: Tensor, *hc: Tensor) -> tuple[Tensor, ...]:
        state = tuple((hc[2 * i], hc[2 * i + 1]) for i in range(len(hc) // 2))
        logits, new = self.model(ids, state)
        return (logits[:, -1], *(t for pair in new for t in pair))


def export(lm: LanguageModel, path: Path) -> None:
    sizes = lm.config.layer_sizes
    example = (torch.tensor([[2]]), *(torch.zeros(1, h) for h in sizes for _ in range(2)))
    names = [f"{k}{i}" for i in range(len(sizes)) for k in ("h", "c")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _OneStep(lm),
            example,
            str(path),
            input_names=["ids", *names],
            output_names=["logits", *[f"new_{n}" for n in names]],
            dynamo=False,  # the TorchScript exporter writes one plain LSTM node per layer
        )


def onnx_loop(session: Any, lm: LanguageModel, n: int) -> list[int]:
    """Greedy decoding, one session.run per token, feeding the state back (what a user writes)."""
    sizes = lm.config.layer_sizes
    feed: dict[str, np.ndarray] = {f"{k}{i}": np.zeros((1, h), np.float32) for i, h in enumerate(sizes) for k in "hc"}
    token = np.array([[2]], dtype=np.int64)
    names = [o.name for o in session.get_outputs()]
    out = []
    for _ in range(n):
        feed["ids"] = token
        results = session.run(None, feed)
        for name, value in zip(names[1:], results[1:]):
            feed[name[len("new_") :]] = value
        token = results[0].argmax(axis=1).reshape(1, 1)
        out.append(int(token[0, 0]))
    return out


def run(checkpoint: Path, tokens: int) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install -e '.[bench]')"}
    lm = load(checkpoint)
    engine = Engine(lm.model)
    path = Path(tempfile.mkdtemp(prefix="lstm-onnx-")) / "step.onnx"
    export(lm, path)
    rows = []
    for threads in (1, 2):
        set_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        onnx_rate = tokens / median_time(lambda s=session: onnx_loop(s, lm, tokens), 3)  # type: ignore[misc]
        engine_rate = tokens / median_time(lambda: greedy_steps(engine, tokens), 3)
        rows.append({"threads": threads, "onnxruntime": onnx_rate, "engine": engine_rate})
    agree = onnx_loop(session, lm, 50) == greedy_steps(engine, 50)
    return {
        "checkpoint": str(checkpoint),
        "tokens": tokens,
        "onnxruntime": ort.__version__,
        "rows": rows,
        "same_tokens": agree,
    }


def report(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    text = table(
        ["threads", "onnxruntime tokens/s", "engine tokens/s", "engine vs onnxruntime"],
        [[x["threads"], x["onnxruntime"], x["engine"], f"{x['engine'] / x['onnxruntime']:.2f}x"] for x in r["rows"]],
    )
    return text + (
        f"\n\nonnxruntime {r['onnxruntime']}, greedy decoding at batch 1, one `session.run` per token; "
        f"both produce the same tokens: {'yes' if r['same_tokens'] else 'NO'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per timed run")
    args = p.parse_args()
    result = run(args.checkpoint, args.tokens)
    save("onnx", result)
    print(report(result))


if __name__ == "__main__":
    main()
