"""Inference engine: prefill, scoring and the decode step, all on flat float32 state rows.

A state is a numpy array (B, S), S = `Engine.state_size`, laid out [h_1 .. h_L, c_1 .. c_L]
(lstm.flatten_state): the decode step's own layout and a session's stored bytes, so nothing
converts between the service and the model. The (h, c) tuples of nn.LSTM (lstm.State) stay
inside this module, for whole-sequence prefill and scoring.

Decoding runs on model.fused.FusedStep (one GEMM per layer in numpy; its docstring says why
each choice was measured). Prefill (prompts, session priming) and scoring are whole-sequence
nn.LSTM calls, which is what oneDNN is good at, in windows of `window` tokens carrying the
state, so a 100,000-token text costs a bounded amount of memory; below SHORT_PREFILL tokens a
loop of fused steps is faster than that call's fixed cost.

Results equal nn.LSTM's to float32 rounding (tests/test_lstm.py checks max |Δ logprob| <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .fused import FusedStep
from .lstm import LSTMLanguageModel, State, flatten_state, state_size, unflatten_state
from .quantize import is_quantized
from .tokenizer import BOS_ID

SHORT_PREFILL = 40  # tokens: below this a loop of fused steps beats one nn.LSTM call (measured break-even ~45)
WINDOW = 2048  # tokens per whole-sequence call: memory stays bounded, speed is what one call gets


class Engine:
    """Stateless with respect to sessions: every call takes state rows and returns new ones.

    An int8 (dynamically quantized) model has no fp32 weights to fuse; it is stepped through
    its quantized modules instead (slower per token; see the model cards for measurements).
    """

    def __init__(self, model: LSTMLanguageModel, window: int = WINDOW):
        model.eval()
        self.model = model
        self.config = model.config
        self.state_size = state_size(model.config)
        self.vocab_size = model.config.vocab_size
        self.window = window
        self._fused = None if is_quantized(model) else FusedStep(model)
        with torch.no_grad():
            _, after_bos = model(torch.tensor([[BOS_ID]]), None)
        self._start = self._rows(after_bos)

    @property
    def fused(self) -> bool:
        return self._fused is not None

    # ---- conversions, for the nn.LSTM path only ----------------------------------------------

    @staticmethod
    def _rows(state: State) -> np.ndarray:
        return np.ascontiguousarray(flatten_state(state).detach().float().numpy())

    def _state(self, rows: np.ndarray) -> State:
        # a copy: nn.LSTM must not write into the caller's rows
        return unflatten_state(torch.from_numpy(np.array(rows, dtype=np.float32, ndmin=2)), self.config)

    # ---- the API -------------------------------------------------------------------------------

    def start(self, batch: int = 1) -> np.ndarray:
        """Rows (batch, S) of the state after <s>, where every text begins (a new array)."""
        return np.repeat(self._start, batch, axis=0)

    def step(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Consume one token for each of B sequences: ids (B,) int64, rows (B, S) -> new rows (B, S).
        `rows` is not modified."""
        if self._fused is None:
            with torch.no_grad():
                _, new_state = self.model.hidden(torch.from_numpy(ids).view(-1, 1), self._state(rows))
            return self._rows(new_state)
        return self._fused.step(ids, rows)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """Next-token logits (B, V) after rows (B, S); in eval mode a function of the top h."""
        if self._fused is None:
            with torch.no_grad():
                return self.model.decoder(self._state(rows)[-1][0]).float().numpy()
        return self._fused.logits(rows)

    def log_probs(self, rows: np.ndarray) -> np.ndarray:
        """Next-token log-probabilities (B, V), float64."""
        x = self.logits(rows).astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        return x

    def _windows(self, ids: list[int] | np.ndarray) -> list[Tensor]:
        tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(1, -1)
        return list(tokens.split(self.window, dim=1))

    @torch.no_grad()
    def prefill(self, ids: list[int] | np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Consume a token sequence for one sequence: rows (1, S) -> rows (1, S).

        A whole-sequence nn.LSTM call has a fixed cost of a few milliseconds (oneDNN sets up
        its primitive per call), about what SHORT_PREFILL fused steps cost; below that length
        the steps are faster, which is what keeps a one-token /next at ~1 ms."""
        if len(ids) == 0:
            return np.array(rows, dtype=np.float32, ndmin=2)
        if self._fused is not None and len(ids) < SHORT_PREFILL:
            for token in np.asarray(ids, dtype=np.int64).reshape(-1, 1):
                rows = self._fused.step(token, rows)
            return rows
        state = self._state(rows)
        for window in self._windows(ids):
            _, state = self.model.hidden(window, state)  # no output layer: nothing reads those logits
        return self._rows(state)

    @torch.no_grad()
    def score(self, ids: list[int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-probability (T,) float64 of each of `ids` given rows (1, S) and the ids before it,
        and the rows after them. Window by window: only (window, V) logits exist at a time."""
        if not ids:
            return np.zeros(0), np.array(rows, dtype=np.float32, ndmin=2)
        out = [self.log_probs(rows)[0, ids[0]].reshape(1)]
        state = self._state(rows)
        windows = self._windows(ids)
        for k, window in enumerate(windows):
            logits, state = self.model(window, state)
            logp = torch.log_softmax(logits[0].double(), dim=-1)  # (T, V)
            # position t predicts token t + 1; a window's last position predicts the next window's first
            following = window[0, 1:] if k + 1 == len(windows) else torch.cat([window[0, 1:], windows[k + 1][0, :1]])
            out.append(logp[: following.numel()].gather(1, following.unsqueeze(1)).squeeze(1).numpy())
        return np.concatenate(out), self._rows(state)


def greedy_steps(engine: Engine, n: int, first: int = 2) -> list[int]:
    """n steps of greedy decoding from <s> on the engine's state rows: the decode step the
    service runs at batch 1, without sampling (what the model card and bench/decode.py time)."""
    rows = engine.start()
    token = np.array([first])
    out = []
    for _ in range(n):
        rows = engine.step(token, rows)
        token = engine.logits(rows).argmax(axis=1)
        out.append(int(token[0]))
    return out
