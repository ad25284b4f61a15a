"""The OpenAPI document is good enough to build clients from: a client generated from the served
/openapi.json (openapi-python-client, as a user would make one) works against the Procfile's
gunicorn for the JSON endpoints, and every answer, streamed events included, matches the schema
the document gives for it (openapi-schema-validator: OpenAPI 3.1's JSON Schema dialect)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from openapi_schema_validator import OAS31Validator

from servers import Gunicorn, serving

PACKAGE = "lstm_lm_client"


@pytest.fixture(scope="module")
def server(char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with serving(char_lm_dir, tmp_path_factory.mktemp("gunicorn-client"), WEB_CONCURRENCY="1") as g:
        yield g


@pytest.fixture(scope="module")
def document(server: Gunicorn) -> dict[str, Any]:
    return dict(requests.get(f"{server.base}/openapi.json", timeout=10).json())


@pytest.fixture(scope="module")
def generated(server: Gunicorn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated client package, importable for this module's tests."""
    root = tmp_path_factory.mktemp("generated")
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")  # no ruff formatting of the output: not what is tested
    command = [
        sys.executable,
        "-m",
        "openapi_python_client",
        "generate",
        "--url",
        f"{server.base}/openapi.json",
        "--meta",
        "none",
        "--output-path",
        str(root / PACKAGE),
        "--config",
        str(config),
        "--fail-on-warning",  # a schema the generator has to skip or guess at is a failure
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"openapi-python-client failed:\n{done.stdout}\n{done.stderr}"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def validate(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """`instance` against a schema of the document (its $refs resolved within the document)."""
    OAS31Validator({**schema, "components": document["components"]}).validate(instance)


def checked(document: dict[str, Any], path: str, method: str, response: Any) -> Any:
    """The JSON body of a generated client's response, checked against the documented schema."""
    responses = document["paths"][path][method]["responses"]
    assert str(response.status_code) in responses, f"{method} {path} answered an undocumented {response.status_code}"
    body = json.loads(response.content)
    validate(document, responses[str(response.status_code)]["content"]["application/json"]["schema"], body)
    return body


def test_generated_client_works(generated: ModuleType, server: Gunicorn, document: dict[str, Any]) -> None:
    from lstm_lm_client.api.model import generate, next_token, score
    from lstm_lm_client.api.operations import health, info, ready
    from lstm_lm_client.api.sessions import create_session, delete_session, fork_session, get_session
    from lstm_lm_client.api.tokenizer import detokenize, tokenize
    from lstm_lm_client.models import (
        CreateSessionRequest,
        DetokenizeRequest,
        ErrorResponse,
        GenerateRequest,
        GenerateResponse,
        NextRequest,
        ScoreRequest,
        SessionCreated,
        TokenizeRequest,
    )

    client = generated.Client(base_url=server.base, raise_on_unexpected_status=True)

    r = create_session.sync_detailed(client=client, body=CreateSessionRequest(text="ROMEO:\n"))
    checked(document, "/sessions", "post", r)
    assert r.status_code == 201 and isinstance(r.parsed, SessionCreated) and r.parsed.tokens == 7
    sid = r.parsed.session_id

    r = generate.sync_detailed(client=client, body=GenerateRequest(max_tokens=30, session_id=sid, seed=5, logprobs=2))
    checked(document, "/generate", "post", r)
    assert isinstance(r.parsed, GenerateResponse)
    assert r.parsed.usage.session_tokens == 37 and len(r.parsed.tokens) == 30
    assert "".join(t.token for t in r.parsed.tokens) == r.parsed.text

    r = get_session.sync_detailed(client=client, session_id=sid)
    assert checked(document, "/sessions/{session_id}", "get", r)["tokens"] == 37 == r.parsed.tokens

    r = fork_session.sync_detailed(client=client, session_id=sid)
    checked(document, "/sessions/{session_id}/fork", "post", r)
    fork = r.parsed.session_id
    assert fork != sid and r.parsed.tokens == 37

    r = next_token.sync_detailed(client=client, body=NextRequest(session_id=fork, text="A", top_n=3, commit=False))
    checked(document, "/next", "post", r)
    assert len(r.parsed.next_) == 3 and r.parsed.tokens_processed == 1
    assert get_session.sync(client=client, session_id=fork).tokens == 37  # a peek

    r = score.sync_detailed(client=client, body=ScoreRequest(text="To be, or not to be"))
    checked(document, "/score", "post", r)
    assert r.parsed.num_chars == 19 and r.parsed.bits_per_char > 0

    r = tokenize.sync_detailed(client=client, body=TokenizeRequest(text="Hark"))
    ids = [t.id for t in r.parsed.tokens]
    checked(document, "/tokenize", "post", r)
    r = detokenize.sync_detailed(client=client, body=DetokenizeRequest(ids=ids))
    assert checked(document, "/detokenize", "post", r)["text"] == "Hark" == r.parsed.text

    r = delete_session.sync_detailed(client=client, session_id=sid)
    assert r.status_code == 204
    r = get_session.sync_detailed(client=client, session_id=sid)
    checked(document, "/sessions/{session_id}", "get", r)
    assert r.status_code == 404 and isinstance(r.parsed, ErrorResponse)
    assert r.parsed.error.code == "session_not_found"

    r = generate.sync_detailed(client=client, body=GenerateRequest(max_tokens=10**9))
    checked(document, "/generate", "post", r)
    assert r.status_code == 422 and r.parsed.error.code == "invalid_request"

    for path, op in (("/health", health), ("/ready", ready), ("/info", info)):
        r = op.sync_detailed(client=client)
        checked(document, path, "get", r)
        assert r.status_code == 200 and r.parsed is not None


def sse_events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(block.removeprefix("data: ")) for block in data.decode().split("\n\n") if block.strip()]


def stream_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The schema of one event's `data` JSON (the event object's contentSchema)."""
    event = document["paths"]["/generate"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentMediaType"] == "application/json"
    return dict(event["properties"]["data"]["contentSchema"])


def component(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_streamed_events_match_the_document(client: Any) -> None:
    document = client.get("/openapi.json").get_json()
    for logprobs in (0, 2):
        r = client.post("/generate", json={"prompt": "A", "max_tokens": 12, "stream": True, "logprobs": logprobs})
        assert r.mimetype == "text/event-stream"
        events = sse_events(r.data)
        for event in events:
            validate(document, stream_schema(document), event)
        for event in events[:-1]:
            validate(document, component("GeneratedToken"), event)
        validate(document, component("StreamFinal"), events[-1])

    # a stream whose session cannot be saved ends with an error event, also as documented
    sid = client.post("/sessions", json={"text": "A"}).get_json()["session_id"]
    r = client.post("/generate", json={"session_id": sid, "max_tokens": 40, "stream": True}, buffered=False)
    body = iter(r.response)
    first = next(body)  # the generation has started ...
    assert client.delete(f"/sessions/{sid}").status_code == 204  # ... and its session goes away
    last = sse_events(first + b"".join(body))[-1]
    assert last["error"]["code"] == "session_not_found"
    validate(document, stream_schema(document), last)
    validate(document, component("ErrorResponse"), last)
