"""Property test: whatever JSON a client sends to any endpoint, the answer is a 2xx or a 4xx in the
one error shape, never a 500, and generated text never contains <s> or <unk>."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import AppFactory

LIVE = "L" * 32  # replaced by a real session id in the test

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# any code point, lone surrogates included (JSON-escaped on the wire)
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "e\u0301", "😀👍🏽", "日本", "\n\n", "   "]
)
VALID = {
    "prompt": texts,
    "text": texts,
    "session_id": st.sampled_from([LIVE, "x" * 32]),
    "max_tokens": st.integers(0, 20),
    "temperature": st.floats(0.0, 3.0) | st.sampled_from([0.0, 1e-300, 5e-324]),
    "top_k": st.integers(0, 80),
    "top_p": st.floats(0.001, 1.0),
    "repetition_penalty": st.floats(0.1, 5.0),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "seed": st.integers(0, 2**63 - 1),
    "logprobs": st.integers(0, 6),
    "stream": st.booleans(),
    "top_n": st.integers(0, 80),
    "commit": st.booleans(),
    "ids": st.lists(st.integers(-2, 80), max_size=20),
}
REQUIRED = {"/generate": ["max_tokens"], "/score": ["text"], "/tokenize": ["text"], "/detokenize": ["ids"]}
OPTIONAL = {
    "/generate": [
        "prompt",
        "session_id",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "stop",
        "seed",
        "logprobs",
        "stream",
    ],
    "/next": ["text", "session_id", "top_n", "commit"],
    "/score": ["session_id", "commit"],
    "/sessions": ["text"],
}
PATHS = ["/generate", "/next", "/score", "/tokenize", "/detokenize", "/sessions"]


def field(name: str) -> st.SearchStrategy[Any]:
    """Mostly a plausible value (7 in 8), sometimes anything at all."""
    return st.integers(0, 7).flatmap(lambda k: junk if k == 0 else VALID[name])


def bodies(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """A body with each field mostly plausible; one in eight carries an unknown field too."""
    required = {name: field(name) for name in REQUIRED.get(path, [])}
    optional = {name: field(name) for name in OPTIONAL.get(path, [])}
    plain = st.fixed_dictionaries(required, optional=optional)
    extra = st.fixed_dictionaries({**required, "unknown": junk}, optional=optional)
    return st.integers(0, 7).flatmap(lambda k: extra if k == 0 else plain)


def test_no_body_makes_a_500(make_app: AppFactory) -> None:
    client = make_app(max_tokens_limit=16, max_prompt_chars=300).test_client()
    sid = client.post("/sessions", json={"text": "A"}).get_json()["session_id"]
    seen: dict[str, set[int]] = {path: set() for path in PATHS}

    @settings(max_examples=600, deadline=None, database=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(PATHS))
        body = json.loads(json.dumps(data.draw(bodies(path))).replace(LIVE, sid))
        r = client.post(
            path, data=json.dumps(body), content_type="application/json"
        )  # NaN/Infinity as Python sends them
        seen[path].add(r.status_code // 100)
        assert r.status_code < 500, (path, body, r.data)
        if r.status_code >= 400:
            error = r.get_json()["error"]
            assert set(error) == {"code", "message", "details"} and error["message"]
            return
        if r.mimetype == "text/event-stream":
            events = [json.loads(line[6:]) for line in r.data.decode().split("\n\n") if line.startswith("data: ")]
            assert "finish_reason" in events[-1] or "error" in events[-1], events[-1]
            ids = [e["id"] for e in events[:-1] if e.get("id") is not None]
            final = events[-1]
        else:
            final = r.get_json()
            tokens = r.get_json().get("tokens") if path == "/generate" else None
            ids = [t["id"] for t in tokens or []]
        assert not {0, 1} & set(ids)  # generation never emits <s> or <unk>
        if path == "/generate" and "usage" in final:
            # a character model's tokens are characters: an emitted <s> would leave no trace but this
            assert len(final["text"]) == final["usage"]["completion_tokens"], final

    check()
    # the bodies must reach the model, not only the validator: every endpoint answered both ways
    assert all(seen[path] == {2, 4} for path in PATHS), seen
