"""Bits and nats per character, token perplexity.

Measured per *character of the text* whatever the tokenizer, so character and subword models
compare: total negative log-likelihood of the tokens / number of characters. The state is
carried across the whole text (never reset per window), starting from <s>.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .lstm import LSTMLanguageModel
from .tokenizer import BOS_ID, Tokenizer


@dataclass
class EvalResult:
    nats_per_char: float
    bits_per_char: float
    token_perplexity: float
    num_tokens: int
    num_chars: int
    unknown_chars: int
    total_nats: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def stream_nll(model: LSTMLanguageModel, stream: Tensor, chunk: int = 2048) -> tuple[float, int]:
    """Sum of -log p(stream[t+1] | stream[:t+1]) over the stream, one state carried throughout.

    Returns (total nats, number of predicted tokens). `stream` is 1-D and starts with <s>.
    """
    was_training = model.training
    model.eval()
    state = None
    total = 0.0
    n = stream.numel() - 1
    try:
        for start in range(0, n, chunk):
            inputs = stream[start : min(start + chunk, n)].unsqueeze(0)  # (1, T)
            targets = stream[start + 1 : start + 1 + inputs.size(1)].unsqueeze(0)
            logits, state = model(inputs, state)
            total += F.cross_entropy(logits.squeeze(0).float(), targets.squeeze(0), reduction="sum").item()
    finally:
        model.train(was_training)
    return total, max(n, 0)


def summarize(total_nats: float, num_tokens: int, num_chars: int, unknown_chars: int) -> EvalResult:
    per_char = total_nats / num_chars if num_chars else float("nan")
    return EvalResult(
        nats_per_char=per_char,
        bits_per_char=per_char / math.log(2),
        token_perplexity=math.exp(total_nats / num_tokens) if num_tokens else float("nan"),
        num_tokens=num_tokens,
        num_chars=num_chars,
        unknown_chars=unknown_chars,
        total_nats=total_nats,
    )


def evaluate_text(model: LSTMLanguageModel, tokenizer: Tokenizer, text: str) -> EvalResult:
    """Score `text` as one document that starts at <s>."""
    enc = tokenizer.encode_with_unknowns(text)
    stream = torch.tensor([BOS_ID, *enc.ids], dtype=torch.long)
    total, n = stream_nll(model, stream)
    return summarize(total, n, len(text), enc.unknown_chars)
