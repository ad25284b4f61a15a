"""Checkpoint directories: safetensors weights, a JSON config, the tokenizer. No pickle anywhere.

    <dir>/config.json         format, model config, tokenizer kind, training settings, metrics,
                              the chat template (optional, model.chat), and the sha256 of every
                              file below
    <dir>/model.safetensors   weights
    <dir>/tokenizer.json      character vocabulary      (or tokenizer.model for SentencePiece)

The fingerprint (hash of weights + tokenizer) names the model: the service keys session state
by it, so state computed by one model is never fed to another.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .chat import ChatTemplate, ChatTemplateError
from .lstm import LSTMLanguageModel, ModelConfig
from .tokenizer import TOKENIZER_FILES, Tokenizer, TokenizerError, load_tokenizer

FORMAT = "lstm-lm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, corrupt, or inconsistent; the message names the part."""


@dataclass
class LanguageModel:
    """A loaded checkpoint: the network, its tokenizer, and what the checkpoint says about itself."""

    model: LSTMLanguageModel
    tokenizer: Tokenizer
    config: ModelConfig
    fingerprint: str
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    chat_template: ChatTemplate | None = None  # how /v1/chat/completions renders messages; None: no chat

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "unnamed"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_fingerprint(weights_sha: str, tokenizer_sha: str) -> str:
    return hashlib.sha256(f"{weights_sha}:{tokenizer_sha}".encode()).hexdigest()[:16]


def weights_for_saving(model: LSTMLanguageModel) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared memory)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        del state["decoder.weight"]  # the same tensor as embedding.weight
    return state


def save_weights(model: LSTMLanguageModel, path: Path) -> None:
    """The model's weights alone as one safetensors file (a checkpoint's, or a training snapshot)."""
    _atomic_write(path, lambda p: save_file(weights_for_saving(model), str(p), metadata={"format": FORMAT}))


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; checkpoints are meant to be shared
    os.replace(tmp, path)


def save_checkpoint(
    directory: Path | str,
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    *,
    name: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    chat_template: ChatTemplate | None = None,
) -> str:
    """Write a checkpoint directory (files replaced atomically); returns the fingerprint.
    The chat template is metadata: it is not part of the fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE
    save_weights(model, weights_path)
    tok_path = tokenizer.save(directory)
    files = {WEIGHTS_FILE: sha256_file(weights_path), tok_path.name: sha256_file(tok_path)}
    fingerprint = compute_fingerprint(files[WEIGHTS_FILE], files[tok_path.name])
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or directory.name,
        "fingerprint": fingerprint,
        "model": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "tokenizer": {"kind": tokenizer.kind, "file": tok_path.name, "vocab_size": tokenizer.vocab_size},
        "training": training or {},
        "metrics": metrics or {},
        "files": files,
    }
    if chat_template is not None:
        doc["chat_template"] = chat_template.to_dict()
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return fingerprint


def read_config(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: not a checkpoint directory") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} config")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {doc.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    return doc


def _verify_file(directory: Path, name: str, expected: str | None) -> str:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path} does not match the sha256 recorded in config.json: the file is corrupt "
            "or was copied from another checkpoint"
        )
    return actual


def load(directory: Path | str, *, verify: bool = True) -> LanguageModel:
    """Load a checkpoint directory into an eval-mode model on the CPU."""
    directory = Path(directory)
    doc = read_config(directory)
    try:
        config = ModelConfig.from_dict(doc["model"])
        kind = doc["tokenizer"]["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model or tokenizer section: {exc}") from exc
    tok_file = TOKENIZER_FILES.get(kind)
    if tok_file is None:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unknown tokenizer kind {kind!r}")
    files = doc.get("files", {}) if verify else {}
    weights_sha = _verify_file(directory, WEIGHTS_FILE, files.get(WEIGHTS_FILE))
    tok_sha = _verify_file(directory, tok_file, files.get(tok_file))
    try:
        tokenizer = load_tokenizer(kind, directory)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model expects "
            f"{config.vocab_size}: the tokenizer file belongs to another model"
        )
    model = LSTMLanguageModel(config)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    expected = weights_for_saving(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in expected if k in tensors and tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not fit the model in config.json: "
            f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    model.load_state_dict(tensors, strict=not config.tie_weights)
    model.eval()
    fingerprint = compute_fingerprint(weights_sha, tok_sha)
    return LanguageModel(model, tokenizer, config, fingerprint, directory, doc, _chat_template(directory, doc))


def _chat_template(directory: Path, doc: dict[str, Any]) -> ChatTemplate | None:
    if doc.get("chat_template") is None:
        return None
    try:
        return ChatTemplate.from_dict(doc["chat_template"])
    except ChatTemplateError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad chat_template: {exc}") from exc
