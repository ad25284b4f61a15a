"""Inference engine: whole-sequence prefill and a fast single-token decode step.

Decoding runs on model.fused.FusedStep (one GEMM per layer in numpy, on flat state rows; its
docstring says why each choice was measured). Prefill (prompts, session priming, scoring) is one
whole-sequence nn.LSTM call per layer, which is what oneDNN is good at; below SHORT_PREFILL
tokens a loop of fused steps is faster than that call's fixed cost.

Results equal nn.LSTM's to float32 rounding (tests/test_lstm.py checks max |Δ logprob| <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .fused import FusedStep
from .lstm import LSTMLanguageModel, State, flatten_state, unflatten_state
from .quantize import is_quantized
from .tokenizer import BOS_ID

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
        self._fused = FusedStep(model) if self.fused else None

    def start_state(self, batch_size: int = 1) -> State:
        """The state after <s>: where every text begins."""
        return tuple((h.expand(batch_size, -1).clone(), c.expand(batch_size, -1).clone()) for h, c in self._start)

    # The decode path works on flat float32 rows (B, S), S = state_size(config), laid out as
    # lstm.flatten_state lays out a State: [h_1 .. h_L, c_1 .. c_L]. A session's stored state
    # is the same bytes, and a row of a batch is a numpy view, so the scheduler never converts.

    def rows(self, state: State) -> np.ndarray:
        """State -> flat rows (B, S), float32."""
        return np.ascontiguousarray(flatten_state(state).detach().float().numpy())

    def state_of(self, rows: np.ndarray) -> State:
        """Flat rows (B, S) -> State (copies, so the State owns its memory)."""
        return unflatten_state(torch.from_numpy(np.array(rows, dtype=np.float32, ndmin=2)), self.config)

    @torch.no_grad()
    def prefill(self, ids: list[int] | Tensor, state: State) -> State:
        """Consume a whole token sequence for one sequence (B = 1) in one call per layer.

        A whole-sequence nn.LSTM call has a fixed cost of a few milliseconds (oneDNN sets up
        its primitive per call), about what SHORT_PREFILL fused steps cost; below that length
        the steps are faster, which is what keeps a one-token /next at ~1 ms."""
        if len(ids) == 0:
            return state
        if self.fused and len(ids) < SHORT_PREFILL:
            rows = self.rows(state)
            for token in np.asarray(ids, dtype=np.int64).reshape(-1, 1):
                rows = self.step_rows(token, rows)
            return self.state_of(rows)
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
        return self.state_of(self.step_rows(np.asarray(ids, dtype=np.int64).reshape(-1), self.rows(state)))

    def step_rows(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Consume one token for each of B sequences: ids (B,) int64, rows (B, S) -> new rows (B, S).
        `rows` is not modified."""
        if self._fused is None:
            with torch.no_grad():
                _, new_state = self.model.hidden(torch.from_numpy(ids).view(-1, 1), self.state_of(rows))
            return self.rows(new_state)
        return self._fused.step(ids, rows)

    def logits_rows(self, rows: np.ndarray) -> np.ndarray:
        """Next-token logits (B, V) after flat rows (B, S); in eval mode a function of the top h."""
        if self._fused is None:
            return self.logits(self.state_of(rows)).numpy()
        return self._fused.logits(rows)

    def logits(self, state: State) -> Tensor:
        """Next-token logits (B, V) after `state`."""
        if not self.fused:
            with torch.no_grad():
                return self.model.decoder(state[-1][0]).float()
        return torch.from_numpy(self.logits_rows(self.rows(state)))

    def log_probs(self, state: State) -> Tensor:
        return torch.log_softmax(self.logits(state), dim=-1)


def greedy_steps(engine: Engine, n: int, first: int = 2) -> list[int]:
    """n steps of greedy decoding from <s> on the engine's state rows, as the service's scheduler
    runs them at batch 1 (what the model card and bench/decode.py time)."""
    rows = engine.rows(engine.start_state())
    token = np.array([first])
    out = []
    for _ in range(n):
        rows = engine.step_rows(token, rows)
        token = engine.logits_rows(rows).argmax(axis=1)
        out.append(int(token[0]))
    return out
