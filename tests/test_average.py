from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli

from model import CheckpointError, load
from model.average import average_checkpoint, average_into
from model.checkpoint import WEIGHTS_FILE

from conftest import train_tiny


@pytest.fixture(scope="module")
def two_runs(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("avg")
    return train_tiny(tiny_corpus, root / "a", max_steps=20), train_tiny(tiny_corpus, root / "b", max_steps=20, seed=9)


def test_mean_of_weights(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    lm = load(a)
    average_into(lm, [a, b])
    wa, wb = load_file(str(a / WEIGHTS_FILE)), load_file(str(b / WEIGHTS_FILE))
    for name, value in lm.model.state_dict().items():
        assert torch.allclose(value, (wa[name] + wb[name]) / 2, atol=1e-7), name


def test_resume_snapshots_and_the_written_checkpoint(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_runs
    snapshot = next((a / "resume").glob("tensors-*.safetensors"))  # the run's last resumable state
    result, fingerprint = average_checkpoint(load(a), [snapshot, snapshot], tmp_path / "avg")
    out = load(tmp_path / "avg")
    assert out.fingerprint == fingerprint and out.meta["training"]["averaged_from"] == [snapshot.name] * 2
    assert out.meta["metrics"]["validation"]["nats_per_char"] == result.nats_per_char
    assert (tmp_path / "avg" / "training_curve.png").is_file() and (tmp_path / "avg" / "history.json").is_file()
    # the last snapshot is the last step's weights, which (eval every 20 = the last step) are the checkpoint's
    assert result.nats_per_char == pytest.approx(load(a).meta["metrics"]["validation"]["nats_per_char"], abs=1e-9)


def test_weights_of_another_model_are_refused(two_runs: tuple[Path, Path], tiny_corpus: Path, tmp_path: Path) -> None:
    a, _ = two_runs
    other = train_tiny(tiny_corpus, tmp_path / "wide", max_steps=2, hidden_size=40)
    with pytest.raises(CheckpointError, match="does not hold weights of this model"):
        average_into(load(a), [a, other])
    broken = tmp_path / "broken"
    shutil.copytree(a, broken)
    (broken / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        average_into(load(a), [broken])


def test_cli_average(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_runs
    r = cli("average", str(a), str(a), str(b), "--out", str(tmp_path / "m"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["averaged"] == 2 and summary["bits_per_char"] > 0
    assert load(tmp_path / "m").fingerprint == summary["fingerprint"]


def test_a_run_keeps_snapshots_from_the_step_asked(tiny_corpus: Path, tmp_path: Path) -> None:
    run = train_tiny(tiny_corpus, tmp_path / "run", max_steps=20, checkpoint_interval=5, snapshots_from=10)
    snaps = sorted((run / "snapshots").glob("*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    assert [p.name for p in snaps] == ["step-10.safetensors", "step-15.safetensors", "step-20.safetensors"]
    # a snapshot is the weights at its step: the last one is the final (evaluated, best-or-not) step's
    last = load_file(str(snaps[-1]))
    resume = load_file(str(next((run / "resume").glob("tensors-20.safetensors"))))
    assert last.keys() == {k[len("model.") :] for k in resume if k.startswith("model.")}
    assert all(torch.equal(v, resume[f"model.{k}"]) for k, v in last.items())
    result, _ = average_checkpoint(load(run), snaps, tmp_path / "avg")
    assert result.nats_per_char > 0
    assert load(tmp_path / "avg").meta["training"]["averaged_from"] == [p.name for p in snaps]
