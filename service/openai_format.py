"""OpenAI's response shapes as plain dicts (service.openai_schemas describes them; building a
pydantic object per streamed token would cost more than generating it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from model.generation import TokenEvent

Body = dict[str, Any]


def sse(body: Body | str) -> bytes:
    """One Server-Sent Event; strict JSON (never NaN or Infinity)."""
    data = body if isinstance(body, str) else json.dumps(body, allow_nan=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


def finish_reason(reason: str) -> str:
    """OpenAI knows "stop" and "length"; a generation cut by the server's time limit ran out of
    room like one cut by max_tokens."""
    return "stop" if reason == "stop" else "length"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Body:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _logprob(event: TokenEvent) -> float:
    # every event asked for logprobs carries one (a stop-cut piece carries its token's)
    return float(event.logprob) if event.logprob is not None else 0.0


def completion_logprobs(
    events: Sequence[TokenEvent], labels: Sequence[str], top_n: int, offset: int
) -> tuple[Body, int]:
    """The legacy logprobs object of /v1/completions for these tokens, and the offset after them
    (`offset`: where the first token starts in prompt + completion)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in events:
        tokens.append(e.text)
        token_logprobs.append(_logprob(e))
        top.append({labels[i]: lp for i, lp in (e.top or [])[:top_n]})
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


def _entry(text: str, logprob: float) -> Body:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_logprobs(events: Sequence[TokenEvent], labels: Sequence[str], top_n: int) -> Body:
    """The `logprobs` of a chat choice (or of one chunk's delta)."""
    content = []
    for e in events:
        entry = _entry(e.text, _logprob(e))
        entry["top_logprobs"] = [_entry(labels[i], lp) for i, lp in (e.top or [])[:top_n]]
        content.append(entry)
    return {"content": content, "refusal": None}


def head(kind: str, run_id: str, created: int, model: str, fingerprint: str) -> Body:
    """The fields every response and chunk starts with."""
    return {"id": run_id, "object": kind, "created": created, "model": model, "system_fingerprint": fingerprint}
