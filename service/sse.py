"""Server-Sent Events for /generate: one `data:` line per token, then a final summary or error.

A streamed token is the same few bytes every time its id comes up (unless logprobs were asked
for), so each id's event is serialised once per process and reused: under load the request
threads spend their time writing, not encoding JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from model.generation import TokenEvent

from .errors import ApiError
from .schemas import StreamFinal


class SSEEncoder:
    def __init__(self, vocab_size: int, token_text: Callable[[int], str], label: Callable[[int], str]):
        self._label = label
        self._plain = [self._line({"token": token_text(i), "id": i}) for i in range(vocab_size)]

    @staticmethod
    def _line(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def event_dict(self, event: TokenEvent) -> dict[str, Any]:
        """A generated token as the GeneratedToken schema describes it."""
        out: dict[str, Any] = {"token": event.text, "id": event.id}
        if event.logprob is not None:
            out["logprob"] = event.logprob
        if event.top is not None:
            out["top_logprobs"] = [{"token": self._label(i), "id": i, "logprob": lp} for i, lp in event.top]
        return out

    def tokens(self, events: Iterable[TokenEvent]) -> bytes:
        """One chunk holding an event per token."""
        plain = self._plain
        return b"".join(
            plain[e.id] if e.id is not None and e.logprob is None else self._line(self.event_dict(e)) for e in events
        )

    def final(self, item: StreamFinal | ApiError) -> bytes:
        if isinstance(item, ApiError):
            return self._line({"error": {"code": item.code, "message": item.message, "details": item.details}})
        return self._line(item.model_dump(mode="json"))
