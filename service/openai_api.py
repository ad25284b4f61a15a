"""OpenAI-compatible routes (/v1): what the official SDKs, LangChain and chat UIs speak.

Parse, delegate to service.openai_service, serialise; documented in /openapi.json with the
other routes. Errors on /v1 take OpenAI's shape (service.errors converts them by path), so the
SDKs raise their own exceptions.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, jsonify, stream_with_context

from .api import parse
from .openai_responses import ChatCompletion, ChatCompletionChunk, Completion, ModelCard, ModelList, OpenAIError
from .openai_schemas import ChatRequest, CompletionRequest
from .openai_service import OpenAIService, Run
from .openapi import Api, add_routes
from .prefix_cache import PrefixCache
from .settings import Settings

openai = Api("openai")
_ERRORS = (400, 404, 413, 503)
_ERROR_TEXT = {
    400: "invalid or unsupported request (OpenAI's error shape: `param` names the field)",
    404: "unknown model or route",
    413: "body too large",
    503: "overloaded or the store is unavailable: retry (Retry-After)",
}


def service() -> OpenAIService:
    svc: OpenAIService = current_app.extensions["openai_service"]
    return svc


def _answer(svc: OpenAIService, run: Run, stream: bool) -> Response:
    if not stream:
        return jsonify(svc.complete(run))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(svc.stream(run)), mimetype="text/event-stream", headers=headers)


@openai.route("/v1/models", "GET", summary="List models (OpenAI)", responses={200: ModelList}, tag="openai")
def list_models() -> Response:
    """The one model this server serves; its id is the checkpoint's name."""
    return jsonify(service().models())


@openai.route(
    "/v1/models/<path:model_id>",
    "GET",
    summary="Describe a model (OpenAI)",
    responses={200: ModelCard},
    errors=(404,),
    tag="openai",
)
def retrieve_model(model_id: str) -> Response:
    """The served model, if `model_id` names it; 404 otherwise."""
    svc = service()
    svc.check_model(model_id)
    return jsonify(svc.model_card())


@openai.route(
    "/v1/completions",
    "POST",
    summary="Complete a text (OpenAI)",
    body=CompletionRequest,
    responses={200: Completion},
    errors=_ERRORS,
    stream=Completion,
    tag="openai",
)
def create_completion() -> Response:
    """Continue `prompt`. `usage.prompt_tokens_details.cached_tokens` counts the prompt tokens
    whose state came from the prefix cache (a re-sent prompt, or its beginning in 256-token
    blocks). With `stream: true`: Server-Sent Events, one chunk per group of tokens, then
    `data: [DONE]`."""
    req = parse(CompletionRequest)
    svc = service()
    return _answer(svc, svc.start_completion(req), req.stream)


@openai.route(
    "/v1/chat/completions",
    "POST",
    summary="Reply in a conversation (OpenAI)",
    body=ChatRequest,
    responses={200: ChatCompletion},
    errors=_ERRORS,
    stream=ChatCompletionChunk,
    tag="openai",
)
def create_chat_completion() -> Response:
    """The next message of the conversation, rendered with the checkpoint's chat template; the
    reply ends at the template's stop (a blank line for the Shakespeare models). Re-sent history
    is read from the prefix cache (`usage.prompt_tokens_details.cached_tokens`). With
    `stream: true`: Server-Sent Events of chat.completion.chunk objects, then `data: [DONE]`."""
    req = parse(ChatRequest)
    svc = service()
    return _answer(svc, svc.start_chat(req), req.stream)


def _document(app: Flask) -> None:
    """Add the /v1 routes to the OpenAPI document, with OpenAI's error shape for their errors."""
    document: dict[str, Any] = app.config["OPENAPI_DOCUMENT"]
    add_routes(document, openai)
    schemas = document["components"]["schemas"]
    schemas.update(OpenAIError.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}))
    schemas["OpenAIError"] = {
        k: v
        for k, v in OpenAIError.model_json_schema(ref_template="#/components/schemas/{model}").items()
        if k != "$defs"
    }
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for op in operations.values():
            for status, entry in op["responses"].items():
                if int(status) >= 400:
                    entry["description"] = _ERROR_TEXT.get(int(status), entry["description"])
                    entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}


def init_app(app: Flask, settings: Settings) -> None:
    """The /v1 routes, their service (with the prefix cache) and their documentation."""
    lm_service = app.extensions["lm_service"]
    lm = lm_service.lm
    weights = lm.path / "model.safetensors" if lm.path else None
    created = int(weights.stat().st_mtime) if weights is not None and weights.is_file() else 0
    cache = PrefixCache(lm_service.store, lm_service.engine, lm.fingerprint, enabled=settings.prefix_cache)
    app.extensions["openai_service"] = OpenAIService(lm_service, cache, created)
    app.register_blueprint(openai.blueprint)
    _document(app)
