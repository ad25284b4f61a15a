"""Every endpoint validates its input and answers 4xx in one JSON shape; nothing a client sends is a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import AppFactory


def assert_error(resp: Any, status: int, code: str | None = None, field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.data
    assert resp.is_json, resp.data
    err = resp.get_json()["error"]
    assert set(err) == {"code", "message", "details"} and err["message"]
    if code:
        assert err["code"] == code
    if field:
        assert any(d["field"] == field for d in err["details"]), err
    return err


GENERATE_BAD = [
    ({}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.5}, "max_tokens"),  # 5.0 is the integer 5 in JSON (and in JSON Schema): accepted
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),  # over MAX_TOKENS_LIMIT
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 5, "temperature": -0.1}, "temperature"),
    ({"max_tokens": 5, "temperature": "hot"}, "temperature"),
    ({"max_tokens": 5, "top_k": -1}, "top_k"),
    ({"max_tokens": 5, "top_k": 1.5}, "top_k"),
    ({"max_tokens": 5, "top_p": 0}, "top_p"),
    ({"max_tokens": 5, "top_p": 1.01}, "top_p"),
    ({"max_tokens": 5, "repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 5, "stop": "\n"}, "stop"),
    ({"max_tokens": 5, "stop": [""]}, "stop"),
    ({"max_tokens": 5, "stop": ["a"] * 9}, "stop"),
    ({"max_tokens": 5, "stop": ["x" * 65]}, "stop"),
    ({"max_tokens": 5, "stop": [1]}, "stop.0"),
    ({"max_tokens": 5, "seed": -1}, "seed"),
    ({"max_tokens": 5, "seed": 2**63}, "seed"),
    ({"max_tokens": 5, "logprobs": 21}, "logprobs"),
    ({"max_tokens": 5, "stream": "yes"}, "stream"),
    ({"max_tokens": 5, "prompt": 7}, "prompt"),
    ({"max_tokens": 5, "prompt": "x" * 100_001}, "prompt"),
    ({"max_tokens": 5, "session_id": "short"}, "session_id"),
    ({"max_tokens": 5, "session_id": 12345678901234567890}, "session_id"),
    ({"max_tokens": 5, "max_token": 5}, "max_token"),  # unknown fields are errors, not ignored
]


@pytest.mark.parametrize(("body", "field"), GENERATE_BAD)
def test_generate_rejects(client: FlaskClient, body: dict[str, Any], field: str) -> None:
    assert_error(client.post("/generate", json=body), 422, "invalid_request", field)


NEXT_BAD = [
    ({"top_n": -1}, "top_n"),
    ({"top_n": 1001}, "top_n"),
    ({"top_n": "3"}, "top_n"),
    ({"commit": 1}, "commit"),
    ({"text": None}, "text"),
    ({"text": "x" * 100_001}, "text"),
    ({"extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "field"), NEXT_BAD)
def test_next_rejects(client: FlaskClient, body: dict[str, Any], field: str) -> None:
    assert_error(client.post("/next", json=body), 422, "invalid_request", field)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/score", {}, "text"),
        ("/score", {"text": ""}, "text"),
        ("/score", {"text": "a", "commit": "no"}, "commit"),
        ("/tokenize", {}, "text"),
        ("/tokenize", {"text": ["a"]}, "text"),
        ("/detokenize", {"ids": "1 2"}, "ids"),
        ("/detokenize", {"ids": [1.5]}, "ids.0"),
        ("/detokenize", {"ids": [0] * 100_001}, "ids"),
        ("/detokenize", {"ids": [2, -1]}, "ids.1"),
        ("/detokenize", {"ids": [2, 10**9]}, "ids.1"),
        ("/sessions", {"text": 5}, "text"),
        ("/sessions", {"txt": "a"}, "txt"),
    ],
)
def test_other_endpoints_reject(client: FlaskClient, path: str, body: dict[str, Any], field: str) -> None:
    assert_error(client.post(path, json=body), 422, "invalid_request", field)


@pytest.mark.parametrize("path", ["/generate", "/next", "/score", "/tokenize", "/detokenize", "/sessions"])
def test_transport_errors(client: FlaskClient, path: str) -> None:
    assert_error(client.post(path, data="text/plain body", content_type="text/plain"), 415, "unsupported_media_type")
    assert_error(client.post(path, data="{broken", content_type="application/json"), 400, "invalid_json")
    assert_error(client.post(path, data=b'{"text": "\xff\xfe"}', content_type="application/json"), 400, "invalid_json")
    assert_error(client.post(path, data="[1, 2]", content_type="application/json"), 422, "invalid_request")
    assert_error(client.post(path, data="null", content_type="application/json"), 422, "invalid_request")
    assert_error(client.get(path), 405, "method_not_allowed")


def test_body_too_large(make_app: AppFactory) -> None:
    client = make_app(max_body_bytes=8192, max_prompt_chars=100).test_client()
    err = assert_error(client.post("/score", json={"text": "x" * 9000}), 413, "body_too_large")
    assert "8192" in err["message"]


def test_unknown_routes_and_sessions(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/sessions/" + "a" * 32), 404, "session_not_found")
    assert_error(client.get("/sessions/bad id!"), 404, "session_not_found")
    assert_error(client.delete("/sessions/" + "b" * 32), 404, "session_not_found")
    assert_error(client.post("/sessions/" + "c" * 32 + "/fork"), 404, "session_not_found")
    sid = "d" * 32
    for path, body in [
        ("/generate", {"session_id": sid, "max_tokens": 1}),
        ("/next", {"session_id": sid}),
        ("/score", {"session_id": sid, "text": "a"}),
    ]:
        assert_error(client.post(path, json=body), 404, "session_not_found")


def test_empty_bodies_allowed_where_documented(client: FlaskClient) -> None:
    r = client.post("/sessions")
    assert r.status_code == 201 and r.get_json()["tokens"] == 0
    r = client.post(f"/sessions/{r.get_json()['session_id']}/fork")
    assert r.status_code == 201


UNICODE = [
    "日本語のテキスト",
    "emoji 😀👍🏽🇫🇷",
    "combining e\u0301 a\u0308\u0323",
    "NUL \x00 inside",
    "lone \ud800 surrogate \udfff",
    "\u2581 sentencepiece's space mark",
    "",
]


@pytest.mark.parametrize("text", UNICODE)
@pytest.mark.parametrize("model", ["char", "sp"])
def test_any_unicode_is_handled(make_app: AppFactory, sp_lm_dir: Any, text: str, model: str) -> None:
    app: Flask = make_app(sp_lm_dir) if model == "sp" else make_app()
    client = app.test_client()
    # lone surrogates can only arrive JSON-escaped: send exactly that
    raw = lambda body: json.dumps(body, ensure_ascii=True)  # noqa: E731
    post = lambda path, body: client.post(path, data=raw(body), content_type="application/json")  # noqa: E731
    r = post("/sessions", {"text": text})
    assert r.status_code == 201
    sid = r.get_json()["session_id"]
    for path, body in [
        ("/generate", {"prompt": text, "max_tokens": 5, "seed": 1, "stop": [text] if text else []}),
        ("/generate", {"prompt": text, "max_tokens": 5, "stream": True, "session_id": sid}),
        ("/next", {"text": text, "session_id": sid}),
        ("/tokenize", {"text": text}),
    ]:
        r = post(path, body)
        assert r.status_code == 200, (path, r.data)
    if text:
        r = post("/score", {"text": text, "session_id": sid, "commit": True})
        assert r.status_code == 200
        scored = r.get_json()
        assert scored["num_chars"] == len(text)
        tok = post("/tokenize", {"text": text}).get_json()
        assert scored["unknown_chars"] == tok["unknown_chars"]
        ids = [t["id"] for t in tok["tokens"]]
        back = post("/detokenize", {"ids": ids}).get_json()["text"]
        if tok["unknown_chars"] == 0:
            assert back == text
        else:
            assert "\ufffd" in back


def test_integral_floats_are_integers(client: Any) -> None:
    """JSON Schema's "integer" includes 5.0, and the OpenAPI document says "integer": so does the server."""
    r = client.post("/generate", json={"max_tokens": 5.0, "top_k": 3.0, "seed": 1.0})
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] == 5
    assert client.post("/next", json={"top_n": 2.0}).status_code == 200
    assert client.post("/detokenize", json={"ids": [2.0, 3.0]}).status_code == 200


def test_the_body_cap_holds_the_longest_text() -> None:
    from service.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="MAX_BODY_BYTES"):
        Settings.from_env({"MAX_PROMPT_CHARS": "200000"})  # 2.4 MB of escaped JSON > the 2 MiB default
    Settings.from_env({"MAX_PROMPT_CHARS": "200000", "MAX_BODY_BYTES": "2404096"})
