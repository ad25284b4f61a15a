from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model import CheckpointError, LanguageModel, load, save_checkpoint
from model.lstm import LSTMLanguageModel, ModelConfig
from model.tokenizer import CharTokenizer


def test_round_trip_gives_identical_logits(any_lm: LanguageModel, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "copy", any_lm.model, any_lm.tokenizer, name="copy")
    again = load(tmp_path / "copy")
    ids = torch.tensor([any_lm.tokenizer.encode("ROMEO:\nWhat light through yonder")])
    with torch.no_grad():
        a, _ = any_lm.model(ids)
        b, _ = again.model(ids)
    assert torch.equal(a, b)
    assert again.fingerprint == any_lm.fingerprint
    assert again.config == any_lm.config
    assert again.tokenizer.kind == any_lm.tokenizer.kind


def test_checkpoint_holds_no_pickle(char_lm_dir: Path) -> None:
    names = sorted(p.name for p in char_lm_dir.iterdir() if p.is_file())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]
    doc = json.loads((char_lm_dir / "config.json").read_text())
    assert doc["tokenizer"]["kind"] == "char"
    assert doc["metrics"]["validation"]["bits_per_char"] > 0
    assert doc["model"]["vocab_size"] == doc["tokenizer"]["vocab_size"]


def test_fingerprint_follows_weights(char_lm: LanguageModel, tmp_path: Path) -> None:
    model = LSTMLanguageModel(char_lm.config)
    model.load_state_dict(char_lm.model.state_dict())
    with torch.no_grad():
        model.decoder.bias[3] += 1.0
    fp = save_checkpoint(tmp_path / "changed", model, char_lm.tokenizer)
    assert fp != char_lm.fingerprint


@pytest.fixture()
def copy_dir(char_lm_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(char_lm_dir, dst, ignore=shutil.ignore_patterns("resume"))
    return dst


def test_corrupt_weights_are_named(copy_dir: Path) -> None:
    data = bytearray((copy_dir / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        load(copy_dir)


def test_truncated_weights_without_hashes(copy_dir: Path) -> None:
    (copy_dir / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(copy_dir, verify=False)


def test_tokenizer_from_another_model_is_refused(copy_dir: Path) -> None:
    CharTokenizer.train(["abc"]).save(copy_dir)
    with pytest.raises(CheckpointError, match="tokenizer.json does not match"):
        load(copy_dir)
    with pytest.raises(CheckpointError, match="tokenizer .* has 5 tokens but the model expects"):
        load(copy_dir, verify=False)


def test_weights_of_another_shape_are_refused(copy_dir: Path, char_lm: LanguageModel) -> None:
    other = LSTMLanguageModel(
        ModelConfig(vocab_size=char_lm.config.vocab_size, embed_dim=8, hidden_size=16, num_layers=1)
    )
    save_checkpoint(copy_dir / "other", other, char_lm.tokenizer)
    shutil.copy(copy_dir / "other" / "model.safetensors", copy_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not fit the model in config.json"):
        load(copy_dir, verify=False)


def test_missing_and_bad_config(tmp_path: Path, copy_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    (copy_dir / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(copy_dir)
    (copy_dir / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="is not an lstm-lm-checkpoint config"):
        load(copy_dir)
    (copy_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing: not a checkpoint directory"):
        load(copy_dir)
