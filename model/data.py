"""Corpus -> train/validation token streams -> batches for truncated BPTT.

The corpus is a list of documents (one per file). The last `val_fraction` of its *characters*
is validation, so character and subword models are measured on exactly the same text (on Tiny
Shakespeare with 0.1 this is nanoGPT's split). Every document starts with <s>.

Batching cuts the training stream into B contiguous rows and walks them in windows of T:

    stream: a b c d e f g h i j k l m n o p q r s t u v w x      B = 3
    rows:   a b c d e f g h  |  i j k l m n o p  |  q r s t u v w x
    window 0 (T = 3): inputs  a b c / i j k / q r s   targets  b c d / j k l / r s t
    window 1:         inputs  d e f / l m n / t u v   targets  e f g / m n o / u v w

The LSTM state of row b after window k is the right state for row b at window k + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .tokenizer import BOS_ID, Tokenizer


class CorpusError(ValueError):
    """A training file is missing, not UTF-8, or too small to split."""


def read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CorpusError(f"training file {path} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not any(texts):
        raise CorpusError("the training files are empty")
    return texts


def split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split the concatenated documents at a character position: the last part is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError("val_fraction must be between 0 and 1")
    total = sum(len(t) for t in texts)
    cut = int(total * (1 - val_fraction))
    train, val = [], []
    seen = 0
    for text in texts:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            val.append(text)
        else:
            train.append(text[: cut - seen])
            val.append(text[cut - seen :])
        seen += len(text)
    return train, val


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> Tensor:
    """One token stream: <s> doc1 <s> doc2 ..."""
    ids: list[int] = []
    for doc in documents:
        ids.append(BOS_ID)
        ids.extend(tokenizer.encode(doc))
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class BatchStream:
    """A token stream laid out as (B, N) rows, walked in windows of `bptt` tokens.

    With `max_offset` > 0 each epoch may cut its rows starting a few tokens into the stream, so
    over many epochs the model does not see the same windows at the same boundaries every time
    (a cheap augmentation that matters once a small corpus has been seen dozens of times).
    """

    stream: Tensor  # (N,)
    batch_size: int
    bptt: int
    max_offset: int = 0

    @classmethod
    def from_stream(cls, stream: Tensor, batch_size: int, bptt: int, max_offset: int = 0) -> BatchStream:
        batches = cls(stream, batch_size, bptt, max_offset)
        if batches.row_length < bptt + 1:
            raise CorpusError(
                f"training text too small: {stream.numel()} tokens cannot fill {batch_size} rows "
                f"of {bptt + 1} (plus an epoch offset of up to {max_offset}); lower --batch-size, --bptt "
                "or --epoch-offset"
            )
        return batches

    @property
    def row_length(self) -> int:
        """Tokens per row; the same for every offset, so every epoch has the same windows."""
        return (self.stream.numel() - self.max_offset) // self.batch_size

    @property
    def windows_per_epoch(self) -> int:
        return (self.row_length - 1) // self.bptt

    def epoch_offset(self, seed: int, epoch: int) -> int:
        """Where epoch `epoch` starts cutting rows: a function of (seed, epoch) only, so a resumed
        run recomputes it instead of storing it."""
        if self.max_offset == 0:
            return 0
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return int(torch.randint(0, self.max_offset + 1, (1,), generator=gen).item())

    def window(self, index: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Inputs and targets of window `index` within an epoch cut at `offset`, each (B, T)."""
        if not 0 <= offset <= self.max_offset:
            raise ValueError(f"offset {offset} outside 0..{self.max_offset}")
        n = self.row_length
        rows = self.stream[offset : offset + n * self.batch_size].view(self.batch_size, n)
        start = index * self.bptt
        chunk = rows[:, start : start + self.bptt + 1]
        return chunk[:, :-1], chunk[:, 1:]
