"""Response models of the OpenAI-compatible endpoints (/v1), for the OpenAPI document and the
tests (service.openai_format builds the same shapes as plain dicts: faster per token)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(description="prompt tokens read from the prefix cache instead of the model")


class CompletionUsage(_Out):
    prompt_tokens: int
    completion_tokens: int = Field(description="tokens generated, over all choices")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="each token's offset in prompt + completion")


class CompletionChoice(_Out):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Out):
    """A completion; streamed, each chunk has this shape (text so far per choice) and `usage` only
    in the last one (with stream_options.include_usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Out):
    """One streamed event's JSON: a delta of one choice; the last chunk of each choice has its
    finish_reason; with stream_options.include_usage a final chunk has no choices and `usage`;
    then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class OpenAIErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(_Out):
    error: OpenAIErrorDetail
