"""Turning a next-token distribution into a token: temperature, top-k, top-p, repetition penalty.

Every request owns a torch.Generator seeded from its seed (never the global RNG), and each
sampled token consumes exactly one uniform draw from it (UniformStream), so a seeded request
produces the same tokens whether it is decoded alone or batched with others.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .tokenizer import BOS_ID, UNK_ID

NEVER_EMITTED = (BOS_ID, UNK_ID)  # generation never produces start-of-text or <unk>
_NEVER = slice(min(NEVER_EMITTED), max(NEVER_EMITTED) + 1)  # ids 0 and 1: a slice, cheaper than a list
assert len(range(_NEVER.start, _NEVER.stop)) == len(NEVER_EMITTED)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the context

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def new_seed() -> int:
    """A random seed to report back, so any sampled output can be reproduced."""
    return secrets.randbits(63)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class UniformStream:
    """A request's uniform draws from its own torch.Generator, taken in blocks: one torch call
    per `block` tokens instead of one per token (at a 16-sequence tick the per-token calls cost
    more than the rest of sampling). The k-th draw is the same however the tokens are batched."""

    def __init__(self, generator: torch.Generator, block: int = 256):
        self.generator = generator
        self.block = block
        self._buffer: list[float] = []
        self._next = 0

    def draw(self) -> float:
        if self._next == len(self._buffer):
            self._buffer = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
            self._next = 0
        self._next += 1
        return self._buffer[self._next - 1]


def apply_repetition_penalty(logits: np.ndarray, context: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style: shrink positive and grow negative logits of tokens seen in `context` (in place)."""
    if penalty == 1.0:
        return logits
    seen = np.fromiter(set(context), dtype=np.int64)
    if seen.size:
        picked = logits[seen]
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filtered_probs(logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams]) -> np.ndarray:
    """Logits (V,) or (B, V) -> the probabilities actually sampled from (temperature, top-k, top-p).

    Rows are independent; a row gives the same numbers alone or inside a batch. Filters nobody
    asked for cost nothing: at batch 1 each numpy call costs more than its arithmetic."""
    rows = [params] if isinstance(params, SamplingParams) else list(params)
    x = np.array(logits, dtype=np.float64, ndmin=2)  # a copy: modified in place below
    # shift before dividing: the best logit becomes 0 and stays 0 at any temperature, so a tiny
    # one (even a denormal) overflows the others harmlessly to -inf instead of making inf - inf
    x -= x.max(axis=1, keepdims=True)
    temperatures = {p.temperature for p in rows}
    with np.errstate(over="ignore"):
        if len(temperatures) == 1:
            x /= temperatures.pop()
        else:
            x /= np.array([p.temperature for p in rows])[:, None]
    vocab = x.shape[1]
    if any(0 < p.top_k < vocab for p in rows):
        ks = np.array([p.top_k if 0 < p.top_k < vocab else vocab for p in rows])
        kth = -np.sort(-x, axis=1)[np.arange(len(rows)), ks - 1]
        x[x < kth[:, None]] = -np.inf
    probs = np.exp(x, out=x)
    probs /= probs.sum(axis=1, keepdims=True)
    if any(p.top_p < 1.0 for p in rows):
        top_p = np.array([p.top_p for p in rows])
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        before = np.cumsum(ranked, axis=1) - ranked
        np.put_along_axis(probs, order, np.where(before >= top_p[:, None], 0.0, ranked), axis=1)
    return probs if np.ndim(logits) == 2 else probs[0]


def sample_rows(
    logits: Tensor | np.ndarray,
    params: Sequence[SamplingParams],
    uniforms: Sequence[float],
    contexts: Sequence[Iterable[int]] | None = None,
) -> list[int]:
    """Pick one token per row of raw logits (B, V), each row with its own parameters and its own
    uniform draw in [0, 1) (ignored for greedy rows, whose callers should not draw one).

    numpy rather than torch: for rows of a few hundred logits, torch's per-op dispatch costs
    several times the arithmetic, and one vectorised pass serves a whole scheduler tick."""
    raw = logits.detach().numpy() if isinstance(logits, Tensor) else logits
    x = np.array(raw, dtype=np.float64, ndmin=2)
    x[:, _NEVER] = -np.inf
    if contexts is not None:
        for row, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(x[row], contexts[row], p.repetition_penalty)
    out: list[int] = x.argmax(axis=1).tolist()  # greedy rows are done
    sampled = [row for row, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        probs = filtered_probs(x if len(sampled) == len(params) else x[sampled], [params[r] for r in sampled])
        u = np.array([uniforms[r] for r in sampled])
        cdf = np.cumsum(probs, axis=1)
        u *= cdf[:, -1]
        index = np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1).tolist()
        for i, row in enumerate(sampled):
            k = index[i]
            while probs[i, k] == 0:  # guard against landing on a zero-width bin from rounding
                k -= 1
            out[row] = k
    return out
