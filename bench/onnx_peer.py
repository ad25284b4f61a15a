"""The peer a user would pick instead of our engine: the same checkpoint exported to ONNX (one
decode step: ids, (h, c) per layer -> logits, (h, c) per layer) and stepped token by token with
onnxruntime. bench/side_by_side.py times it against the engine and the service.

onnx and onnxruntime are the `bench` extra (`pip install -e '.[bench]'`), never a runtime
dependency; without them the comparison reports itself as skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model import LanguageModel
from model.tokenizer import BOS_ID


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
    """Greedy decoding, one session.run per token, feeding the state back (what a user writes).
    Like model.engine.greedy_steps it starts from the state after <s> (one step from zeros, not
    counted in `n`), then feeds token 2: both must produce the same tokens."""
    sizes = lm.config.layer_sizes
    feed: dict[str, np.ndarray] = {f"{k}{i}": np.zeros((1, h), np.float32) for i, h in enumerate(sizes) for k in "hc"}
    token = np.array([[BOS_ID]], dtype=np.int64)
    names = [o.name for o in session.get_outputs()]
    out = []
    for step in range(n + 1):
        feed["ids"] = token
        results = session.run(None, feed)
        for name, value in zip(names[1:], results[1:]):
            feed[name[len("new_") :]] = value
        if step == 0:  # that was <s>
            token = np.array([[2]], dtype=np.int64)
            continue
        token = results[0].argmax(axis=1).reshape(1, 1)
        out.append(int(token[0, 0]))
    return out


def session(ort: Any, path: Path, threads: int) -> Any:
    """An onnxruntime session on the exported step with `threads` intra-op threads (its defaults
    otherwise, spinning threads included: what a user gets)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
