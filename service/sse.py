"""Server-Sent Events for /generate: one `data:` line per token, then a final summary or error.

A streamed token is the same few bytes every time its id comes up (unless logprobs were asked
for), so each id's event is serialised once per process and reused: under load the request
threads spend their time writing, not encoding JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from model.generation import TokenEvent

from .errors import ApiError


class SSEEncoder:
    def __init__(self, texts: Sequence[str], labels: Sequence[str]):
        """`texts`: each token id's text; `labels`: its display name (specials by name)."""
        self._labels = labels
        self._plain = [self._line({"token": text, "id": i}) for i, text in enumerate(texts)]

    @staticmethod
    def _line(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, allow_nan=False).encode() + b"\n\n"

    def event_dict(self, event: TokenEvent) -> dict[str, Any]:
        """A generated token as the GeneratedToken schema describes it."""
        out: dict[str, Any] = {"token": event.text, "id": event.id}
        if event.logprob is not None:
            out["logprob"] = event.logprob
        if event.top is not None:
            out["top_logprobs"] = [{"token": self._labels[i], "id": i, "logprob": lp} for i, lp in event.top]
        return out

    def tokens(self, events: Iterable[TokenEvent]) -> bytes:
        """One chunk holding an event per token."""
        plain = self._plain
        return b"".join(
            plain[e.id] if e.id is not None and e.logprob is None else self._line(self.event_dict(e)) for e in events
        )

    def final(self, item: dict[str, Any] | ApiError) -> bytes:
        if isinstance(item, ApiError):
            return self._line({"error": {"code": item.code, "message": item.message, "details": item.details}})
        return self._line(item)
