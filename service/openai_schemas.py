"""Request models of the OpenAI-compatible endpoints (/v1): validation and the
OpenAPI document, as service.schemas is for the native API.

Requests follow OpenAI's field names, types and ranges. A field this server cannot honour is
never silently ignored: the known ones (tools, response formats, images, echo, ...) are a 400
naming the field and saying it is not supported; any other unknown field is a 400 too, as
OpenAI answers ("Unrecognized request argument supplied").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .schemas import JsonInt, Limits, checked_stops, integral

MAX_CHOICES = 16  # n: choices per request, decoded together in one batch

# fields OpenAI defines that this server does not implement: declared (so the document lists
# them), and a 400 naming the field unless their value asks for nothing (null, an empty list...)
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": "response formats other than {'type': 'text'} are not supported",
    "audio": "audio is not supported",
    "modalities": "output modalities other than text are not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported (this model does not reason)",
    "verbosity": "verbosity is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions (metadata) are not supported",
    "service_tier": "service tiers are not supported",
    "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported",
    "tool_calls": "tool calls are not supported",
    "refusal": "refusal messages are not supported",
}
NEUTRAL: dict[str, list[Any]] = {  # values that ask for nothing: accepted
    "response_format": [{"type": "text"}],
    "tools": [[]],
    "functions": [[]],
    "tool_calls": [[]],
    "tool_choice": ["none"],
    "modalities": [["text"]],
    "logit_bias": [{}],
    "echo": [False],
    "suffix": [""],
    "store": [False],
    "parallel_tool_calls": [True, False],
}


def _refuse(value: Any, info: ValidationInfo) -> None:
    name = info.field_name or ""
    if value is None or value in NEUTRAL.get(name, []):
        return None
    raise PydanticCustomError("unsupported_parameter", UNSUPPORTED[name])


def _unsupported(description: str = "not supported: a 400 unless null") -> Any:
    return Field(None, description=description)


def _document_refusals(schema: dict[str, Any]) -> None:
    """In the OpenAPI document, a field we refuse accepts only the values that ask for nothing, so
    a client (or a fuzzer) reading the document never sends what gets a 400."""
    for name, prop in schema.get("properties", {}).items():
        if name in UNSUPPORTED:
            prop["anyOf"] = [_exactly(v) for v in [None, *NEUTRAL.get(name, [])]]


_JSON_TYPES = {bool: "boolean", str: "string", int: "integer", float: "number", type(None): "null"}


def _exactly(value: Any) -> dict[str, Any]:
    """A typed schema that admits only `value`: typed rather than a bare `enum` of mixed JSON
    values, which client generators cannot turn into a type."""
    if isinstance(value, list):
        items = [_exactly(v) for v in value]
        return {
            "type": "array",
            "items": items[0] if len(items) == 1 else {},
            "minItems": len(value),
            "maxItems": len(value),
        }
    if isinstance(value, dict):
        return {
            "type": "object",
            "properties": {k: _exactly(v) for k, v in value.items()},
            "required": list(value),
            "additionalProperties": False,
        }
    if value is None:
        return {"type": "null"}
    return {"type": _JSON_TYPES[type(value)], "enum": [value]}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_document_refusals)


def _limits(info: ValidationInfo) -> Limits | None:
    return (info.context or {}).get("limits")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with `usage` (and no choices)")


class _Common(_Strict):
    model: str = Field(description="the served model's id (GET /v1/models)")
    stream: bool = Field(False, description="Server-Sent Events: chunks as tokens come, then `data: [DONE]`")
    stream_options: StreamOptions | None = None
    n: JsonInt = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate (decoded together)")
    stop: str | list[str] | None = Field(None, description="stop before any of these strings (excluded)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="nucleus sampling (0 keeps only the likeliest token)")
    seed: Annotated[int, Field(ge=0, lt=2**63), BeforeValidator(integral)] | None = Field(
        None, description="same seed + same request = same choices"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this from tokens already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this per time a token was generated")
    user: str | None = Field(None, max_length=256, description="accepted, not used")

    logit_bias: Any = _unsupported("not supported: a 400 unless null or {}")
    store: Any = _unsupported("not supported: a 400 unless null or false")
    metadata: Any = _unsupported()
    service_tier: Any = _unsupported()

    _refused = field_validator("logit_bias", "store", "metadata", "service_tier")(_refuse)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None, info: ValidationInfo) -> list[str]:
        return checked_stops([] if v is None else [v] if isinstance(v, str) else v, info)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _cap_tokens(v: int | None, info: ValidationInfo) -> int | None:
    limits = _limits(info)
    if v is not None and limits and v > limits.max_tokens:
        raise ValueError(f"is {v}; this server generates at most {limits.max_tokens} tokens per choice")
    return v


def _cap_text(v: str, info: ValidationInfo) -> str:
    limits = _limits(info)
    if limits and len(v) > limits.max_prompt_chars:
        raise ValueError(f"is {len(v)} characters; this server accepts at most {limits.max_prompt_chars}")
    return v


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(description="the text to continue (one prompt per request)")
    max_tokens: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        16, description="tokens to generate per choice (OpenAI's default: 16)"
    )
    logprobs: Annotated[int, Field(ge=0), BeforeValidator(integral)] | None = Field(
        None, description="log-probabilities of the chosen and this many likeliest"
    )
    best_of: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        None, description="only best_of = n (no server-side ranking)"
    )
    echo: Any = _unsupported("not supported: a 400 unless null or false")
    suffix: Any = _unsupported("not supported: a 400 unless null or empty")

    _refused_here = field_validator("echo", "suffix")(_refuse)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str], info: ValidationInfo) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise PydanticCustomError("unsupported_value", "send exactly one prompt per request")
            v = v[0]
        return _cap_text(v, info)

    _max_tokens = field_validator("max_tokens")(_cap_tokens)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if v is not None and limits and v > limits.max_logprobs:
            raise ValueError(f"must be at most {limits.max_logprobs} (this server's limit)")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise PydanticCustomError("unsupported_value", "best_of other than n is not supported (no ranking)")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")
    name: str | None = Field(None, min_length=1, max_length=64, description="the speaker (wins over the role's)")
    tool_calls: Any = _unsupported("not supported: a 400 unless null or []")
    function_call: Any = _unsupported()
    refusal: Any = _unsupported()
    audio: Any = _unsupported()

    _refused = field_validator("tool_calls", "function_call", "refusal", "audio")(_refuse)

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> Any:
        if v in ("tool", "function"):
            raise PydanticCustomError("unsupported_value", "tool and function messages are not supported")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError("unsupported_value", f"content parts of type {kind!r} are not supported")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        None, description="tokens per choice; none: this server's cap"
    )
    max_completion_tokens: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        None, description="the same as max_tokens (OpenAI's newer name)"
    )
    logprobs: bool = Field(False, description="log-probability of each generated token")
    top_logprobs: Annotated[int, Field(ge=0, le=20), BeforeValidator(integral)] | None = Field(
        None, description="with logprobs: this many likeliest per token"
    )
    prompt_cache_key: str | None = Field(None, max_length=1024, description="accepted: the prefix cache is automatic")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted, not used")
    tools: Any = _unsupported("not supported: a 400 unless null or []")
    tool_choice: Any = _unsupported("not supported: a 400 unless null or 'none'")
    parallel_tool_calls: Any = _unsupported("accepted (no tools)")
    functions: Any = _unsupported("not supported: a 400 unless null or []")
    function_call: Any = _unsupported()
    response_format: Any = _unsupported("only {'type': 'text'}")
    audio: Any = _unsupported()
    modalities: Any = _unsupported("only ['text']")
    prediction: Any = _unsupported()
    web_search_options: Any = _unsupported()
    reasoning_effort: Any = _unsupported()
    verbosity: Any = _unsupported()

    _refused_here = field_validator(
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
    )(_refuse)

    _max_tokens = field_validator("max_tokens", "max_completion_tokens")(_cap_tokens)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        limits = _limits(info)
        chars = sum(len(m.text()) for m in self.messages)
        if limits and chars > limits.max_prompt_chars:
            raise ValueError(f"messages hold {chars} characters; this server accepts at most {limits.max_prompt_chars}")
        if limits and (self.top_logprobs or 0) > limits.max_logprobs:
            raise ValueError(f"top_logprobs must be at most {limits.max_logprobs} (this server's limit)")
        return self

    def token_cap(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default
