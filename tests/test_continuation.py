"""Exact continuation: feeding a session in k requests equals feeding it in one, for /next,
/generate and /score, with the tiny test models and with both shipped models, over Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from conftest import SHIPPED, AppFactory

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
PARTS = [
    "ROMEO:\nBut soft,",
    " what light through yonder",
    " window breaks?\n",
    "It is the east,",
    " and Juliet is the sun.\n",
]
assert "".join(PARTS) == TEXT


@pytest.fixture(params=["tiny-char", "tiny-sp", "shakespeare-char", "shakespeare-sp"])
def client(request: pytest.FixtureRequest, make_app: AppFactory) -> FlaskClient:
    name = request.param
    if name.startswith("tiny"):
        model_dir: Path = request.getfixturevalue("char_lm_dir" if name == "tiny-char" else "sp_lm_dir")
    else:
        model_dir = SHIPPED[name]
        assert (model_dir / "config.json").is_file(), f"shipped checkpoint {model_dir} is missing"
    return make_app(model_dir, redis=True).test_client()


def ids_of(client: FlaskClient, text: str) -> list[int]:
    return [t["id"] for t in client.post("/tokenize", json={"text": text}).get_json()["tokens"]]


def assert_same_distribution(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [t["id"] for t in a] == [t["id"] for t in b]
    assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a, b)) <= 1e-4


def new_session(client: FlaskClient, text: str = "") -> str:
    r = client.post("/sessions", json={"text": text})
    assert r.status_code == 201
    return str(r.get_json()["session_id"])


def test_parts_are_token_boundaries(client: FlaskClient) -> None:
    # the premise of the other tests: these parts tokenize to the same sequence as the whole
    assert sum((ids_of(client, p) for p in PARTS), []) == ids_of(client, TEXT)


def test_next_in_k_requests_equals_one(client: FlaskClient) -> None:
    sid = new_session(client)
    processed = 0
    for part in PARTS:
        r = client.post("/next", json={"session_id": sid, "text": part, "top_n": 0, "commit": True})
        assert r.status_code == 200
        processed += r.get_json()["tokens_processed"]
    chunked = r.get_json()["next"]
    whole = client.post("/next", json={"text": TEXT, "top_n": 0}).get_json()
    assert processed == whole["tokens_processed"] == len(ids_of(client, TEXT))
    assert_same_distribution(chunked, whole["next"])
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == processed


def test_primed_session_equals_prompt(client: FlaskClient) -> None:
    sid = new_session(client, TEXT)
    a = client.post("/next", json={"session_id": sid, "top_n": 0, "commit": False}).get_json()["next"]
    b = client.post("/next", json={"text": TEXT, "top_n": 0}).get_json()["next"]
    assert_same_distribution(a, b)


def reference_next(client: FlaskClient, ids: list[int]) -> list[float]:
    """Log-probabilities after exactly these token ids, computed directly with the engine."""
    engine = client.application.extensions["lm_service"].engine
    return engine.log_probs(engine.prefill(ids, engine.start()))[0].tolist()  # type: ignore[no-any-return]


def peek(client: FlaskClient, sid: str) -> list[float]:
    listed = client.post("/next", json={"session_id": sid, "top_n": 0, "commit": False}).get_json()["next"]
    out = [0.0] * len(listed)
    for t in listed:
        out[t["id"]] = t["logprob"]
    return out


def close(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b) if x > -30 or y > -30) <= 1e-4


def test_generate_continues_exactly(client: FlaskClient) -> None:
    sid = new_session(client, PARTS[0])
    body = {"prompt": "".join(PARTS[1:3]), "max_tokens": 25, "seed": 1234, "temperature": 0.9, "logprobs": 1}
    in_session = client.post("/generate", json={**body, "session_id": sid}).get_json()
    stateless = client.post("/generate", json={**body, "prompt": "".join(PARTS[:3])}).get_json()
    assert in_session["text"] == stateless["text"]  # same state + same seed = same text
    generated = [t["id"] for t in in_session["tokens"]]
    consumed = ids_of(client, PARTS[0]) + ids_of(client, body["prompt"]) + generated  # type: ignore[arg-type]
    assert in_session["usage"]["session_tokens"] == len(consumed)
    assert in_session["usage"]["completion_tokens"] == len(generated) == 25
    # the session holds exactly: what was sent, then what was returned
    assert close(peek(client, sid), reference_next(client, consumed))


def test_greedy_generation_in_chunks_equals_one_request(client: FlaskClient) -> None:
    sid = new_session(client, TEXT)
    pieces = [
        client.post("/generate", json={"session_id": sid, "max_tokens": n, "temperature": 0}).get_json()["text"]
        for n in (7, 1, 12)
    ]
    whole = client.post("/generate", json={"prompt": TEXT, "max_tokens": 20, "temperature": 0}).get_json()["text"]
    assert "".join(pieces) == whole


def test_score_in_chunks_equals_whole(client: FlaskClient) -> None:
    sid = new_session(client)
    tokens: list[dict[str, Any]] = []
    total = 0.0
    for part in PARTS:
        r = client.post("/score", json={"session_id": sid, "text": part, "commit": True}).get_json()
        tokens += r["tokens"]
        total += r["total_logprob"]
    whole = client.post("/score", json={"text": TEXT}).get_json()
    assert [t["id"] for t in tokens] == [t["id"] for t in whole["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(tokens, whole["tokens"])) <= 1e-4
    assert abs(total - whole["total_logprob"]) <= 1e-3
    assert client.get(f"/sessions/{sid}").get_json()["tokens"] == whole["num_tokens"]


def test_stop_string_is_excluded_from_session(client: FlaskClient) -> None:
    free = client.post("/generate", json={"prompt": TEXT, "max_tokens": 30, "seed": 9}).get_json()["text"]
    stop = free[12:15]
    sid = new_session(client, TEXT)
    body = {"session_id": sid, "max_tokens": 30, "seed": 9, "stop": [stop], "logprobs": 1}
    r = client.post("/generate", json=body).get_json()
    assert r["finish_reason"] == "stop" and r["text"] == free[: free.index(stop)]
    # kept tokens, plus the re-encoded piece of a token the stop string cut (subword models)
    kept = [t["id"] for t in r["tokens"] if t["id"] is not None]
    cut = "".join(t["token"] for t in r["tokens"] if t["id"] is None)
    consumed = ids_of(client, TEXT) + kept + (ids_of(client, cut) if cut else [])
    assert r["usage"]["session_tokens"] == len(consumed)
    assert close(peek(client, sid), reference_next(client, consumed))
