"""HTTP routes: parse and validate, delegate to LMService, serialise. No model logic here."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from flask import Flask, Response, current_app, jsonify, request, stream_with_context
from pydantic import BaseModel
from werkzeug.exceptions import RequestEntityTooLarge

from . import metrics
from .errors import ApiError, not_found
from .inference import LMService
from .openapi import Api, build_openapi
from .schemas import (
    SESSION_ID_PATTERN,
    CreateSessionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    HealthResponse,
    InfoResponse,
    Limits,
    NextRequest,
    NextResponse,
    ReadyResponse,
    ScoreRequest,
    ScoreResponse,
    SessionCreated,
    SessionInfo,
    TokenizeRequest,
    TokenizeResponse,
)
from .sessions import StoreUnavailable

log = logging.getLogger(__name__)
api = Api("api")

# what a client can do with the session an answer names (OpenAPI links: stateful tests follow them)
_SESSION = "$response.body#/session_id"
SESSION_LINKS = {
    "GetSession": {"operationId": "get_session", "parameters": {"session_id": _SESSION}},
    "ForkSession": {"operationId": "fork_session", "parameters": {"session_id": _SESSION}},
    "DeleteSession": {"operationId": "delete_session", "parameters": {"session_id": _SESSION}},
    "ContinueWithGenerate": {"operationId": "generate", "requestBody": {"session_id": _SESSION, "max_tokens": 5}},
    "ContinueWithNext": {"operationId": "next_token", "requestBody": {"session_id": _SESSION, "commit": True}},
    "ScoreInSession": {"operationId": "score", "requestBody": {"session_id": _SESSION, "text": "a"}},
}
route = api.route
T = TypeVar("T", bound=BaseModel)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)
_BODY_ERRORS = (400, 413, 415, 422)


def service() -> LMService:
    return service_of(current_app)


def limits() -> Limits:
    return service().limits


def parse(model: type[T], *, allow_empty: bool = False) -> T:
    """The JSON body validated against `model` (415 if not JSON, 400 if malformed, 422 if invalid)."""
    raw = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # a chunked body has no length to refuse up front: werkzeug stops reading at the limit,
        # and what it read is a cut body, not a JSON error of the client's
        raise RequestEntityTooLarge()
    if not raw and allow_empty:  # no body at all; whitespace is not JSON
        data: Any = {}
    else:
        if not request.is_json:
            raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
        try:
            data = json.loads(raw)
        except ValueError as exc:  # includes invalid UTF-8
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # nesting deeper than the parser's stack
            raise ApiError(400, "invalid_json", "request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise ApiError(
            422,
            "invalid_request",
            "request body must be a JSON object",
            [{"field": "body", "message": "not an object"}],
        )
    return model.model_validate(data, context={"limits": limits()})


def dump(body: dict[str, Any], status: int = 200) -> tuple[Response, int]:
    return jsonify(body), status


def session_path(session_id: str) -> str:
    if not _SESSION_ID.match(session_id):
        raise not_found(session_id)
    return session_id


# ---- sessions ---------------------------------------------------------------------------


@route(
    "/sessions",
    "POST",
    summary="Create a session",
    body=CreateSessionRequest,
    body_optional=True,
    responses={201: SessionCreated},
    errors=(*_BODY_ERRORS, 503),
    tag="sessions",
    links=SESSION_LINKS,
)
def create_session() -> tuple[Response, int]:
    """A new session, optionally primed with `text`. An empty body is fine."""
    req = parse(CreateSessionRequest, allow_empty=True)
    return dump(service().create_session(req.text), 201)


@route(
    "/sessions/<session_id>",
    "GET",
    summary="Describe a session",
    responses={200: SessionInfo},
    errors=(404, 500, 503),
    tag="sessions",
)
def get_session(session_id: str) -> tuple[Response, int]:
    """Token count, timestamps, seconds to expiry and the model it belongs to. Refreshes the TTL."""
    return dump(service().session_info(session_path(session_id)))


@route(
    "/sessions/<session_id>",
    "DELETE",
    summary="Delete a session",
    responses={204: None},
    errors=(404, 500, 503),
    tag="sessions",
)
def delete_session(session_id: str) -> tuple[str, int]:
    """Forget a session's state."""
    service().delete_session(session_path(session_id))
    return "", 204


@route(
    "/sessions/<session_id>/fork",
    "POST",
    summary="Fork a session",
    responses={201: SessionCreated},
    errors=(404, 500, 503),
    tag="sessions",
    links=SESSION_LINKS,
)
def fork_session(session_id: str) -> tuple[Response, int]:
    """An independent copy: continuing one never changes the other. Any body is ignored."""
    return dump(service().fork_session(session_path(session_id)), 201)


# ---- model ------------------------------------------------------------------------------


@route(
    "/generate",
    "POST",
    summary="Generate a continuation",
    body=GenerateRequest,
    responses={200: GenerateResponse},
    errors=(*_BODY_ERRORS, 404, 409, 500, 503),
    stream=GenerateStreamEvent,
)
def generate() -> Response | tuple[Response, int]:
    """Append `prompt` to the session (or a fresh start) and sample up to `max_tokens` tokens.

    With `stream: true` the answer is Server-Sent Events: one `data:` JSON line per token, then a
    final one with `finish_reason`, `usage` and `session_id` (or `error` if the session could not
    be saved). Stop strings are excluded from the text and from the session."""
    req = parse(GenerateRequest)
    lm = service()
    gen = lm.start_generation(req)
    if not req.stream:
        return dump(lm.generate(gen))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(lm.generate_stream(gen)), mimetype="text/event-stream", headers=headers)


@route(
    "/next",
    "POST",
    summary="Next-token distribution",
    body=NextRequest,
    responses={200: NextResponse},
    errors=(*_BODY_ERRORS, 404, 409, 500, 503),
)
def next_token() -> tuple[Response, int]:
    """The distribution of the token after the session's text plus `text`, likeliest first.
    By default a peek that changes nothing; with `commit: true` the session advances by `text`."""
    return dump(service().next(parse(NextRequest)))


@route(
    "/score",
    "POST",
    summary="Score a text",
    body=ScoreRequest,
    responses={200: ScoreResponse},
    errors=(*_BODY_ERRORS, 404, 409, 500, 503),
)
def score() -> tuple[Response, int]:
    """Log-probability of every token of `text` given the session (or a fresh start), bits per
    character and perplexity. Score a long text in chunks through a session with `commit`."""
    return dump(service().score(parse(ScoreRequest)))


@route(
    "/tokenize",
    "POST",
    summary="Text to token ids",
    body=TokenizeRequest,
    responses={200: TokenizeResponse},
    errors=_BODY_ERRORS,
    tag="tokenizer",
)
def tokenize() -> tuple[Response, int]:
    """Token ids and texts of `text`; unknown characters become <unk> and are counted."""
    return dump(service().tokenize(parse(TokenizeRequest).text))


@route(
    "/detokenize",
    "POST",
    summary="Token ids to text",
    body=DetokenizeRequest,
    responses={200: DetokenizeResponse},
    errors=_BODY_ERRORS,
    tag="tokenizer",
)
def detokenize() -> tuple[Response, int]:
    """The text of a list of token ids (<s> decodes to nothing, <unk> to U+FFFD)."""
    return dump(service().detokenize(parse(DetokenizeRequest).ids))


# ---- operations -------------------------------------------------------------------------


@route("/health", "GET", summary="Liveness", responses={200: HealthResponse}, tag="operations")
def health() -> tuple[Response, int]:
    """The process answers. Checks nothing else."""
    return dump({"status": "ok"})


@route("/ready", "GET", summary="Readiness", responses={200: ReadyResponse}, errors=(503,), tag="operations")
def ready() -> tuple[Response, int]:
    """Model loaded and session store reachable; 503 naming the failing check otherwise."""
    lm = service()
    checks = {"model": f"ok ({lm.lm.fingerprint})"}
    try:
        lm.store.ping()
        checks["store"] = f"ok ({lm.store.kind})"
    except StoreUnavailable as exc:
        metrics.STORE_ERRORS.labels("unavailable").inc()
        log.warning("readiness: %s", exc)  # the store's address and error stay in the log
        message = "the session store is unreachable or refuses writes"
        raise ApiError(503, "not_ready", message, {**checks, "store": f"failed: {message}"}) from exc
    return dump({"status": "ready", "checks": checks})


@route("/info", "GET", summary="Model card and limits", responses={200: InfoResponse}, tag="operations")
def info() -> tuple[Response, int]:
    """Name, fingerprint, tokenizer, sizes, validation bits/char, and this server's limits."""
    return dump(current_app.config["MODEL_CARD"])


@route("/metrics", "GET", summary="Prometheus metrics", responses={200: None}, tag="operations")
def prometheus_metrics() -> Response:
    """Requests, latencies, tokens generated, decode speed, batch sizes, sessions, store errors."""
    body = metrics.render(service().store.count, current_app.config["METRICS_MULTIPROCESS"])
    return Response(body, mimetype="text/plain; version=0.0.4")


@route("/openapi.json", "GET", summary="This document", responses={200: None}, tag="operations")
def openapi_document() -> tuple[Response, int]:
    """The OpenAPI 3.1 description of this API, generated from the validating schemas."""
    return jsonify(current_app.config["OPENAPI_DOCUMENT"]), 200


def init_app(app: Flask) -> None:
    """The routes, and the OpenAPI document that describes them."""
    app.register_blueprint(api.blueprint)
    app.config["OPENAPI_DOCUMENT"] = build_openapi(
        api,
        title="lstm-lm",
        version="1",
        description="An LSTM language model over HTTP, with sessions whose hidden state lives in Redis. "
        f"This server runs the model {service_of(app).lm.name!r}.",
        limits=service_of(app).limits,
        vocab_size=service_of(app).tokenizer.vocab_size,
    )


def service_of(app: Flask) -> LMService:
    return app.extensions["lm_service"]
