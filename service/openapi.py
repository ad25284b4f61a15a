"""The OpenAPI document, generated from the routes' declared schemas (never written by hand).

Routes register themselves with `Api.route(...)`, naming their request and response models;
the same request model validates the body at run time, so the document cannot drift from
what the server accepts.
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
    503: "session store unavailable",
}


@dataclass
class RouteDoc:
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
    ) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.routes.append(
                RouteDoc(
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


def build_openapi(api: Api, *, title: str, version: str, description: str, limits: Limits) -> dict[str, Any]:
    models: set[tuple[type[BaseModel], Literal["validation", "serialization"]]] = {(ErrorResponse, "serialization")}
    for r in api.routes:
        if r.body:
            models.add((r.body, "validation"))
        for m in r.responses.values():
            if m:
                models.add((m, "serialization"))
        if r.stream:
            models.add((r.stream, "serialization"))
    ordered = sorted(models, key=lambda x: (x[0].__name__, x[1]))
    _, top = models_json_schema(ordered, ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, dict[str, Any]] = {}
    for r in api.routes:
        path, params = _path(r.rule)
        slug = re.sub(r"[^a-z0-9]+", "_", path.lower()).strip("_")
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{slug}",
            "tags": r.tags,
            "responses": {},
        }
        if r.description:
            op["description"] = r.description
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
            ]
        if r.body:
            op["requestBody"] = {
                "required": not r.body_optional,
                "content": {"application/json": {"schema": ref(r.body)}},
            }
        for status, model in r.responses.items():
            entry: dict[str, Any] = {"description": "success" if model else "no content"}
            if model:
                entry["content"] = {r.content_type: {"schema": ref(model)}}
            if r.stream and status == 200:
                entry["content"]["text/event-stream"] = {
                    "schema": {
                        "type": "string",
                        "description": f"with stream=true: one `data:` line per token ({r.stream.__name__}), "
                        "then a final event with finish_reason, usage and session_id",
                    }
                }
            op["responses"][str(status)] = entry
        for status in r.errors:
            op["responses"][str(status)] = {
                "description": _ERROR_TEXT.get(status, "error"),
                "content": {"application/json": {"schema": ref(ErrorResponse)}},
            }
        paths.setdefault(path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": f"{description}\n\nLimits: {_limits_note(limits)}.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css"></head>
<body><div id="docs"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{spec}", dom_id: "#docs"}});</script>
</body></html>
"""
