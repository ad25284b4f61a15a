"""The LSTM cell's elementwise half as one compiled loop (numba).

After its GEMV, a 512-wide layer's gate nonlinearities and cell update are a few microseconds of
arithmetic spread over ten numpy calls of ~0.5 µs each: measured on this project's 2-core
machine, ~10 µs of a ~90 µs token at 2 threads. One numba call per layer does the same work in
~0.7 µs (call included).

The gates arrive prepared as model/fused.py lays them out: columns (i, f, o, g), the sigmoid
gates' pre-activations halved, so sigmoid(z) = 0.5 + 0.5 * tanh(z / 2) and one tanh serves all
four. tanh is Eigen's rational approximation (the one XLA and TensorFlow use for float32):
max |error| 2.6e-7 over the reals (3e-7 asserted) (tests/test_cell.py), and, unlike a call into libm, it
vectorises. error_model="numpy" lets the division vectorise (Python's model checks every divisor
for zero); fastmath lets LLVM reorder the polynomial.

Each row's elements are computed by the same code whatever the batch, so a sequence's numbers do
not depend on what it is batched with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

log = logging.getLogger(__name__)

_CLAMP = np.float32(7.90531110763549805)  # beyond this, tanh is 1 in float32
# numerator (odd, x^1..x^13) and denominator (even, x^0..x^6), highest power first
_P = [np.float32(v) for v in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                              5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                              4.89352455891786e-03)]  # fmt: skip
_Q = [np.float32(v) for v in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                              4.89352518554385e-03)]  # fmt: skip
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = _P
_Q0, _Q1, _Q2, _Q3 = _Q
_HALF = np.float32(0.5)


def compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """numba.njit(nogil=True, error_model="numpy", **options), cached on disk where numba finds a
    writable place (beside this file, $HOME/.cache or NUMBA_CACHE_DIR), else compiled in each
    process (~1 s at start): on a read-only root filesystem caching must not stop the service."""

    def decorate(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(nogil=True, error_model="numpy", cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            log.info("numba cannot cache %s (%s); compiling it in this process", fn.__name__, exc)
            return numba.njit(nogil=True, error_model="numpy", cache=False, **options)(fn)

    return decorate


@compiled(fastmath=True, inline="always")
def fast_tanh(x: np.float32) -> np.float32:
    """tanh(x) for float32 x, to within 3e-7 (saturates at 1 - 2.4e-7)."""
    x = x if x < _CLAMP else _CLAMP
    x = x if x > -_CLAMP else -_CLAMP
    x2 = x * x
    p = ((((((_P0 * x2 + _P1) * x2 + _P2) * x2 + _P3) * x2 + _P4) * x2 + _P5) * x2 + _P6) * x
    q = ((_Q0 * x2 + _Q1) * x2 + _Q2) * x2 + _Q3
    return p / q


@compiled(fastmath=True)
def lstm_cell(gates: np.ndarray, add: np.ndarray, ids: np.ndarray, state: np.ndarray, h_at: int, c_at: int) -> None:
    """Finish one layer's step for a batch, in place.

    gates (B, 4H): the GEMV/GEMM output, prepared as above; add (R, 4H): rows added to the gates
    first, row ids[b] for sequence b (the first layer's per-token table, or a layer's bias as
    one row with ids all 0); state (B, S): the flat state rows, whose h of this layer starts at
    column h_at and c at c_at. Writes c' = f * c + i * g and h' = o * tanh(c') there."""
    hidden = gates.shape[1] // 4
    for b in range(gates.shape[0]):
        z = gates[b]
        a = add[ids[b]]
        h = state[b, h_at : h_at + hidden]
        c = state[b, c_at : c_at + hidden]
        for j in range(hidden):
            i = _HALF + _HALF * fast_tanh(z[j] + a[j])
            f = _HALF + _HALF * fast_tanh(z[hidden + j] + a[hidden + j])
            o = _HALF + _HALF * fast_tanh(z[2 * hidden + j] + a[2 * hidden + j])
            g = fast_tanh(z[3 * hidden + j] + a[3 * hidden + j])
            cj = f * c[j] + i * g
            c[j] = cj
            h[j] = o * fast_tanh(cj)
