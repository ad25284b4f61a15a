"""Request and response models: the one source for validation and for the OpenAPI document.

Requests are strict (no "5" for 5, no unknown fields: a typo like "max_token" is an error, not
silently ignored). Caps that operators configure (prompt length, max_tokens, ...) are checked
against the Limits passed as validation context, so they live in Settings, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationInfo, field_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int
    max_tokens: int
    max_top_n: int
    max_stop_sequences: int
    max_stop_chars: int
    max_logprobs: int
    max_detokenize_ids: int

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The caps a request is validated against, from service.settings.Settings."""
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_tokens=settings.max_tokens_limit,
            max_top_n=settings.max_top_n,
            max_stop_sequences=settings.max_stop_sequences,
            max_stop_chars=settings.max_stop_chars,
            max_logprobs=settings.max_logprobs,
            max_detokenize_ids=settings.max_detokenize_ids,
        )


def _limits(info: ValidationInfo) -> Limits | None:
    return (info.context or {}).get("limits")


def _cap(value: int, info: ValidationInfo, name: str) -> int:
    limits = _limits(info)
    cap = getattr(limits, name) if limits else None
    if cap is not None and value > cap:
        raise ValueError(f"must be at most {cap} (this server's limit)")
    return value


def _text_cap(value: str, info: ValidationInfo) -> str:
    limits = _limits(info)
    if limits and len(value) > limits.max_prompt_chars:
        raise ValueError(f"is {len(value)} characters; this server accepts at most {limits.max_prompt_chars}")
    return value


def integral(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), 5.5 and "5" are not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(integral)]


def checked_stops(stops: list[str], info: ValidationInfo) -> list[str]:
    """Stop strings within this server's caps, none empty (shared with the /v1 schemas)."""
    limits = _limits(info)
    if limits and len(stops) > limits.max_stop_sequences:
        raise ValueError(f"at most {limits.max_stop_sequences} stop strings are allowed")
    for s in stops:
        if not s:
            raise ValueError("stop strings must not be empty")
        if limits and len(s) > limits.max_stop_chars:
            raise ValueError(f"stop strings must be at most {limits.max_stop_chars} characters")
    return stops


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class SessionRef(Request):
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="continue this session")


class CreateSessionRequest(Request):
    text: str = Field("", description="prime the new session with this text")

    _text = field_validator("text")(_text_cap)


class GenerateRequest(SessionRef):
    prompt: str = Field("", description="text appended to the session (or to a fresh start) before generating")
    max_tokens: JsonInt = Field(..., ge=0, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: JsonInt = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = no limit")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest set with this much mass")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=100.0, description=">1 discourages tokens in this request's prompt and output"
    )
    stop: list[str] = Field(default_factory=list, description="stop before any of these strings (excluded)")
    seed: Annotated[int, Field(ge=0, lt=2**63), BeforeValidator(integral)] | None = Field(
        None, description="same seed + same inputs = same text"
    )
    logprobs: JsonInt = Field(0, ge=0, description="report this many top alternatives per generated token")
    stream: bool = Field(False, description="answer with Server-Sent Events, one per token")

    _prompt = field_validator("prompt")(_text_cap)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int, info: ValidationInfo) -> int:
        return _cap(v, info, "max_tokens")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int, info: ValidationInfo) -> int:
        return _cap(v, info, "max_logprobs")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return checked_stops(v, info)


class NextRequest(SessionRef):
    text: str = Field("", description="text to append before predicting")
    top_n: JsonInt = Field(10, ge=0, description="how many likeliest tokens to list; 0 = the whole vocabulary")
    commit: bool = Field(
        False, description="advance the session by `text`; the default, false, is a peek that changes nothing"
    )

    _text = field_validator("text")(_text_cap)

    @field_validator("top_n")
    @classmethod
    def _top_n(cls, v: int, info: ValidationInfo) -> int:
        return _cap(v, info, "max_top_n")


class ScoreRequest(SessionRef):
    # no min_length=: pydantic-core's constrained strings refuse lone surrogates, which clients
    # may legitimately send JSON-escaped; length is checked in Python instead
    text: str = Field(..., description="text to score, token by token (not empty)")
    commit: bool = Field(False, description="advance the session by `text`")

    @field_validator("text")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            raise ValueError("must not be empty")
        return _text_cap(v, info)


class TokenizeRequest(Request):
    text: str

    _text = field_validator("text")(_text_cap)


class DetokenizeRequest(Request):
    ids: list[JsonInt]

    @field_validator("ids")
    @classmethod
    def _ids(cls, v: list[int], info: ValidationInfo) -> list[int]:
        limits = _limits(info)
        if limits and len(v) > limits.max_detokenize_ids:
            raise ValueError(f"at most {limits.max_detokenize_ids} ids are allowed")
        return v


# ---- responses ---------------------------------------------------------------------------


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionCreated(Response):
    session_id: str
    tokens: int = Field(description="tokens the session has consumed (not counting <s>)")
    unknown_chars: int = Field(0, description="characters of `text` the vocabulary does not hold")


class SessionInfo(Response):
    session_id: str
    tokens: int
    created_at: float
    updated_at: float
    expires_in: int | None = Field(description="seconds until the session expires unless used")
    model: str = Field(description="fingerprint of the model the session belongs to")


class TokenProb(Response):
    token: str
    id: int
    logprob: float


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    session_tokens: int


class GeneratedToken(Response):
    """One generated token; also the payload of each streamed event before the last."""

    token: str
    id: int | None = Field(description="null for the piece of a token cut by a stop string")
    logprob: float | None = Field(None, description="with logprobs > 0: log-probability under the model")
    top_logprobs: list[TokenProb] | None = None


class GenerateResponse(Response):
    text: str
    session_id: str | None
    finish_reason: Literal["length", "stop", "time_limit"]
    seed: int
    usage: Usage
    unknown_chars: int = Field(description="prompt characters the vocabulary does not hold")
    tokens: list[GeneratedToken] | None = Field(None, description="present when logprobs > 0")


class StreamFinal(Response):
    """The last streamed event."""

    finish_reason: Literal["length", "stop", "time_limit"]
    session_id: str | None
    seed: int
    usage: Usage
    unknown_chars: int
    text: str


class NextToken(Response):
    token: str
    id: int
    prob: float
    logprob: float


class NextResponse(Response):
    session_id: str | None
    tokens_processed: int
    unknown_chars: int
    next: list[NextToken]
    entropy: float = Field(description="entropy of the full next-token distribution, in nats")


class ScoreResponse(Response):
    session_id: str | None
    tokens: list[TokenProb]
    total_logprob: float
    num_tokens: int
    num_chars: int
    unknown_chars: int
    bits_per_char: float
    perplexity: float


class TokenText(Response):
    id: int
    token: str


class TokenizeResponse(Response):
    tokens: list[TokenText]
    unknown_chars: int


class DetokenizeResponse(Response):
    text: str


class HealthResponse(Response):
    status: Literal["ok"]


class ReadyResponse(Response):
    status: Literal["ready"]
    checks: dict[str, str]


class InfoResponse(Response):
    model: dict[str, Any]
    limits: dict[str, Any]
    store: str
    batching: bool
    quantize: str


class ErrorDetail(Response):
    code: str
    message: str
    details: Any = None


class ErrorResponse(Response):
    error: ErrorDetail


class GenerateStreamEvent(RootModel[GeneratedToken | StreamFinal | ErrorResponse]):
    """Token events (GeneratedToken) as the tokens are generated, then exactly one last event:
    StreamFinal, or ErrorResponse if the session could not be saved (the client always learns how
    the stream ended)."""
