"""Property test for /v1: whatever an OpenAI client sends, the answer is a 2xx or a 4xx in
OpenAI's error shape, never a 500, and an answer's text and usage agree."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import AppFactory

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=30) | st.sampled_from(
    ["\ud800", "\n\n", "HAMLET:\n", "😀", ""]
)


def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value 7 times in 8: most bodies must get past validation to the model."""
    return st.integers(0, 7).flatmap(lambda k: invalid if k == 0 else valid)


part = st.fixed_dictionaries({"type": mostly(st.just("text"), st.just("image_url")), "text": texts})
message = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["system", "developer", "user", "assistant"]), st.just("tool")),
        "content": texts | st.lists(part, max_size=2),
    },
    optional={"name": st.sampled_from(["ROMEO", "", "A:B", "a\nb", "x" * 70]), "tool_calls": st.just([])},
)
COMMON = {
    "stream": st.booleans(),
    "n": mostly(st.integers(1, 3), st.just(0)),
    "stop": st.none() | texts | st.lists(texts, max_size=3),
    "temperature": mostly(st.floats(0, 2), st.just(2.5)),
    "top_p": st.floats(0, 1),
    "seed": mostly(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**64])),
    "presence_penalty": mostly(st.floats(-2, 2), st.just(2.5)),
    "frequency_penalty": mostly(st.floats(-2, 2), st.just(-2.5)),
    "user": texts,
    "stream_options": st.just({"include_usage": True}),
    "logit_bias": mostly(st.just({}), st.just({"3": 1})),
    "tools": mostly(st.just([]), st.just([{"type": "function"}])),
}
CHAT = {
    **COMMON,
    "messages": st.lists(message, max_size=4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 4),
}
COMPLETION = {
    **COMMON,
    "prompt": texts | st.lists(texts, max_size=2),
    "logprobs": st.integers(0, 4),
    "echo": mostly(st.just(False), st.just(True)),
}


def field(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value (7 in 8), sometimes anything at all."""
    return mostly(strategy, junk)


def bodies(fields: dict[str, st.SearchStrategy[Any]], required: str, model: str) -> st.SearchStrategy[dict[str, Any]]:
    optional = {k: field(v) for k, v in fields.items() if k != required}
    base = {"model": mostly(st.just(model), st.just("gpt-4o")), required: field(fields[required])}
    return st.fixed_dictionaries({**base, "max_tokens": st.integers(1, 8)}, optional=optional)


def test_no_v1_body_makes_a_500(make_app: AppFactory) -> None:
    client = make_app(max_prompt_chars=300).test_client()
    model = client.get("/v1/models").get_json()["data"][0]["id"]
    seen: set[int] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        chat = data.draw(st.booleans())
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = data.draw(bodies(CHAT, "messages", model) if chat else bodies(COMPLETION, "prompt", model))
        r = client.post(path, data=json.dumps(body), content_type="application/json")
        seen.add(r.status_code)
        assert r.status_code < 500, (path, body, r.data)
        if r.status_code >= 400:
            assert r.status_code in (400, 404)
            error = r.get_json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            return
        if r.mimetype == "text/event-stream":
            lines = [line for line in r.data.decode().split("\n\n") if line]
            assert lines[-1] == "data: [DONE]", lines[-1]
            chunks = [json.loads(line[6:]) for line in lines[:-1]]
            assert all("error" not in c for c in chunks), chunks[-1]
            if body.get("stream_options") == {"include_usage": True}:
                assert chunks[-1]["usage"]["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)
            return
        answer = r.get_json()
        texts = [c["message"]["content"] if chat else c["text"] for c in answer["choices"]]
        # a character model's tokens are characters (no stop string cuts a token here)
        assert sum(len(t) for t in texts) == answer["usage"]["completion_tokens"]
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] <= answer["usage"]["prompt_tokens"]

    check()
    assert {200, 400, 404} <= seen  # the bodies reach the model, not only the validator
