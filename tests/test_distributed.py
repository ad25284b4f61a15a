"""Data-parallel training as a user launches it: `torchrun --standalone --nproc-per-node 2 --no-python
lstm-lm train ...` (gloo, CPU) on the tiny corpus, against the one-process run of the same global batch.

Tolerance: with dropout off, two processes reduce the same sums in a different order (each rank's
mean over its 4 rows, then DDP's average), so they match the one-process run only to float32
rounding. Measured on this corpus after 30 steps: weights within 1.2e-7 (2.2e-7 of the largest
weight), training losses within 1e-7, validation identical to the digit. Asserted: 1e-5 (~100x
margin; skipping the gradient averaging gives differences ~1e-2 at once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from model.distributed import DistContext
from model.options import command_flags
from model.train import TrainConfig, train

from conftest import TINY

BIN = Path(sys.executable).parent
TOLERANCE = 1e-5
NO_DROPOUT = dict(dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, weight_drop=0.0)
RUN = dict(TINY, max_steps=30, eval_interval=10)


def flags(**overrides: Any) -> list[str]:
    return command_flags({**RUN, **overrides}, TrainConfig)


def torchrun_cmd(*args: str) -> list[str]:
    launch = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    return [*launch, "lstm-lm", "train", *args, "--no-progress"]


def torchrun_env() -> dict[str, str]:
    # lstm-lm from this venv; one OpenMP thread per rank, as torchrun would choose (and says so)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> dict[str, Any]:
    """Run to the end; return rank 0's JSON summary (with the output under "log")."""
    r = subprocess.run(torchrun_cmd(*args), env=torchrun_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    summaries = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, r.stdout  # rank 0 reports; the others say nothing
    return {**json.loads(summaries[0]), "log": r.stdout + r.stderr}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def history(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "elapsed"} for h in json.loads((out / "history.json").read_text())]


def assert_close_runs(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=TOLERANCE, msg=name)
    ha, hb = history(a), history(b)
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [10, 20, 30]
    for x, y in zip(ha, hb):
        for key in ("train_loss", "val_nats_per_char", "lr"):
            assert abs(x[key] - y[key]) <= TOLERANCE, (key, x, y)


@pytest.fixture(scope="module")
def one_process_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, the whole batch of 8 rows, dropout off."""
    out = tmp_path_factory.mktemp("dist") / "one"
    train(TrainConfig(data=[str(tiny_corpus)], out_dir=str(out), **{**RUN, **NO_DROPOUT}), progress=False)  # type: ignore[arg-type]
    return out


def test_context_from_the_torchrun_environment() -> None:
    assert DistContext.from_environ({}) == DistContext()  # not launched by torchrun: one process
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"}
    ctx = DistContext.from_environ(env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert ctx.enabled and not ctx.is_main
    assert ctx.rows(8) == slice(6, 8) and DistContext().rows(8) == slice(0, 8)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ctx.rows(6)
    assert ctx.threads(0, 8) == 4 and ctx.threads(3, 8) == 3 and ctx.threads(0, 1) == 1  # this machine's cores
    seeds = {DistContext(rank=r, world_size=4).dropout_seed(1337) for r in range(4)}
    assert len(seeds) == 4 and 1337 in seeds and 1338 not in seeds  # rank 0 keeps a lone run's stream
    with pytest.raises(ValueError):
        DistContext.from_environ({"RANK": "2", "WORLD_SIZE": "2"})


def test_two_processes_match_one_process_run(tiny_corpus: Path, tmp_path: Path, one_process_run: Path) -> None:
    out = tmp_path / "two"
    run = torchrun(str(tiny_corpus), "--out", str(out), *flags(**NO_DROPOUT))
    assert run["steps"] == 30
    assert_close_runs(one_process_run, out)
    # only rank 0 validates and writes
    assert [run["log"].count(f"step {s}: val") for s in (10, 20, 30)] == [1, 1, 1]
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 30


def test_a_distributed_run_resumes_with_one_process(tiny_corpus: Path, tmp_path: Path, one_process_run: Path) -> None:
    """The resume file holds the global batch's rows, so another world size can continue it
    (dropout off: to float rounding, as a different world size reduces in a different order)."""
    out = tmp_path / "two-then-one"
    stopped = torchrun(str(tiny_corpus), "--out", str(out), *flags(**NO_DROPOUT, max_minutes=1e-9))
    assert stopped["stopped"] == "time_budget" and stopped["steps"] == 1
    cfg = TrainConfig.from_dict(json.loads((out / "resume" / "train_config.json").read_text()))
    assert train(replace(cfg, max_minutes=None), resume=True, progress=False).steps == 30
    assert_close_runs(one_process_run, out)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of `launcher` (torchrun) that has RANK=rank, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 process through /proc")
def test_signal_to_one_rank_stops_all_and_resume_is_exact(tiny_corpus: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone stops both ranks after the same step, with a final checkpoint; the
    stopped run, resumed, is bit-identical to an uninterrupted one. Dropout is on, so this needs
    every rank's RNG, every rank's carried rows, the data RNG and the optimizer restored. (The
    plateau schedule does not depend on --max-steps, so the stopped run may be extended later.)"""
    common = flags(schedule="plateau", plateau_patience=1, checkpoint_interval=5)
    split = tmp_path / "split"
    proc = subprocess.Popen(
        torchrun_cmd(str(tiny_corpus), "--out", str(split), *common, "--max-steps", "100000"),
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = split / "resume" / "state.json"
        deadline = time.monotonic() + 120
        while not (state.is_file() and json.loads(state.read_text())["step"] >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "no resumable state written"
            time.sleep(0.05)
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    stop = summary["steps"]
    assert summary["stopped"] == "interrupted" and 5 <= stop < 100000
    assert "a signal to another rank: saving" in stdout  # rank 0 stopped because rank 1 was asked to
    saved = json.loads(state.read_text())
    assert saved["step"] == stop and saved["world_size"] == 2  # the final resumable state
    rngs = load_file(str(split / "resume" / saved["tensors"]))
    assert not torch.equal(rngs["rng.torch"], rngs["rng.torch.1"])  # each rank draws its own dropout masks

    end = str(stop + 12)
    resumed = torchrun("--out", str(split), "--resume", "--max-steps", end)
    full = tmp_path / "full"
    whole = torchrun(str(tiny_corpus), "--out", str(full), *common, "--max-steps", end)
    assert resumed["steps"] == whole["steps"] == stop + 12
    wa, wb = weights(full), weights(split)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert history(full) == history(split)
    # and a dropout-on distributed run learns
    losses = [h["val_nats_per_char"] for h in history(full)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.1
