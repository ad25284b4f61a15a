"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

What `--resume` needs to continue *exactly*: weights, optimizer moments, the LR schedule's
state, the global and data RNG states, the step (which fixes the data position), the LSTM
state carried across windows, and the history so far.

A distributed run writes the same one file (from rank 0): the carried state of every rank's rows
gathered into the rows of the global batch, and each rank's global RNG (its dropout masks) as
`rng.torch` (rank 0, as a one-process run) and `rng.torch.<rank>` for the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_JSON = "state.json"


def _split_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _join_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_resume_state(
    directory: Path,
    *,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    carried: list[Tensor],
    data_rng: Tensor,
    info: dict[str, Any],
    torch_rngs: list[Tensor] | None = None,
) -> None:
    """Write the resume directory; state.json is replaced last so a crash leaves the old pair.
    `torch_rngs`: each rank's global RNG state in rank order (default: this process's)."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _split_optimizer(optimizer_state)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model_state.items()}
    tensors.update(opt_tensors)
    tensors.update({f"carried.{i}": t.contiguous() for i, t in enumerate(carried)})
    rngs = torch_rngs if torch_rngs is not None else [torch.get_rng_state()]
    tensors["rng.torch"] = rngs[0]
    tensors.update({f"rng.torch.{rank}": rng for rank, rng in enumerate(rngs) if rank > 0})
    tensors["rng.data"] = data_rng
    step = info["step"]
    tensor_name = f"tensors-{step}.safetensors"
    save_file(tensors, str(directory / tensor_name))
    doc = {**info, "optimizer": opt_meta, "tensors": tensor_name}
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, directory / STATE_JSON)
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != tensor_name:
            old.unlink()


def load_resume_state(directory: Path) -> dict[str, Any]:
    """Read what save_resume_state wrote. Keys: info, model, optimizer, carried, data_rng and
    torch_rngs (the global RNG state of every saved rank, in rank order; one for a one-process run)."""
    path = directory / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no resumable training state in {directory} (missing {STATE_JSON})")
    info = json.loads(path.read_text(encoding="utf-8"))
    tensors = load_file(str(directory / info.pop("tensors")))
    opt_meta = info.pop("optimizer")
    carried = [tensors[f"carried.{i}"] for i in range(sum(1 for k in tensors if k.startswith("carried.")))]
    ranks = 1 + sum(1 for k in tensors if k.startswith("rng.torch."))
    torch_rngs = [tensors["rng.torch"], *(tensors[f"rng.torch.{r}"] for r in range(1, ranks))]
    return {
        "info": info,
        "model": {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
        "optimizer": _join_optimizer(tensors, opt_meta),
        "carried": carried,
        "data_rng": tensors["rng.data"],
        "torch_rngs": torch_rngs,
    }
