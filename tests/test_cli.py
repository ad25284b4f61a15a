"""The console script, run as a user would (a real subprocess) on a tiny corpus."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.cli import build_parser

CLI = [sys.executable, "-m", "model.cli"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "eval", "sample", "card", "average"])
def test_help_explains_every_flag(command: str) -> None:
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: lstm-lm " + command in out.stdout
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        for flag in action.option_strings:
            assert flag in out.stdout


def test_train_eval_sample_round_trip(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = [
        "--embed-dim",
        "8",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--batch-size",
        "4",
        "--bptt",
        "16",
        "--max-steps",
        "12",
        "--eval-interval",
        "6",
        "--warmup-steps",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]
    r = cli("train", str(tiny_corpus), "--out", str(out), *args)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["val_bits_per_char"] > 0

    r = cli("eval", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert abs(result["bits_per_char"] - summary["val_bits_per_char"]) < 1e-3  # the same validation text
    assert result["num_chars"] == 4000

    r = cli("sample", str(out), "--prompt", "ROMEO:", "--length", "20", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) == len("ROMEO:") + 20
    assert r.stdout == cli("sample", str(out), "--prompt", "ROMEO:", "--length", "20", "--seed", "3").stdout

    # --rows: one batch of samples, row i what --seed 3 + i gives alone, each followed by a blank line
    r = cli("sample", str(out), "--prompt", "ROMEO:", "--length", "20", "--seed", "3", "--rows", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    alone = [
        cli("sample", str(out), "--prompt", "ROMEO:", "--length", "20", "--seed", str(3 + i)).stdout for i in range(3)
    ]
    assert len(set(alone)) == 3 and r.stdout == "".join(text + "\n\n" for text in alone)
    assert "[seeds 3..5]" in r.stderr
    r = cli("sample", str(out), "--rows", "2", "--interactive")
    assert r.returncode == 2 and "--rows" in r.stderr

    r = cli("sample", str(out), "--interactive", "--length", "5", "--seed", "1", stdin="hello\nworld\n")
    assert r.returncode == 0 and len(r.stdout) == 10

    r = cli("card", str(out))
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert "bits/char" in card and "training_curve.png" in card and "lstm-lm train" in card and "int8" in card
    assert "## Notes" not in card
    (out / "NOTES.md").write_text("Tried a wider layer first.\n")
    assert cli("card", str(out)).returncode == 0
    assert (out / "README.md").read_text().endswith("## Notes\n\nTried a wider layer first.\n")

    r = cli("train", "--out", str(out), "--resume", "--max-steps", "14", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 14


def test_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    r = cli("eval", str(tmp_path / "missing"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1") * 100)
    r = cli("train", str(bad), "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode != 0 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_stops_with_a_checkpoint(tiny_corpus: Path, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM mid-run: the run evaluates once more, writes its best weights and its
    resumable state, and says how it stopped."""
    import signal
    import time

    out = tmp_path / "m"
    proc = subprocess.Popen(
        [*CLI, "train", str(tiny_corpus), "--out", str(out), "--preset", "tiny", "--max-steps", "100000",
         "--eval-interval", "100000", "--threads", "1", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "resume" / "train_config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # some steps, and no scheduled evaluation yet
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "interrupted" and summary["steps"] > 0 and summary["val_nats_per_char"] > 0
    assert "SIGTERM" in stderr + stdout
    r = cli("sample", str(out), "--prompt", "A", "--length", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--out", str(out), "--resume", "--max-steps", str(summary["steps"] + 2), "--no-progress")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["steps"] == summary["steps"] + 2


def test_presets_are_in_the_help_with_their_times() -> None:
    out = cli("train", "--help").stdout
    for preset in ("tiny", "small", "shakespeare"):
        assert preset in out
    assert "3 minutes" in out and "20 minutes" in out


def test_fit_minutes_and_max_steps_are_one_or_the_other(tiny_corpus: Path, tmp_path: Path) -> None:
    r = cli("train", str(tiny_corpus), "--out", str(tmp_path / "m"), "--fit-minutes", "1", "--max-steps", "5")
    assert r.returncode == 2 and "not both" in r.stderr
