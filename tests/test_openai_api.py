"""/v1 in process (Flask's test client): shapes, validation, unsupported features, the prefix
cache's exactness through the API, and the OpenAPI document. tests/test_openai_sdk.py drives the
same routes with the official SDK against the real gunicorn."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from prometheus_client import REGISTRY

from model import load
from service import Settings, create_app
from service.openai_responses import ChatCompletion, ChatCompletionChunk, Completion, ModelList
from service.sessions import RedisSessionStore
from service.state_codec import store_namespace

from conftest import AppFactory
from servers import free_port

HAMLET = [{"role": "user", "content": "Who's there?"}]


def model_id(client: FlaskClient) -> str:
    return str(client.get("/v1/models").get_json()["data"][0]["id"])


def chat(client: FlaskClient, **body: Any) -> Any:
    r = client.post("/v1/chat/completions", json={"model": model_id(client), **body})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def events(client: FlaskClient, path: str, body: dict[str, Any]) -> list[Any]:
    r = client.post(path, json={"model": model_id(client), **body, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    lines = [line for line in r.get_data(as_text=True).split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models(client: FlaskClient, char_lm_dir: Any) -> None:
    body = ModelList.model_validate(client.get("/v1/models").get_json())
    assert [m.id for m in body.data] == [char_lm_dir.name]
    assert client.get(f"/v1/models/{char_lm_dir.name}").get_json()["id"] == char_lm_dir.name
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "model_not_found"


def test_chat_shape_usage_and_logprobs(client: FlaskClient) -> None:
    body = chat(client, messages=HAMLET, max_tokens=30, seed=5, logprobs=True, top_logprobs=3)
    ChatCompletion.model_validate(body)
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in content)
    assert choice["finish_reason"] in ("stop", "length")
    prompt = len("HORATIO:\nWho's there?\n\nHAMLET:\n")  # characters = tokens for this model
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["completion_tokens"] == len(content)
    assert body["usage"]["total_tokens"] == prompt + len(content)


def test_completion_legacy_logprobs_and_n(client: FlaskClient) -> None:
    prompt = "ROMEO:\n"
    r = client.post(
        "/v1/completions",
        json={"model": model_id(client), "prompt": prompt, "n": 2, "seed": 3, "logprobs": 2, "max_tokens": 12},
    )
    body = r.get_json()
    Completion.model_validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] != body["choices"][1]["text"]  # seeds differ per choice
    for c in body["choices"]:
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"] and len(lp["token_logprobs"]) == len(lp["tokens"])
        assert lp["text_offset"][0] == len(prompt)
        assert all(len(top) == 2 for top in lp["top_logprobs"])
        assert c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    default = client.post("/v1/completions", json={"model": model_id(client), "prompt": prompt, "seed": 1}).get_json()
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


def test_n_choices_are_decoded_in_one_batch(app: Flask) -> None:
    client = app.test_client()
    scheduler = app.extensions["lm_service"].scheduler
    before = (scheduler.ticks, scheduler.batch_sizes_total)
    client.post("/v1/completions", json={"model": model_id(client), "prompt": "A", "n": 4, "max_tokens": 20})
    ticks, total = scheduler.ticks - before[0], scheduler.batch_sizes_total - before[1]
    assert total == 4 * 20 and ticks < 25  # stepped together, not 80 ticks one by one


def test_stop_strings_and_stream_match_the_plain_answer(client: FlaskClient) -> None:
    body = {"messages": HAMLET, "max_tokens": 80, "seed": 9, "stop": ["e", "o"]}
    plain = chat(client, **body)
    text = plain["choices"][0]["message"]["content"]
    assert "e" not in text and "o" not in text
    chunks = events(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(text)
    one = chat(client, messages=HAMLET, max_tokens=80, seed=9, stop="e")["choices"][0]["message"]["content"]
    assert "e" not in one


def test_completion_stream(client: FlaskClient) -> None:
    body = {"prompt": "KING:", "max_tokens": 10, "seed": 2, "logprobs": 1}
    chunks = events(client, "/v1/completions", body)
    plain = client.post("/v1/completions", json={"model": model_id(client), **body}).get_json()["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == plain["logprobs"]["text_offset"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("kind", ["char", "sp"])
def test_cache_changes_nothing_but_cached_tokens(
    make_app: AppFactory, kind: str, request: pytest.FixtureRequest
) -> None:
    """Turn 2 of a conversation on a server whose cache holds turn 1 answers exactly (logprobs
    to the last bit) as a server without a cache, with either tokenizer."""
    model_dir = request.getfixturevalue(f"{kind}_lm_dir")
    on = make_app(model_dir=model_dir, redis=True).test_client()
    off = make_app(model_dir=model_dir, prefix_cache=False).test_client()
    encode = load(model_dir).tokenizer.encode
    first = {"messages": HAMLET, "max_tokens": 40, "seed": 4, "temperature": 0.8}
    reply = chat(on, **first)["choices"][0]["message"]["content"]
    assert chat(off, **first)["choices"][0]["message"]["content"] == reply
    second = {**first, "logprobs": True, "top_logprobs": 5}
    second["messages"] = [*HAMLET, {"role": "assistant", "content": reply}, {"role": "user", "content": "Me."}]
    cached, fresh = chat(on, **second), chat(off, **second)
    history = len(encode("HORATIO:\nWho's there?\n\n")) + len(encode(f"HAMLET:\n{reply}\n\n"))
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] == history
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached["choices"] == fresh["choices"]  # texts and every logprob, exactly


def error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.get_json()
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": [{"role": "tool", "content": "{}", "tool_call_id": "1"}]}, None),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_features_are_a_400_that_says_so(client: FlaskClient, extra: dict[str, Any], param: Any) -> None:
    body = {"model": model_id(client), "messages": HAMLET, **extra}
    err = error(client.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert param is None or err["param"] == param
    assert "not supported" in err["message"] or "not permitted" in err["message"]


@pytest.mark.parametrize(
    "extra", [{"echo": True}, {"suffix": "end"}, {"best_of": 3}, {"prompt": ["a", "b"]}, {"prompt": [1, 2, 3]}]
)
def test_unsupported_completion_features(client: FlaskClient, extra: dict[str, Any]) -> None:
    body = {"model": model_id(client), "prompt": "x", **extra}
    error(client.post("/v1/completions", json=body), 400)


def test_neutral_values_of_unsupported_fields_are_accepted(client: FlaskClient) -> None:
    neutral = {"tools": [], "response_format": {"type": "text"}, "logit_bias": {}, "parallel_tool_calls": False}
    chat(client, messages=HAMLET, max_tokens=2, user="someone", **neutral)


def test_errors_take_openais_shape_and_statuses(client: FlaskClient) -> None:
    name = model_id(client)
    assert error(client.post("/v1/chat/completions", json={"model": name}), 400)["param"] == "messages"
    bad = {"model": name, "messages": HAMLET, "temperature": 3}
    assert error(client.post("/v1/chat/completions", json=bad), 400)["param"] == "temperature"
    over = {"model": name, "messages": HAMLET, "max_tokens": 10**6}
    assert "at most" in error(client.post("/v1/chat/completions", json=over), 400)["message"]
    assert error(client.post("/v1/chat/completions", data="{", content_type="application/json"), 400)
    assert error(client.post("/v1/chat/completions", data="x", content_type="text/plain"), 400)
    unknown = error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HAMLET}), 404)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    assert error(client.get("/v1/engines"), 404)["code"] == "not_found"
    assert error(client.get("/v1/chat/completions"), 405)
    # the native API keeps its own shape
    assert set(client.get("/nowhere").get_json()["error"]) == {"code", "message", "details"}


def test_a_store_outage_does_not_fail_a_stateless_request(char_lm_dir: Any) -> None:
    settings = Settings(model_dir=char_lm_dir, torch_threads=1)
    dead = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", store_namespace("0" * 16), 60)
    client = create_app(settings, store=dead).test_client()

    def lookups(outcome: str) -> float:
        return REGISTRY.get_sample_value("lstm_prefix_cache_lookups_total", {"outcome": outcome}) or 0.0

    before = lookups("error"), lookups("skipped")
    for _ in range(2):
        body = chat(client, messages=HAMLET, max_tokens=5)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert (lookups("error") - before[0], lookups("skipped") - before[1]) == (1, 1)  # then the cache rests


def test_openapi_document_describes_v1(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    validate(document)
    for path in ("/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions"):
        assert path in document["paths"]
    chat_op = document["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    assert "text/event-stream" in chat_op["responses"]["200"]["content"]
    assert chat_op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "tools" in document["components"]["schemas"]["ChatRequest"]["properties"]  # documented as refused


def test_completion_prompts_are_cached_in_blocks_and_whole(client: FlaskClient) -> None:
    text = ("To be, or not to be, that is the question. " * 20)[:600]  # 600 tokens: blocks end at 256, 512
    body = {"model": model_id(client), "max_tokens": 1, "seed": 1}

    def cached(prompt: str) -> int:
        r = client.post("/v1/completions", json={**body, "prompt": prompt}).get_json()
        return int(r["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached(text) == 0
    assert cached(text) == 600  # the same prompt again: all of it
    assert cached(text + " Whether 'tis nobler") == 512  # a longer one: its blocks in common
    assert cached("Another text entirely") == 0
