from __future__ import annotations

import json
from typing import Any

from model import LanguageModel
from model.generation import TokenEvent
from service.errors import ApiError
from service.schemas import StreamFinal, Usage
from service.sse import SSEEncoder


def _events(chunk: bytes) -> list[dict[str, Any]]:
    lines = chunk.decode().split("\n\n")
    assert lines[-1] == ""  # every event ends with a blank line
    assert all(line.startswith("data: ") and "\n" not in line for line in lines[:-1])
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_cached_token_events_are_exact_json(any_lm: LanguageModel) -> None:
    tok = any_lm.tokenizer
    enc = SSEEncoder(tok.texts, tok.texts)
    ids = list(range(2, tok.vocab_size))
    got = _events(enc.tokens(TokenEvent(tok.token_text(i), i) for i in ids))
    assert got == [{"token": tok.token_text(i), "id": i} for i in ids]


def test_unusual_tokens_logprobs_and_cut_pieces() -> None:
    texts = {2: "\n", 3: '"', 4: "\\", 5: "\x00", 6: "日", 7: "😀", 8: "e\u0301"}
    enc = SSEEncoder([texts.get(i, "?") for i in range(9)], [f"<{i}>" for i in range(9)])
    events = [
        TokenEvent("\n", 2),
        TokenEvent('"', 3, logprob=-0.5, top=[(3, -0.5), (4, -1.5)]),
        TokenEvent("a piece cut by a stop", None),
        *(TokenEvent(texts[i], i) for i in (4, 5, 6, 7, 8)),
    ]
    got = _events(enc.tokens(events))
    assert got[0] == {"token": "\n", "id": 2}
    assert got[1] == {
        "token": '"',
        "id": 3,
        "logprob": -0.5,
        "top_logprobs": [{"token": "<3>", "id": 3, "logprob": -0.5}, {"token": "<4>", "id": 4, "logprob": -1.5}],
    }
    assert got[2] == {"token": "a piece cut by a stop", "id": None}
    assert [e["token"] for e in got[3:]] == ["\\", "\x00", "日", "😀", "e\u0301"]


def test_final_and_error_events() -> None:
    enc = SSEEncoder(["", "?", "a"], ["<s>", "<unk>", "a"])
    usage = Usage(prompt_tokens=1, completion_tokens=2, session_tokens=3)
    final = StreamFinal(finish_reason="stop", session_id=None, seed=7, usage=usage, unknown_chars=0, text="ab")
    (event,) = _events(enc.final(final.model_dump(mode="json")))
    assert event["finish_reason"] == "stop" and event["usage"]["session_tokens"] == 3 and event["text"] == "ab"
    (error,) = _events(enc.final(ApiError(409, "session_conflict", "changed", None)))
    assert error == {"error": {"code": "session_conflict", "message": "changed", "details": None}}
