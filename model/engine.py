"""Inference engine: whole-sequence prefill and a fused single-token decode step.

Decoding one token through nn.LSTM costs far more in per-call overhead than in arithmetic
(three modules, oneDNN primitive setup, autograd bookkeeping). The step here does per layer one
GEMM of [x, h] against the pre-transposed, concatenated gate weights, in numpy: OpenBLAS's
GEMV measured ~3x faster than torch's single-row addmm on this machine (bench/decode.py prints
the comparison in every run). The first layer's input projection is a table lookup:
embedding @ W_ih^T + biases is precomputed once per vocabulary entry. (The service runs
OpenBLAS on one thread per worker: see Settings.blas_threads.) For batched steps torch's matmul
measured up to 2x faster than OpenBLAS's sgemm at 2-16 rows in isolation, yet the service under
load (two workers, 8 and 32 streaming clients) ran at half the throughput with it, so numpy
stays for every batch size.

Prefill (prompts, session priming, scoring) is one whole-sequence nn.LSTM call per layer,
which is what oneDNN is good at.

Results equal nn.LSTM's to float32 rounding (tests/test_lstm.py checks max |Δ logprob| <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .lstm import LSTMLanguageModel, State, lstm_weights
from .quantize import is_quantized
from .tokenizer import BOS_ID


def _sigmoid_(x: np.ndarray) -> np.ndarray:
    """In-place logistic function."""
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += 1.0
    return np.reciprocal(x, out=x)


def gate_order(hidden: int) -> np.ndarray:
    """Column permutation from PyTorch's gate order (i, f, g, o) to (i, f, o, g): the three
    sigmoid gates become one contiguous block, so a step needs one sigmoid and one tanh call."""
    i, f, g, o = (np.arange(k * hidden, (k + 1) * hidden) for k in range(4))
    return np.concatenate([i, f, o, g])


class _FusedLayer:
    """One LSTM layer as a single matrix: gates (B, 4H) = [x, h] (B, I+H) @ W (I+H, 4H) + b,
    with W's columns in (i, f, o, g) order."""

    def __init__(self, lstm: torch.nn.LSTM, input_table: np.ndarray | None):
        weights = lstm_weights(lstm)
        w_ih, w_hh = (w.detach().float().numpy() for w in weights[:2])
        self.hidden = w_hh.shape[1]
        order = gate_order(self.hidden)
        self.b = (weights[2] + weights[3]).detach().float().numpy()[order]  # folded into the table for layer 1
        self.input_table = None if input_table is None else np.ascontiguousarray(input_table[:, order])  # (V, 4H)
        w = w_hh if input_table is not None else np.concatenate([w_ih, w_hh], axis=1)
        self.w = np.ascontiguousarray(w.T[:, order])  # (H, 4H) for layer 1, else (I+H, 4H)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: token ids (B,) for the first layer, else (B, I); h, c: (B, H)."""
        hs = self.hidden
        if self.input_table is not None:
            gates = h @ self.w
            gates += self.input_table[x]
        else:
            gates = np.concatenate([x, h], axis=1) @ self.w
            gates += self.b
        sig = _sigmoid_(gates[:, : 3 * hs])  # i, f, o
        g = np.tanh(gates[:, 3 * hs :])
        c_new = sig[:, hs : 2 * hs] * c
        c_new += sig[:, :hs] * g
        h_new = np.tanh(c_new)
        h_new *= sig[:, 2 * hs : 3 * hs]
        return h_new, c_new


SHORT_PREFILL = 40  # tokens: below this a loop of fused steps beats one nn.LSTM call (measured break-even ~45)


class Engine:
    """Stateless with respect to sessions: every call takes a state and returns a new one.

    An int8 (dynamically quantized) model has no fp32 weights to fuse; it is stepped through
    its quantized modules instead (slower per token; see the model cards for measurements).
    """

    def __init__(self, model: LSTMLanguageModel):
        model.eval()
        self.model = model
        self.config = model.config
        self.fused = not is_quantized(model)
        with torch.no_grad():
            _, self._start = model(torch.tensor([[BOS_ID]]), None)
        if self.fused:
            self._build_fused(model)

    def _build_fused(self, model: LSTMLanguageModel) -> None:
        emb = model.embedding.weight.detach().float()
        first = model.lstm(0)
        w_ih, _, b_ih, b_hh = lstm_weights(first)
        table = torch.addmm(b_ih + b_hh, emb, w_ih.t()).detach().numpy()
        self._layers = [_FusedLayer(first, np.ascontiguousarray(table))]
        self._layers += [_FusedLayer(model.lstm(i), None) for i in range(1, len(model.layers))]
        self._dec_w = np.ascontiguousarray(model.decoder.weight.detach().float().numpy().T)  # (H_L, V)
        self._dec_b = model.decoder.bias.detach().float().numpy()

    def start_state(self, batch_size: int = 1) -> State:
        """The state after <s>: where every text begins."""
        return tuple((h.expand(batch_size, -1).clone(), c.expand(batch_size, -1).clone()) for h, c in self._start)

    @torch.no_grad()
    def prefill(self, ids: list[int] | Tensor, state: State) -> State:
        """Consume a whole token sequence for one sequence (B = 1) in one call per layer.

        A whole-sequence nn.LSTM call has a fixed cost of a few milliseconds (oneDNN sets up
        its primitive per call), about what SHORT_PREFILL fused steps cost; below that length
        the steps are faster, which is what keeps a one-token /next at ~1 ms."""
        if len(ids) == 0:
            return state
        if self.fused and len(ids) < SHORT_PREFILL:
            for token in ids:
                state = self.step([int(token)], state)
            return state
        tokens = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
        _, new_state = self.model.hidden(tokens, state)  # no output layer: nothing reads those logits
        return new_state

    @torch.no_grad()
    def score(self, ids: list[int], state: State) -> tuple[Tensor, State]:
        """Log-probability of each of `ids` (T,) given `state` and the ids before it; one call."""
        if not ids:
            return torch.zeros(0), state
        first = self.log_probs(state)[0, ids[0]].view(1)
        tokens = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
        logits, new_state = self.model(tokens, state)
        rest = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, tokens[0, 1:].unsqueeze(1)).squeeze(1)
        return torch.cat([first, rest]), new_state

    def step(self, ids: Tensor | np.ndarray | list[int], state: State) -> State:
        """Consume one token for each of B sequences: ids (B,), state of batch B."""
        if not self.fused:
            with torch.no_grad():
                _, new_state = self.model.hidden(torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(-1, 1), state)
            return new_state
        x: np.ndarray = np.asarray(ids, dtype=np.int64)
        new = []
        for layer, (h, c) in zip(self._layers, state):
            h_new, c_new = layer.step(x, h.numpy(), c.numpy())
            new.append((torch.from_numpy(h_new), torch.from_numpy(c_new)))
            x = h_new
        return tuple(new)

    def logits(self, state: State) -> Tensor:
        """Next-token logits (B, V) after `state`; in eval mode they are a function of the top h."""
        if not self.fused:
            with torch.no_grad():
                return self.model.decoder(state[-1][0]).float()
        h = state[-1][0].detach().numpy()
        out = h @ self._dec_w
        out += self._dec_b
        return torch.from_numpy(out)

    def log_probs(self, state: State) -> Tensor:
        return torch.log_softmax(self.logits(state), dim=-1)


def stack_states(states: list[State]) -> State:
    """Batch single-sequence states along B."""
    return tuple(
        (torch.cat([s[i][0] for s in states]), torch.cat([s[i][1] for s in states])) for i in range(len(states[0]))
    )


def split_state(state: State) -> list[State]:
    """The inverse of stack_states: one state per row."""
    batch = state[0][0].size(0)
    return [tuple((h[b : b + 1].clone(), c[b : b + 1].clone()) for h, c in state) for b in range(batch)]
