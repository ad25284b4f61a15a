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
