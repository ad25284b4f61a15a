"""The compiled cell (model/cell.py) against plain numpy arithmetic in float64."""

from __future__ import annotations

import numpy as np
import pytest

from model.cell import fast_tanh, lstm_cell


def test_fast_tanh_is_within_its_stated_error_everywhere() -> None:
    xs = np.concatenate([np.linspace(-12, 12, 400_001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, np.inf, -np.inf]])
    got = np.array([fast_tanh(np.float32(x)) for x in xs[::97]] + [fast_tanh(np.float32(x)) for x in xs[-8:]])
    want = np.tanh(np.concatenate([xs[::97], xs[-8:]]).astype(np.float32).astype(np.float64))
    assert np.abs(got - want).max() <= 3e-7
    assert np.all(np.abs(got) <= 1.0)


def reference(gates: np.ndarray, add: np.ndarray, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple:
    """The cell as model/fused.py prepares it: columns (i, f, o, g), sigmoid inputs halved."""
    hidden = h.shape[1]
    t = np.tanh(gates.astype(np.float64) + add[ids])
    i, f, o = (0.5 + 0.5 * t[:, k * hidden : (k + 1) * hidden] for k in range(3))
    g = t[:, 3 * hidden :]
    c2 = f * c + i * g
    return o * np.tanh(c2), c2


@pytest.mark.parametrize("hidden", [1, 7, 16, 512])
def test_cell_matches_the_float64_arithmetic(hidden: int) -> None:
    rng = np.random.default_rng(hidden)
    batch, other = 5, 3  # state rows hold another layer's h and c around this one's
    gates = (rng.standard_normal((batch, 4 * hidden)) * 4).astype(np.float32)
    table = rng.standard_normal((11, 4 * hidden)).astype(np.float32)
    ids = rng.integers(0, 11, batch)
    state = rng.standard_normal((batch, 2 * (hidden + other))).astype(np.float32)
    h_at, c_at = other, 2 * other + hidden
    want_h, want_c = reference(gates, table, ids, state[:, h_at : h_at + hidden], state[:, c_at : c_at + hidden])
    before = state.copy()
    lstm_cell(gates, table, ids, state, h_at, c_at)
    np.testing.assert_allclose(state[:, h_at : h_at + hidden], want_h, rtol=0, atol=2e-6)
    np.testing.assert_allclose(state[:, c_at : c_at + hidden], want_c, rtol=0, atol=2e-6)
    untouched = np.ones(state.shape[1], dtype=bool)
    untouched[h_at : h_at + hidden] = untouched[c_at : c_at + hidden] = False
    assert np.array_equal(state[:, untouched], before[:, untouched])  # the other layer's columns


def test_a_row_gets_the_same_bits_alone_or_in_a_batch() -> None:
    rng = np.random.default_rng(0)
    hidden = 37  # not a multiple of any vector width: exercises the loop's tail too
    gates = rng.standard_normal((9, 4 * hidden)).astype(np.float32)
    bias = rng.standard_normal((1, 4 * hidden)).astype(np.float32)
    state = rng.standard_normal((9, 2 * hidden)).astype(np.float32)
    batched = state.copy()
    lstm_cell(gates, bias, np.zeros(9, dtype=np.int64), batched, 0, hidden)
    for b in range(9):
        alone = state[b : b + 1].copy()
        lstm_cell(gates[b : b + 1].copy(), bias, np.zeros(1, dtype=np.int64), alone, 0, hidden)
        assert np.array_equal(alone[0], batched[b])


def test_a_read_only_filesystem_compiles_instead_of_caching(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With nowhere to write numba's cache (the package, $HOME and no NUMBA_CACHE_DIR all on a
    read-only mount, as in the Kubernetes pod), the kernels compile in-process and run."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private read-only mount")
    pkg = tmp_path / "ro"
    shutil.copytree(
        Path(__file__).parents[1] / "model", pkg / "model", ignore=shutil.ignore_patterns("__pycache__", "checkpoints")
    )
    code = (
        "import logging, numpy as np; logging.basicConfig(level=logging.INFO)\n"
        "from model.cell import lstm_cell\n"
        "from model.sampling import sample_rows, SamplingParams\n"
        "g = np.ones((1, 8), np.float32); s = np.zeros((1, 4), np.float32)\n"
        "lstm_cell(g, g, np.zeros(1, np.int64), s, 0, 2)\n"
        "token = sample_rows(np.zeros((1, 5), np.float32), [SamplingParams()], [0.5])\n"
        "print('ran', *(f'{v:.4f}' for v in s[0]), token)\n"
    )
    script = f'mount --bind {pkg} {pkg} && mount -o remount,bind,ro {pkg} && exec {sys.executable} -c "$CODE"'
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(pkg), PYTHONPATH=str(pkg), PYTHONDONTWRITEBYTECODE="1", CODE=code)
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=pkg,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # gates 1 + 1 = 2: i = f = o = sigmoid-by-tanh(2) = 0.982, g = tanh(2); c = i g, h = o tanh(c)
    assert "ran 0.7250 0.7250 0.9467 0.9467 [3]" in r.stdout, r.stdout + r.stderr[-2000:]
    for name in ("lstm_cell", "_sample_plain"):
        assert f"numba cannot cache {name}" in r.stderr, r.stderr[-2000:]
