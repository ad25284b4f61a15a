"""Service behaviour in-process: Redis outage and recovery, batching determinism, SSE, OpenAPI."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate

from service import Settings, create_app
from service.sessions import RedisSessionStore

from conftest import AppFactory
from servers import RedisServer, wait_until


def sse_events(data: bytes) -> list[dict[str, Any]]:
    """Parse an SSE body: events separated by blank lines, each one `data:` line of JSON."""
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            lines = block.split("\n")
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            events.append(json.loads(lines[0][len("data: ") :]))
    return events


def test_redis_outage_and_recovery(char_lm_dir: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)  # a private server this test may stop
    try:
        settings = Settings(model_dir=char_lm_dir, torch_threads=1)
        from model import load

        store = RedisSessionStore(redis.url, load(char_lm_dir).fingerprint, 3600)
        app = create_app(settings, store=store)
        client = app.test_client()
        sid = client.post("/sessions", json={"text": "KING:"}).get_json()["session_id"]
        assert client.get("/ready").status_code == 200

        redis.stop()
        # requests without a session still work
        assert client.post("/generate", json={"prompt": "a", "max_tokens": 5}).status_code == 200
        assert client.post("/next", json={"text": "a"}).status_code == 200
        assert client.post("/score", json={"text": "abc"}).status_code == 200
        # requests with one answer 503, clearly
        for path, body in [
            ("/generate", {"session_id": sid, "max_tokens": 5}),
            ("/next", {"session_id": sid}),
            ("/score", {"session_id": sid, "text": "a"}),
            ("/sessions", {}),
        ]:
            r = client.post(path, json=body)
            assert r.status_code == 503, (path, r.data)
            assert r.get_json()["error"]["code"] == "store_unavailable"
        assert client.get(f"/sessions/{sid}").status_code == 503
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.get_json()["error"]["details"]["store"].startswith("failed")
        assert client.get("/metrics").status_code == 200  # scraping never fails
        assert client.get("/health").status_code == 200

        redis.start()  # same port; this Redis keeps nothing on disk, so old sessions are gone
        assert client.get("/ready").status_code == 200  # recovered without a restart
        assert client.get(f"/sessions/{sid}").status_code == 404
        sid2 = client.post("/sessions", json={"text": "KING:"}).get_json()["session_id"]
        assert client.post("/next", json={"session_id": sid2}).status_code == 200
        app.extensions["lm_service"].close()
    finally:
        redis.stop()


def _run(client: Any, seed: int, tokens: int = 60) -> str:
    body = {"prompt": "To be", "max_tokens": tokens, "seed": seed, "temperature": 1.0, "top_p": 0.95}
    return str(client.post("/generate", json=body).get_json()["text"])


def test_seeded_output_is_the_same_alone_or_batched(make_app: AppFactory) -> None:
    app = make_app()
    client = app.test_client()
    # long enough, and started together, that the 12 overlap even on a busy machine (the tiny
    # model steps in microseconds: 60-token requests could finish before the next one joined)
    alone = [_run(client, seed, 400) for seed in range(12)]
    scheduler = app.extensions["lm_service"].scheduler
    ticks, rows = scheduler.ticks, scheduler.batch_sizes_total
    start = threading.Barrier(12)

    def together_run(seed: int) -> str:
        start.wait()
        return _run(app.test_client(), seed, 400)

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(together_run, range(12)))
    assert together == alone
    assert (scheduler.batch_sizes_total - rows) / (scheduler.ticks - ticks) > 1.5, "requests were not batched"


def test_inline_decoding_matches_batched(make_app: AppFactory) -> None:
    batched = make_app().test_client()
    inline = make_app(batching=False).test_client()
    assert [_run(batched, s) for s in range(3)] == [_run(inline, s) for s in range(3)]


def test_sse_events(client: Any) -> None:
    r = client.post("/generate", json={"prompt": "A", "max_tokens": 12, "seed": 4, "stream": True, "logprobs": 2})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.data)
    tokens, final = events[:-1], events[-1]
    assert len(tokens) == 12 and all(len(t["top_logprobs"]) == 2 for t in tokens)
    assert final["finish_reason"] == "length" and final["session_id"] is None
    assert final["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "session_tokens": 13}
    assert "".join(t["token"] for t in tokens) == final["text"]


def test_stream_with_session_reports_conflict_in_final_event(make_app: AppFactory) -> None:
    app = make_app(redis=True)
    client = app.test_client()
    sid = client.post("/sessions", json={"text": "A"}).get_json()["session_id"]
    r = client.post("/generate", json={"session_id": sid, "max_tokens": 40, "stream": True}, buffered=False)
    body = iter(r.response)
    first = next(body)  # generation has started from version 0 ...
    client.post("/next", json={"session_id": sid, "text": "b", "commit": True})  # ... and another request commits
    events = sse_events(first + b"".join(body))
    assert events[-1]["error"]["code"] == "session_conflict"
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == 2  # the stream's tokens were not saved


def test_openapi_is_valid_and_matches_routes(app: Flask) -> None:
    doc = app.test_client().get("/openapi.json").get_json()
    validate(doc)
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "ui.docs_asset", "ui.asset", "ui.playground", "ui.favicon"):
            continue  # the playground and static files are for browsers, not API operations
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <path:x> is {x} in OpenAPI
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}  # type: ignore[operator]
    assert documented == served
    generate = doc["paths"]["/generate"]["post"]
    schema = doc["components"]["schemas"][
        generate["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    ]
    assert "max_tokens" in schema["required"]
    assert {"200", "404", "409", "422", "503"} <= set(generate["responses"])
    # the stream is described by the schema of its events: token events, then a final or error one
    event = generate["responses"]["200"]["content"]["text/event-stream"]["schema"]  # one event: its data is JSON
    stream = event["properties"]["data"]["contentSchema"]
    events = doc["components"]["schemas"][stream["$ref"].split("/")[-1]]["anyOf"]
    assert [e["$ref"].split("/")[-1] for e in events] == ["GeneratedToken", "StreamFinal", "ErrorResponse"]
    # operationIds are what generated clients name their functions: the view functions' names
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-z][a-z_]*", i) for i in ids)
    assert doc["paths"]["/sessions/{session_id}/fork"]["post"]["operationId"] == "fork_session"
    assert doc["info"]["title"] == "lstm-lm"  # the service's name, not the model's


def test_docs_page_renders_locally(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and b"docs/assets/swagger-ui-bundle.js" in page.data
    assert not re.search(rb'(src|href)="(https?:)?//', page.data)  # nothing from a CDN
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]  # nor can anything load one
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and b"SwaggerUIBundle" in bundle.data
    assert b"isOAS31" in bundle.data  # Swagger UI 5 (4.x cannot render OpenAPI 3.1)
    init = client.get("/ui/docs/docs.js")
    assert init.status_code == 200 and b'"openapi.json"' in init.data and b"validatorUrl: null" in init.data


def test_playground_is_served(client: Any) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'id="prompt"' in page.data and b'id="output"' in page.data and b'id="distribution"' in page.data
    assert not re.search(rb'(src|href)="(https?:)?//', page.data)
    for asset in ("playground.js", "api.js", "transcript.js", "distribution.js", "playground.css", "icon.svg"):
        assert client.get(f"/ui/playground/{asset}").status_code == 200, asset
    assert client.get("/ui/../app.py").status_code == 404  # only the shipped web files


def test_info_and_health(client: Any) -> None:
    info = client.get("/info").get_json()
    assert info["model"]["tokenizer"] == "char" and info["model"]["parameters"] > 0
    assert info["model"]["validation_bits_per_char"] > 0 and info["limits"]["max_tokens"] == 2048
    assert info["store"] == "memory"
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ready").get_json()["status"] == "ready"


@pytest.mark.parametrize("top_n", [0, 1, 5])
def test_next_distribution(client: Any, top_n: int) -> None:
    r = client.post("/next", json={"text": "The king", "top_n": top_n}).get_json()
    probs = [t["prob"] for t in r["next"]]
    vocab = client.get("/info").get_json()["model"]["vocab_size"]
    assert len(probs) == (vocab if top_n == 0 else top_n)
    assert probs == sorted(probs, reverse=True)
    if top_n == 0:
        assert abs(sum(probs) - 1) < 1e-6
    assert r["entropy"] > 0 and r["tokens_processed"] == 8


def test_short_request_does_not_wait_for_a_long_one(make_app: AppFactory) -> None:
    app = make_app(max_tokens_limit=1_000_000)
    client = app.test_client()
    long = client.post("/generate", json={"max_tokens": 1_000_000, "stream": True}, buffered=False)
    chunks = iter(long.response)
    next(chunks)  # the long generation is running in the scheduler
    short = client.post("/generate", json={"prompt": "A", "max_tokens": 5, "seed": 1})
    assert short.status_code == 200 and short.get_json()["usage"]["completion_tokens"] == 5
    next(chunks)  # ... and it is still running after the short one finished
    long.close()  # client goes away: the scheduler drops the sequence
    scheduler = app.extensions["lm_service"].scheduler

    def idle() -> bool:
        before = scheduler.ticks
        time.sleep(0.2)
        return scheduler.ticks == before

    wait_until(idle, 10, "the scheduler to drop the abandoned sequence")
