"""One JSON error shape for every failure: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, has_request_context, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from . import metrics
from .sessions import StoreUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client should see, with its HTTP status and a stable machine-readable code."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


def not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {session_id!r} for this model (unknown, expired or deleted)")


def conflict(session_id: str) -> ApiError:
    return ApiError(
        409,
        "session_conflict",
        f"session {session_id!r} was changed by another request while this one ran; nothing was saved, retry",
    )


def error_body(status: int, code: str, message: str, details: Any = None) -> tuple[Response, int]:
    if has_request_context() and request.path.startswith(OPENAI_PREFIX):
        return openai_error_body(status, code, message, details)
    return jsonify({"error": {"code": code, "message": message, "details": details}}), status


# ---- the OpenAI-compatible routes answer errors in OpenAI's shape, so its SDKs raise their own
# exceptions (BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...)

OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error_body(status: int, code: str, message: str, details: Any = None) -> tuple[Response, int]:
    """{"error": {"message", "type", "param", "code"}}; `param` is the first field `details`
    names. An invalid field (422) or a body that is not JSON (415) is a 400, as OpenAI answers."""
    status = 400 if status in (415, 422) else status
    fields = [d for d in details if isinstance(d, dict) and d.get("field")] if isinstance(details, list) else []
    if fields and code == "invalid_request":  # validation: say what is wrong with each field
        message = "; ".join(f"{d['field']}: {d.get('message', 'invalid')}" for d in fields[:5])
        code = str(fields[0].get("type") or code)
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = str(fields[0]["field"]) if fields else None
    return jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}}), status


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as [{"field": "max_tokens", "message": ...}], naming the field."""
    out = []
    for e in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        out.append({"field": field, "message": e["msg"], "type": e["type"]})
    return out


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",  # a body that did not arrive in time (service/gunicorn_worker.py)
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def init_app(app: Flask) -> None:
    """Every failure answers in the one JSON error shape."""

    @app.errorhandler(StoreUnavailable)
    def _store_down(exc: StoreUnavailable) -> tuple[Response, int]:
        metrics.STORE_ERRORS.labels("unavailable").inc()
        log.warning("session store unavailable: %s", exc)
        response, status = error_body(503, "store_unavailable", "the session store is unavailable, retry later")
        response.headers["Retry-After"] = "1"
        return response, status

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        response, status = error_body(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response, status

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> tuple[Response, int]:
        details = validation_details(exc)
        fields = ", ".join(d["field"] for d in details)
        return error_body(422, "invalid_request", f"invalid value for {fields}", details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than the {app.config.get('MAX_CONTENT_LENGTH')} bytes allowed"
        response, status = error_body(status, _HTTP_CODES.get(status, "http_error"), message)
        valid_methods = getattr(exc, "valid_methods", None)  # set on 405s
        if valid_methods:
            response.headers["Allow"] = ", ".join(valid_methods)
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_body(500, "internal_error", "the server failed to handle this request; it has been logged")
