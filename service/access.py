"""Who may call what: API keys, rate limits, CORS, and the client address behind a proxy.

- API keys (API_KEYS / API_KEYS_FILE): every route needs `Authorization: Bearer KEY` except the
  probes (/health, /ready) and the static pages a browser opens without a header (the
  playground, /docs and the document it renders). Keys are compared as SHA-256 digests with
  hmac.compare_digest against every key, so timing tells nothing about a key; keys are never
  logged (the rate limiter sees a digest prefix, not the key).
- Rate limits (RATE_LIMIT, e.g. "120/minute"): flask-limiter, per key or per client address,
  counted in Redis when REDIS_URL is set so the limit holds across workers and replicas.
- CORS (CORS_ORIGINS): flask-cors answers preflights; without origins no CORS headers are sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from flask import Flask, Response, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from werkzeug.middleware.proxy_fix import ProxyFix

from .errors import ApiError, error_body
from .settings import Settings

log = logging.getLogger(__name__)

# endpoints anyone may call: probes, and pages a browser opens before it can send a key
PUBLIC_ENDPOINTS = frozenset(
    {"api.health_GET", "api.ready_GET", "api.docs_GET", "api.docs_asset_GET", "api.openapi_document_GET"}
)
PUBLIC_PREFIXES = ("ui.",)  # the playground, /docs and /openapi.json (no data, no model output)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def is_public() -> bool:
    endpoint = request.endpoint or ""
    return endpoint in PUBLIC_ENDPOINTS or endpoint.startswith(PUBLIC_PREFIXES)


def init_auth(app: Flask, keys: frozenset[str]) -> None:
    if not keys:
        return
    digests = [_digest(k) for k in keys]

    @app.before_request
    def _authenticate() -> None:
        if request.method == "OPTIONS" or is_public():  # preflights carry no credentials
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = _digest(token.strip())
        match = False
        for d in digests:  # no early exit: every key is compared
            match |= hmac.compare_digest(given, d)
        if scheme.lower() != "bearer" or not match:
            raise ApiError(
                401,
                "unauthorized",
                "this server needs an API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": 'Bearer realm="lstm-lm"'},
            )
        g.client_key = given.hex()[:16]  # who is calling, for the rate limiter: never the key itself


def _client() -> str:
    """The rate limiter's bucket: the key's digest when keys are on, else the client address."""
    key = g.get("client_key")
    return f"key:{key}" if key else f"addr:{request.remote_addr or 'unknown'}"


def init_rate_limit(app: Flask, limit: str | None, storage_uri: str | None) -> None:
    if not limit:
        return
    limiter = Limiter(
        _client,
        app=app,
        default_limits=[limit],
        storage_uri=storage_uri or "memory://",
        strategy="sliding-window-counter",
        headers_enabled=False,  # Retry-After only on a 429 (below), not on every answer
        swallow_errors=True,  # a store outage must not turn into refused requests: log and let through
        key_prefix="lstm-lm:ratelimit",
    )
    limiter.request_filter(lambda: request.method == "OPTIONS" or is_public())

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> tuple[Response, int]:
        current = limiter.current_limit
        wait = max(1, int(current.reset_at - time.time())) if current else 1
        response, status = error_body(
            429,
            "rate_limited",
            f"rate limit of {exc.description} exceeded; retry in {wait} s",
            {"limit": exc.description},
        )
        response.headers["Retry-After"] = str(wait)
        return response, status


def init_app(app: Flask, settings: Settings) -> None:
    """Proxy addresses, then keys, then limits (the limiter buckets by the authenticated key)."""
    if settings.proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)  # type: ignore[method-assign]
    origins = settings.origins()
    if origins:
        CORS(
            app,
            origins=origins,
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Replica", "X-Worker-Pid"],
            max_age=600,
        )
    init_auth(app, settings.keys())
    init_rate_limit(app, settings.rate_limit, _storage_uri(settings.redis_url))


def _storage_uri(redis_url: str | None) -> str | None:
    """The limits library reads the same Redis URL schemes (redis://, rediss://, unix://)."""
    if redis_url and redis_url.startswith("unix://"):
        return "redis+" + redis_url
    return redis_url
