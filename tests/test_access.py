"""Keys, rate limits and CORS, for real: the Procfile's gunicorn (two workers) with a private Redis
holding the rate-limit counters, so a limit holds across workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servers import Gunicorn, RedisServer, serving

KEYS = ("k-alpha-0123456789", "k-beta-9876543210")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def guarded(
    char_lm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    tmp = tmp_path_factory.mktemp("access")
    keys_file = tmp / "keys"
    keys_file.write_text(f"# one key per line\n{KEYS[1]}\n")
    with serving(
        char_lm_dir,
        tmp,
        redis_server.url,
        API_KEYS=KEYS[0],
        API_KEYS_FILE=str(keys_file),
        RATE_LIMIT="12/minute",
        CORS_ORIGINS=ORIGIN,
    ) as server:
        yield server


def call(server: Gunicorn, method: str, path: str, key: str | None = None, **kw: object) -> requests.Response:
    headers = {"Connection": "close", **kw.pop("headers", {})}  # type: ignore[dict-item]
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.request(method, server.base + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def test_keys_guard_every_route_but_the_probes(guarded: Gunicorn) -> None:
    for path in ("/health", "/ready"):
        assert call(guarded, "GET", path).status_code == 200
    for method, path, body in [
        ("POST", "/generate", {"max_tokens": 3}),
        ("POST", "/next", {}),
        ("POST", "/sessions", {}),
        ("GET", "/info", None),
        ("GET", "/metrics", None),
    ]:
        for key in (None, "wrong-key", KEYS[0] + "x", ""):
            r = call(guarded, method, path, key, json=body)
            assert r.status_code == 401, (path, key, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        for key in KEYS:  # from API_KEYS and from API_KEYS_FILE
            assert call(guarded, method, path, key, json=body).status_code in (200, 201), (path, key)
    r = call(guarded, "GET", "/info", headers={"Authorization": f"Basic {KEYS[0]}"})
    assert r.status_code == 401  # only the Bearer scheme
    assert KEYS[0] not in Path(guarded.log).read_text()  # keys are never logged


def test_rate_limit_holds_across_workers_per_key(guarded: Gunicorn) -> None:
    statuses, workers = [], set()
    # a fresh connection each time, until both workers have answered (which the kernel's accept
    # order decides: on a busy machine one worker can take 30 in a row)
    while len(statuses) < 30 or (len(workers - {None}) < 2 and len(statuses) < 300):
        r = call(guarded, "POST", "/tokenize", KEYS[1], json={"text": "a"})
        statuses.append(r.status_code)
        workers.add(r.headers.get("X-Worker-Pid"))
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert len(workers - {None}) == 2
    # the budget is per minute and shared by the workers through Redis; earlier tests in this
    # module spent some of this key's budget, so at most 12 pass
    assert 0 < statuses.count(200) <= 12 and statuses.count(429) >= len(statuses) - 12
    assert (
        call(guarded, "POST", "/tokenize", KEYS[0], json={"text": "a"}).status_code == 200
    )  # the other key's own budget
    assert call(guarded, "GET", "/health").status_code == 200  # probes are never limited


def test_cors_preflight_and_headers(guarded: Gunicorn) -> None:
    pre = call(
        guarded,
        "OPTIONS",
        "/generate",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code in (200, 204)
    assert pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = pre.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    r = call(guarded, "GET", "/health", headers={"Origin": ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = call(guarded, "GET", "/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    bad = call(
        guarded,
        "OPTIONS",
        "/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in bad.headers
