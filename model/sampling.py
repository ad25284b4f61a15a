"""Turning a next-token distribution into a token: temperature, top-k, top-p, repetition,
presence and frequency penalties.

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

from .cell import compiled
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
    # OpenAI's additive penalties on the tokens generated so far (0 = off): the logit of a token
    # generated c times drops by c * frequency_penalty + (c > 0) * presence_penalty
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the count of each token generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not (np.isfinite(self.presence_penalty) and np.isfinite(self.frequency_penalty)):
            raise ValueError("presence_penalty and frequency_penalty must be finite")


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


def apply_count_penalties(logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties (in place): logits (V,) minus, for each token,
    counts * frequency + (counts > 0) * presence, where `counts` (V,) says how often each token
    has been generated so far. Negative penalties encourage repetition instead."""
    if frequency != 0.0:
        logits -= frequency * counts
    if presence != 0.0:
        logits -= presence * (counts > 0)
    return logits


def _weights(x: np.ndarray, rows: Sequence[SamplingParams]) -> np.ndarray:
    """Logits (B, V), float64, modified in place -> the unnormalised weights sampled from
    (temperature, top-k, top-p). Rows are independent: a row gives the same numbers alone or in a
    batch (rows nobody filters are sampled by _sample_plain instead)."""
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
    weights = np.exp(x, out=x)
    if any(p.top_p < 1.0 for p in rows):
        top_p = np.array([p.top_p for p in rows])
        probs = weights / weights.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        before = np.cumsum(ranked, axis=1) - ranked
        cut = np.zeros_like(weights, dtype=bool)
        np.put_along_axis(cut, order, before >= top_p[:, None], axis=1)
        weights[cut] = 0.0
    return weights


def filtered_probs(logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams]) -> np.ndarray:
    """Logits (V,) or (B, V) -> the probabilities actually sampled from (temperature, top-k, top-p)."""
    rows = [params] if isinstance(params, SamplingParams) else list(params)
    weights = _weights(np.array(logits, dtype=np.float64, ndmin=2), rows)
    probs = weights / weights.sum(axis=1, keepdims=True)
    return probs if np.ndim(logits) == 2 else probs[0]


def _pick(weights: np.ndarray, cdf: np.ndarray, u: float) -> int:
    """The token whose bin of the cumulative weights holds u * total (u in [0, 1))."""
    k = min(int(cdf.searchsorted(u * cdf[-1], side="right")), cdf.size - 1)
    while weights[k] == 0:  # only a target rounded onto the very end can land on an empty bin
        k -= 1
    return k


@compiled()  # no fastmath: the float64 sums stay in order
def _sample_plain(x: np.ndarray, never_lo: int, never_hi: int, temperature: float, u: float) -> int:
    """One row of logits (V,), float32 or float64, with no top-k or top-p, in one compiled pass:
    ids in [never_lo, never_hi) get weight 0, the others exp((x - max) / temperature) in float64
    (shifted before dividing, so the best token's weight is exactly 1 at any temperature and a
    tiny temperature overflows the others harmlessly to 0), then _pick's rule on the running sum.
    Every row without top-k or top-p is sampled here, alone or in a batch, so a seeded row gets
    the same token either way (at batch 1 this replaces ~8 numpy calls: ~5 µs of a ~90 µs token)."""
    n = x.shape[0]
    best = -np.inf
    for j in range(n):
        if (j < never_lo or j >= never_hi) and x[j] > best:
            best = np.float64(x[j])
    weights = np.zeros(n)
    cdf = np.empty(n)
    total = 0.0
    for j in range(n):
        if j < never_lo or j >= never_hi:
            weights[j] = np.exp((np.float64(x[j]) - best) / temperature)
        total += weights[j]
        cdf[j] = total
    target = u * total
    k = 0
    while k < n - 1 and cdf[k] <= target:  # the first bin whose end passes the target
        k += 1
    while weights[k] == 0:  # only a target rounded onto the very end can land on an empty bin
        k -= 1
    return k


def sample_rows(
    logits: Tensor | np.ndarray,
    params: Sequence[SamplingParams],
    uniforms: Sequence[float],
    contexts: Sequence[Iterable[int]] | None = None,
    counts: Sequence[np.ndarray | None] | None = None,
) -> list[int]:
    """Pick one token per row of raw logits (B, V), each row with its own parameters and its own
    uniform draw in [0, 1) (ignored for greedy rows, whose callers should not draw one).

    numpy rather than torch: for rows of a few hundred logits, torch's per-op dispatch costs
    several times the arithmetic, and one vectorised pass serves a whole scheduler tick.
    `counts[i]` (V,): how often each token has been generated in row i, for rows whose params
    have presence or frequency penalties (None otherwise)."""
    raw = logits.detach().numpy() if isinstance(logits, Tensor) else logits
    if len(params) == 1 and _plain(params[0]) and not _penalised(params[0]):  # the common case, fast
        only = np.ascontiguousarray(np.reshape(raw, -1))
        return [_sample_plain(only, _NEVER.start, _NEVER.stop, params[0].temperature, uniforms[0])]
    x = np.array(raw, dtype=np.float64, ndmin=2)
    x[:, _NEVER] = -np.inf
    if contexts is not None:
        for row, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(x[row], contexts[row], p.repetition_penalty)
    if counts is not None:
        for row, p in enumerate(params):
            seen = counts[row]
            if seen is not None and p.counts_tokens:
                apply_count_penalties(x[row], seen, p.presence_penalty, p.frequency_penalty)
    out: list[int] = x.argmax(axis=1).tolist()  # greedy rows are done
    filtered = []
    for row, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        if _plain(p):
            out[row] = _sample_plain(x[row], _NEVER.start, _NEVER.stop, p.temperature, uniforms[row])
        else:
            filtered.append(row)
    if filtered:
        weights = _weights(x if len(filtered) == len(params) else x[filtered], [params[r] for r in filtered])
        cdf = np.cumsum(weights, axis=1)
        for i, row in enumerate(filtered):
            out[row] = _pick(weights[i], cdf[i], uniforms[row])
    return out


def warm_up() -> None:
    """Compile (or load numba's cache of) the sampling kernel for the logits it meets: float32 rows
    alone, float64 rows in a batch. Costs ~0.4-1 s once; a server does it at start-up, so its
    first sampled request does not."""
    plain = SamplingParams()
    sample_rows(np.zeros((1, 3), dtype=np.float32), [plain], [0.5])
    sample_rows(np.zeros((2, 3), dtype=np.float32), [plain, plain], [0.5, 0.5])


def _plain(p: SamplingParams) -> bool:
    """Sampled with temperature alone (no top-k, no top-p): _sample_plain's rows."""
    return p.temperature != 0.0 and p.top_k == 0 and p.top_p == 1.0


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.counts_tokens
