"""Weight averaging (Polyak / SWA): the mean of several snapshots of one run, as a checkpoint.

Snapshots taken late in a run (while the learning rate anneals) sit around one minimum; their
mean usually generalises a little better than any one of them (Izmailov et al., 2018). The
snapshots are the weights a run keeps with `--snapshots-from` (`<out>/snapshots/step-<n>.safetensors`),
its resumable states (`<out>/resume/tensors-<step>.safetensors`) or checkpoint directories of the
same model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import WEIGHTS_FILE, CheckpointError, LanguageModel, save_checkpoint, weights_for_saving
from .data import read_texts, split_documents
from .evaluate import EvalResult
from .train import CURVE_FILE, HISTORY_FILE, evaluate_documents


def snapshot_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from a resume snapshot file or a checkpoint directory."""
    file = path / WEIGHTS_FILE if path.is_dir() else path
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    if any(k.startswith("model.") for k in tensors):  # a resume snapshot: weights are prefixed
        return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return tensors


def average_into(lm: LanguageModel, snapshots: list[Path]) -> None:
    """Replace `lm`'s weights by the mean of the snapshots' (all must fit its model exactly)."""
    if not snapshots:
        raise ValueError("give at least one snapshot to average")
    expected = weights_for_saving(lm.model)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in expected.items()}
    for path in snapshots:
        weights = snapshot_weights(path)
        if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
            raise CheckpointError(f"{path} does not hold weights of this model ({lm.name})")
        for k in total:
            total[k] += weights[k].double()
    mean = {k: (v / len(snapshots)).to(expected[k].dtype) for k, v in total.items()}
    lm.model.load_state_dict(mean, strict=not lm.config.tie_weights)
    lm.model.eval()


def average_checkpoint(lm: LanguageModel, snapshots: list[Path], out: Path) -> tuple[EvalResult, str]:
    """Average `snapshots` into `lm` (the run's checkpoint: config, tokenizer, training record),
    score the result on the run's validation split, and write it to `out`. Returns the score
    and the new fingerprint."""
    training: dict[str, Any] = dict(lm.meta.get("training", {}))
    texts = read_texts([Path(p) for p in training["data"]])
    val_docs = split_documents(texts, training["val_fraction"])[1]
    average_into(lm, snapshots)
    result = evaluate_documents(lm.model, lm.tokenizer, val_docs)
    training["averaged_from"] = [p.name for p in snapshots]
    fingerprint = save_checkpoint(
        out,
        lm.model,
        lm.tokenizer,
        name=lm.name,
        training=training,
        metrics={"validation": result.to_dict(), "step": lm.meta.get("metrics", {}).get("step")},
        chat_template=lm.chat_template,
    )
    if lm.path is not None and lm.path.resolve() != out.resolve():
        for name in (CURVE_FILE, HISTORY_FILE):  # the run's record travels with its weights
            if (lm.path / name).is_file():
                shutil.copyfile(lm.path / name, out / name)
    return result, fingerprint
