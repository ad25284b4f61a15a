"""The OpenAPI document, generated from the routes' declared schemas (never written by hand).

Routes register themselves with `Api.route(...)`, naming their request and response models;
the same request model validates the body at run time, so the document cannot drift from
what the server accepts. Parts of the app with a blueprint of their own (service.ui, the /v1
routes) add their documented routes to the built document with `add_routes`.

A streamed response (Server-Sent Events) is described as `text/event-stream` whose schema is the
JSON of one event's `data:` line: OpenAPI 3.1 has no way to say "a sequence of" (3.2's
`itemSchema` would), so the response's description says it, and generators that do not stream
still read the JSON variant of the same response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Blueprint
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .schemas import ErrorResponse, Limits

F = TypeVar("F", bound=Callable[..., Any])

_ERROR_TEXT = {
    400: "malformed JSON",
    404: "unknown session or route",
    405: "method not allowed",
    409: "the session was changed by a concurrent request",
    413: "body too large",
    415: "body is not JSON",
    422: "invalid field values (details name each field)",
    500: "the session's stored state cannot be read (code session_state_corrupt; logged, never replaced silently)",
    503: "session store unavailable, or this worker is busy (code overloaded, with Retry-After)",
}


@dataclass
class RouteDoc:
    operation_id: str  # the view function's name: what generated clients call the operation
    rule: str
    method: str
    summary: str
    description: str
    body: type[BaseModel] | None
    responses: dict[int, type[BaseModel] | None]
    errors: tuple[int, ...]
    stream: type[BaseModel] | None = None
    body_optional: bool = False
    tags: list[str] = field(default_factory=list)
    content_type: str = "application/json"
    links: dict[str, Any] = field(default_factory=dict)  # OpenAPI links from its success answer


class Api:
    """A blueprint plus the documentation of every route it holds."""

    def __init__(self, name: str):
        self.blueprint = Blueprint(name, __name__)
        self.routes: list[RouteDoc] = []

    def route(
        self,
        rule: str,
        method: str,
        *,
        summary: str,
        body: type[BaseModel] | None = None,
        responses: dict[int, type[BaseModel] | None] | None = None,
        errors: tuple[int, ...] = (),
        stream: type[BaseModel] | None = None,
        body_optional: bool = False,
        tag: str = "model",
        content_type: str = "application/json",
        links: dict[str, Any] | None = None,
    ) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.routes.append(
                RouteDoc(
                    fn.__name__,
                    rule,
                    method,
                    summary,
                    (fn.__doc__ or "").strip(),
                    body,
                    responses or {},
                    errors,
                    stream,
                    body_optional,
                    [tag],
                    content_type,
                    links or {},
                )
            )
            self.blueprint.add_url_rule(rule, view_func=fn, methods=[method], endpoint=f"{fn.__name__}_{method}")
            return fn

        return register


def _path(rule: str) -> tuple[str, list[str]]:
    params = re.findall(r"<(?:\w+:)?(\w+)>", rule)
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule), params


def _limits_note(limits: Limits) -> str:
    return ", ".join(f"{k} = {v}" for k, v in vars(limits).items())


def _components(routes: list[RouteDoc]) -> dict[str, Any]:
    """JSON Schemas of every model the routes name (and the error shape), by model name."""
    models: set[tuple[type[BaseModel], Literal["validation", "serialization"]]] = {(ErrorResponse, "serialization")}
    for r in routes:
        if r.body:
            models.add((r.body, "validation"))
        for m in r.responses.values():
            if m:
                models.add((m, "serialization"))
        if r.stream:
            models.add((r.stream, "serialization"))
    ordered = sorted(models, key=lambda x: (x[0].__name__, x[1]))
    _, top = models_json_schema(ordered, ref_template="#/components/schemas/{model}")
    return dict(top.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _success(r: RouteDoc, status: int, model: type[BaseModel] | None) -> dict[str, Any]:
    if model is not None:
        entry: dict[str, Any] = {"description": "success", "content": {r.content_type: {"schema": _ref(model)}}}
    elif r.content_type != "application/json":  # a page or text: say what type it is
        entry = {"description": "success", "content": {r.content_type: {"schema": {"type": "string"}}}}
    else:
        entry = {"description": "no content"}
    if r.links and 200 <= status < 300:
        entry["links"] = r.links
    if r.stream is not None and status == 200:
        doc = " ".join((r.stream.__doc__ or "").split())
        entry["description"] = (
            "success. With `stream: true`: Server-Sent Events (`text/event-stream`), a sequence of events, "
            f"each one line `data: <JSON>` then a blank line, its JSON a {r.stream.__name__}. {doc}"
        ).strip()
        entry.setdefault("content", {})["text/event-stream"] = {"schema": _sse_event(r.stream, r.rule)}
    return entry


def _sse_event(model: type[BaseModel], rule: str) -> dict[str, Any]:
    """One Server-Sent Event: its `data` field is JSON of `model` (JSON Schema's contentSchema),
    or, on the OpenAI routes, the closing `[DONE]`."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(model)}
    if rule.startswith("/v1/"):
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
        "description": "one event of the stream, as a Server-Sent Events parser sees it",
    }


def _operation(r: RouteDoc, params: list[str]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": r.summary, "operationId": r.operation_id, "tags": r.tags, "responses": {}}
    if r.description:
        op["description"] = r.description
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    if r.body:
        op["requestBody"] = {
            "required": not r.body_optional,
            "content": {"application/json": {"schema": _ref(r.body)}},
        }
    for status, model in r.responses.items():
        op["responses"][str(status)] = _success(r, status, model)
    for status in r.errors:
        op["responses"][str(status)] = {
            "description": _ERROR_TEXT.get(status, "error"),
            "content": {"application/json": {"schema": _ref(ErrorResponse)}},
        }
    return op


def _add_paths(document: dict[str, Any], routes: list[RouteDoc]) -> None:
    paths = document["paths"]
    taken = {op["operationId"] for ops in paths.values() for op in ops.values()}
    for r in routes:
        path, params = _path(r.rule)
        method = r.method.lower()
        if method in paths.get(path, {}):
            raise ValueError(f"{r.method} {path} is documented twice")
        if r.operation_id in taken:  # generated clients name their functions after these
            raise ValueError(f"operationId {r.operation_id!r} of {r.method} {path} is already used")
        taken.add(r.operation_id)
        paths.setdefault(path, {})[method] = _operation(r, params)


def build_openapi(
    api: Api, *, title: str, version: str, description: str, limits: Limits, vocab_size: int | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": f"{description}\n\nLimits: {_limits_note(limits)}.",
        },
        "paths": {},
        "components": {"schemas": _components(api.routes)},
        # this server's caps, which the request schemas below state too
        "x-limits": {**vars(limits), **({"max_token_id": vocab_size - 1} if vocab_size else {})},
    }
    _add_paths(document, api.routes)
    _state_limits(document)
    return document


def add_routes(document: dict[str, Any], api: Api) -> None:
    """Document the routes of another blueprint in an already built document (in place)."""
    schemas = document["components"]["schemas"]
    for name, schema in _components(api.routes).items():
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r}")
    _add_paths(document, api.routes)
    _state_limits(document)


# (schema, field) -> JSON Schema keywords and the Limits attribute each takes its value from: the
# caps operators configure live in Settings, so the document states them for this server
_CAPS: dict[tuple[str, str], dict[str, str]] = {
    ("GenerateRequest", "max_tokens"): {"maximum": "max_tokens"},
    ("GenerateRequest", "logprobs"): {"maximum": "max_logprobs"},
    ("GenerateRequest", "prompt"): {"maxLength": "max_prompt_chars"},
    ("NextRequest", "top_n"): {"maximum": "max_top_n"},
    ("NextRequest", "text"): {"maxLength": "max_prompt_chars"},
    ("ScoreRequest", "text"): {"maxLength": "max_prompt_chars"},
    ("TokenizeRequest", "text"): {"maxLength": "max_prompt_chars"},
    ("CreateSessionRequest", "text"): {"maxLength": "max_prompt_chars"},
    ("DetokenizeRequest", "ids"): {"maxItems": "max_detokenize_ids"},
    ("CompletionRequest", "max_tokens"): {"maximum": "max_tokens"},
    ("ChatRequest", "max_tokens"): {"maximum": "max_tokens"},
    ("ChatRequest", "max_completion_tokens"): {"maximum": "max_tokens"},
    ("ChatRequest", "top_logprobs"): {"maximum": "max_logprobs"},
    ("CompletionRequest", "logprobs"): {"maximum": "max_logprobs"},
}


def _state_limits(document: dict[str, Any]) -> None:
    limits, schemas = document["x-limits"], document["components"]["schemas"]
    for (name, field_name), caps in _CAPS.items():
        prop = schemas.get(name, {}).get("properties", {}).get(field_name)
        if prop is None:
            continue
        for target in prop.get("anyOf", [prop]):  # a nullable field: the non-null branch
            if target.get("type") == "null":
                continue
            for keyword, attr in caps.items():
                target[keyword] = limits[attr]
    for name in ("GenerateRequest", "CompletionRequest", "ChatRequest"):
        stop = schemas.get(name, {}).get("properties", {}).get("stop", {})
        for branch in stop.get("anyOf", [stop]):  # each stop string: not empty, at most max_stop_chars
            target = branch.get("items") if branch.get("type") == "array" else branch
            if target is not None and target.get("type") == "string":
                target.update(minLength=1, maxLength=limits["max_stop_chars"])
            if branch.get("type") == "array":
                branch["maxItems"] = limits["max_stop_sequences"]
    text = schemas.get("ScoreRequest", {}).get("properties", {}).get("text")
    if text is not None:
        text["minLength"] = 1
    ids = schemas.get("DetokenizeRequest", {}).get("properties", {}).get("ids", {})
    if "items" in ids and "max_token_id" in limits:
        ids["items"].update(minimum=0, maximum=limits["max_token_id"])
    # rules across fields that the server checks: stated so that schema-valid means accepted
    if "ChatRequest" in schemas:
        schemas["ChatRequest"]["if"] = {
            "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
            "required": ["top_logprobs"],
        }
        schemas["ChatRequest"]["then"] = {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}
        both = ["max_tokens", "max_completion_tokens"]  # the same cap under two names: send one
        schemas["ChatRequest"]["not"] = {"required": both, "properties": {n: {"type": "integer"} for n in both}}
    prompt = schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt", {})
    for branch in prompt.get("anyOf", []):
        if branch.get("type") == "array":  # one prompt per request, also as a list
            branch.update(minItems=1, maxItems=1)
    best_of = schemas.get("CompletionRequest", {}).get("properties", {}).get("best_of")
    if best_of is not None:  # the server takes best_of = n (no ranking), which JSON Schema cannot say
        best_of.pop("anyOf", None)
        best_of["enum"] = [None]
