"""The fused single-token LSTM step that decoding runs on.

Decoding one token through nn.LSTM costs far more in per-call overhead than in arithmetic
(three modules, oneDNN primitive setup, autograd bookkeeping). Here each layer is one GEMM of
[x, h] against its concatenated gate weights (a GEMV W @ [x, h] at batch 1, the layout
OpenBLAS reads fastest) in numpy, then one compiled call for the gates and cell update
(model/cell.py). OpenBLAS's GEMV measured ~3x faster than torch's single-row addmm on this
machine, and torch.mv on two threads ~4x slower than on one (bench/decode.py prints the
comparison in every run). For batched steps torch's matmul was up to 2x faster than
OpenBLAS's sgemm at 2-16 rows in isolation, yet the service under load ran at half the
throughput with it, so numpy stays for every batch size.

At batch 1 the arithmetic of a 512-wide layer takes a few microseconds outside the GEMV, so
what remains is the cost of each call and each view it creates (~0.5-1 µs apiece). So:

- the first layer's input projection is a table row per token (embedding @ W_ih^T + biases,
  precomputed for the whole vocabulary);
- gate columns are reordered to (i, f, o, g) and the sigmoid gates' columns halved (exact in
  floating point): sigmoid(z) = 0.5 + 0.5 * tanh(z / 2), so one tanh covers all four gates
  (the numba cell: 10 numpy calls per layer became one, ~82 instead of ~89 µs per token at
  2 threads on the shipped model);
- state rows are laid out [h_1 .. h_L, c_1 .. c_L] (lstm.flatten_state), so layer l's input
  [h_(l-1) new, h_l old] is one contiguous slice and the layers update a copy of the rows in
  place: no concatenation, no permutation, no allocation but the result;
- the weights live in transparent huge pages (model/hugepages.py): ~3,200 fewer TLB entries
  per step, 9-20% faster;
- each thread keeps one set of buffers (for the largest batch it has stepped) and, per batch
  size, views of their first rows made once.

Results equal nn.LSTM's to float32 rounding (tests/test_lstm.py checks max |Δ logprob| <= 1e-4).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np
import torch

from .cell import lstm_cell
from .hugepages import huge_page_copies
from .lstm import LSTMLanguageModel, lstm_weights

# OpenBLAS's sgemm at a few rows costs several times its share (measured, 2 threads, the 8 MB
# layer: 2 rows 307 µs against 95 for two GEMVs; 6 rows 546, 8 rows 242, 12 rows 495, 16
# rows 397): up to GEMV_ROWS rows each row is its own GEMV, and a larger batch whose last block
# of BLOCK rows is at least half full is padded to fill it.
GEMV_ROWS = 5
BLOCK = 8


def gate_order(hidden: int) -> np.ndarray:
    """Column permutation from PyTorch's gate order (i, f, g, o) to (i, f, o, g)."""
    i, f, g, o = (np.arange(k * hidden, (k + 1) * hidden) for k in range(4))
    return np.concatenate([i, f, o, g])


def _prepared(w: np.ndarray, hidden: int) -> np.ndarray:
    """Gate columns (last axis, 4H) in (i, f, o, g) order with the sigmoid gates halved."""
    scale = np.ones(4 * hidden, dtype=np.float32)
    scale[: 3 * hidden] = 0.5
    return np.ascontiguousarray(w[..., gate_order(hidden)] * scale)


def _rows_of(w: np.ndarray) -> np.ndarray:
    """(in, 4H) -> (4H, in) in C order: at batch 1 the step is W @ x, which OpenBLAS's GEMV runs
    ~5% (1 thread) to ~12% (2 threads) faster than x @ W on this layout (bench: 8 MB matrix)."""
    return np.ascontiguousarray(w.T)


@dataclass(frozen=True)
class _Layer:
    w: np.ndarray  # (H, 4H) for layer 1 (its input comes from the table), else (I + H, 4H); C order
    bias: np.ndarray  # (1, 4H); zeros for layer 1, whose biases are in the table
    table: np.ndarray | None  # (V, 4H) for layer 1
    # the same weights as (4H, in) in C order, for batch 1. Both are kept (+12.7 MB for the
    # shipped model): OpenBLAS's GEMM on the transposed view ran ~45% slower at 4 rows, 1 thread
    wt: np.ndarray


class _Workspace:
    """Buffers for one batch size in one thread, with every view made once: views of the first
    `batch` rows of the thread's buffers (a row prefix of a C-contiguous array is contiguous)."""

    def __init__(self, sizes: list[int], buf: np.ndarray, gate_bufs: list[np.ndarray]):
        widths = sum(sizes)
        self.buf = buf  # [h_1 .. h_L, c_1 .. c_L]
        self.zeros = np.zeros(len(buf), dtype=np.int64)  # row 0 of a bias, for every sequence
        self.ids = np.zeros(len(buf), dtype=np.int64)  # a padded batch's ids (padding: id 0)
        h_at = np.cumsum([0, *sizes])
        self.layers = []
        for i, gates in enumerate(gate_bufs):
            self.layers.append(
                (
                    buf[:, h_at[max(i - 1, 0)] : h_at[i + 1]],  # input: [h_(l-1), h_l], or h_1
                    gates,
                    buf[0, h_at[max(i - 1, 0)] : h_at[i + 1]] if len(buf) == 1 else None,  # batch 1: input vector
                    gates[0] if len(buf) == 1 else None,  # batch 1: gates vector
                    int(h_at[i]),  # where this layer's h starts in a row
                    int(widths + h_at[i]),  # and its c
                )
            )


class FusedStep:
    """Steps B sequences by one token on flat float32 state rows (B, S) laid out as
    lstm.flatten_state lays out a State: [h_1 .. h_L, c_1 .. c_L]. Thread-safe."""

    def __init__(self, model: LSTMLanguageModel):
        sizes = model.config.layer_sizes
        self.sizes = sizes
        emb = model.embedding.weight.detach().float()
        self.layers: list[_Layer] = []
        for i, hs in enumerate(sizes):
            w_ih, w_hh, b_ih, b_hh = (t.detach().float() for t in lstm_weights(model.lstm(i)))
            if i == 0:
                table = torch.addmm(b_ih + b_hh, emb, w_ih.t()).numpy()
                zero = np.zeros((1, 4 * hs), dtype=np.float32)
                w = _prepared(w_hh.t().numpy(), hs)
                self.layers.append(_Layer(w, zero, _prepared(table, hs), _rows_of(w)))
            else:
                w = _prepared(torch.cat([w_ih, w_hh], dim=1).t().numpy(), hs)
                self.layers.append(_Layer(w, _prepared((b_ih + b_hh).numpy()[None, :], hs), None, _rows_of(w)))
        self.dec_w = np.ascontiguousarray(model.decoder.weight.detach().float().numpy().T)  # (H_L, V)
        # every matrix a step reads, in huge pages (model/hugepages.py): the batch-1 set first
        copies = iter(huge_page_copies([*(x.wt for x in self.layers), self.dec_w, *(x.w for x in self.layers)]))
        wts = [next(copies) for _ in self.layers]
        self.dec_w = next(copies)
        self.layers = [replace(x, wt=wt, w=next(copies)) for x, wt in zip(self.layers, wts, strict=True)]
        self.dec_b = model.decoder.bias.detach().float().numpy()
        self.top = slice(sum(sizes[:-1]), sum(sizes))  # the last layer's h
        self._local = threading.local()
        # One step or logits call at a time per process. OpenBLAS with 2 threads, called from
        # several threads at once (request threads prefilling beside the scheduler's ticker),
        # collapsed: one worker with the default 2 BLAS threads served 32 streams at 0.1 tokens/s
        # (1 BLAS thread: 3,670; bench.replicas --replicas 1). Serialised, each call still has
        # every BLAS thread to itself.
        self._blas = threading.Lock()
        # compile (or load numba's cache of) the cell now, not during the first request
        self.step(np.zeros(1, dtype=np.int64), np.zeros((1, 2 * sum(sizes)), dtype=np.float32))

    def _workspace(self, batch: int) -> _Workspace:
        # Every batch size's workspace in a thread views the same buffers, sized for the largest
        # batch the thread has stepped: memory per thread is one batch's worth, however many
        # sizes it meets (a workspace of its own per size grew to ~50 MB per request thread).
        local = self._local.__dict__
        spaces: dict[int, _Workspace] = local.setdefault("spaces", {})
        ws = spaces.get(batch)
        if ws is None:
            if batch > local.get("capacity", 0):
                capacity = local["capacity"] = max(batch, 2 * local.get("capacity", 0))
                local["buf"] = np.empty((capacity, 2 * sum(self.sizes)), dtype=np.float32)
                local["gates"] = [np.empty((capacity, 4 * hs), dtype=np.float32) for hs in self.sizes]
                spaces.clear()  # their views belong to the old buffers
            gate_bufs = [g[:batch] for g in local["gates"]]
            ws = spaces[batch] = _Workspace(self.sizes, local["buf"][:batch], gate_bufs)
        return ws

    def step(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """ids (B,) int64 and rows (B, S) -> the rows after consuming ids (a new array)."""
        batch = len(ids)
        padded = -(-batch // BLOCK) * BLOCK if batch > GEMV_ROWS and batch % BLOCK >= BLOCK // 2 else batch
        ws = self._workspace(padded)
        if padded == batch:
            np.copyto(ws.buf, rows)
        else:  # the padding rows start from zeros: finite, and no denormals to slow the GEMM
            ws.buf[:batch] = rows
            ws.buf[batch:] = 0.0
            ws.ids[:batch] = ids
            ids = ws.ids
        with self._blas:
            for layer, (x, gates, x1, gates1, h_at, c_at) in zip(self.layers, ws.layers):
                if x1 is not None:
                    np.matmul(layer.wt, x1, out=gates1)
                elif batch <= GEMV_ROWS:
                    for b in range(batch):
                        np.matmul(layer.wt, x[b], out=gates[b])
                else:
                    np.matmul(x, layer.w, out=gates)
                if layer.table is not None:
                    lstm_cell(gates, layer.table, ids, ws.buf, h_at, c_at)
                else:
                    lstm_cell(gates, layer.bias, ws.zeros, ws.buf, h_at, c_at)
        return ws.buf[:batch].copy()

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """Next-token logits (B, V) after rows (B, S)."""
        with self._blas:
            out = rows[:, self.top] @ self.dec_w
        out += self.dec_b
        return out
