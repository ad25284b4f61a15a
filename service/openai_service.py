"""What the OpenAI-compatible endpoints do: prompts from messages or text, the prefix cache,
n choices decoded together, and OpenAI's response shapes.

A request's prompt is cut into segments (chat: one per rendered message, then the reply's
heading; completions: blocks of BLOCK tokens) and read through service.prefix_cache, which
starts from the longest boundary it holds. The n choices are n model.Decoders on the same
prompt state; this thread pulls their scheduler streams in turn, so they are stepped together
in one batch (and with whatever other requests the worker is decoding). After a chat reply the
state after that reply, rendered as the message a client sends back next turn, is cached too,
so a conversation's next turn reads only the new message.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model.chat import ChatTemplate, ChatTemplateError, Message
from model.generation import Decoder, GenerationParams, TokenEvent
from model.sampling import SamplingParams

from . import metrics
from . import openai_format as fmt
from .errors import ApiError
from .inference import LMService
from .openai_schemas import ChatRequest, CompletionRequest
from .prefix_cache import Prefilled, PrefixCache

log = logging.getLogger(__name__)

Body = dict[str, Any]
BLOCK = 256  # completions: a prompt's boundaries are every BLOCK tokens and its end
_MIN_TOP_P = 1e-9  # top_p 0 (OpenAI allows it) keeps only the likeliest token, like this


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message, [{"field": param, "message": message}] if param else None)


@dataclass
class Run:
    """A request that passed every check that can fail with a clean status, prompt read."""

    kind: str  # "chat.completion" or "text_completion"
    id: str
    created: int
    prefilled: Prefilled
    decoders: list[Decoder]
    logprobs: int | None  # alternatives to report per token; None: no logprobs
    include_usage: bool
    prompt_chars: int  # completions' text_offset starts after the prompt
    template: ChatTemplate | None  # chat: how a reply renders when sent back


def interleave(streams: list[Iterator[list[TokenEvent]]]) -> Iterator[tuple[int, list[TokenEvent] | None]]:
    """Pull each stream in turn: (i, events) as they come, (i, None) when stream i ends. One
    thread pulling scheduler streams in turn gets their sequences stepped in the same ticks."""
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            try:
                events = next(streams[i])
            except StopIteration:
                live.remove(i)
                yield i, None
                continue
            yield i, events


class OpenAIService:
    def __init__(self, service: LMService, cache: PrefixCache, created: int):
        self.svc = service
        self.cache = cache
        self.created = created  # the model's "created" time in /v1/models
        self.model_id = service.lm.name
        self.template = service.lm.chat_template

    # ---- models ---------------------------------------------------------------------------

    def models(self) -> Body:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> Body:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lstm-lm"}

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ApiError(
                404,
                "model_not_found",
                f"The model {model!r} does not exist: this server serves {self.model_id!r} (GET /v1/models)",
                [{"field": "model", "message": "unknown model"}],
            )

    # ---- starting a request ------------------------------------------------------------------

    def start_chat(self, req: ChatRequest) -> Run:
        self.check_model(req.model)
        if self.template is None:
            raise bad_request(
                f"the model {self.model_id!r} has no chat template (config.json chat_template): use /v1/completions",
                "model",
                "chat_not_supported",
            )
        messages = [Message(m.role, m.text(), m.name) for m in req.messages]
        try:
            rendered = self.template.render(messages)
        except ChatTemplateError as exc:
            raise bad_request(str(exc), "messages") from exc
        encode = self.svc.tokenizer.encode
        segments = [encode(text) for text in rendered.messages] + [encode(rendered.reply_prompt)]
        stops = [*rendered.stop, *(s for s in req.stops() if s not in rendered.stop)]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._start(
            "chat.completion", req, segments, len(messages), req.token_cap(self.svc.limits.max_tokens), stops, logprobs
        )

    def start_completion(self, req: CompletionRequest) -> Run:
        self.check_model(req.model)
        ids = self.svc.tokenizer.encode(req.text())
        segments = [ids[i : i + BLOCK] for i in range(0, len(ids), BLOCK)]
        run = self._start(
            "text_completion", req, segments, len(segments), req.max_tokens or 16, req.stops(), req.logprobs
        )
        run.prompt_chars = len(req.text())
        return run

    def _start(
        self,
        kind: str,
        req: ChatRequest | CompletionRequest,
        segments: list[list[int]],
        cacheable: int,
        max_tokens: int,
        stops: list[str],
        logprobs: int | None,
    ) -> Run:
        if len(stops) > self.svc.limits.max_stop_sequences:  # chat: the template's stop counts too
            limit = self.svc.limits.max_stop_sequences
            raise bad_request(f"too many stop strings: at most {limit}, the chat template's included", "stop")
        plan = self.cache.lookup(segments, cacheable)
        ticket = self.svc.admission.admit(plan.uncached_tokens)  # bounded concurrent prefill work
        try:
            prefilled = self.cache.prefill(plan)
        finally:
            ticket.release()
        metrics.PROMPT_TOKENS.inc(plan.uncached_tokens)
        timeout = self.svc.generation_timeout
        sampling = SamplingParams(
            temperature=req.temperature,
            top_p=max(req.top_p, _MIN_TOP_P),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )
        decoders = []
        for i in range(req.n):
            params = GenerationParams(
                max_tokens=max_tokens,
                sampling=sampling,
                stop=tuple(stops),
                seed=None if req.seed is None else (req.seed + i) % 2**63,  # n different choices, reproducibly
                logprobs=0 if logprobs is None else max(1, logprobs),  # 1: the chosen token's logprob is computed
                deadline=None if timeout is None else time.monotonic() + timeout,
            )
            decoders.append(Decoder(self.svc.engine, self.svc.tokenizer, prefilled.rows.copy(), params, prefilled.ids))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prefix = "chatcmpl-" if kind == "chat.completion" else "cmpl-"
        template = self.template if kind == "chat.completion" else None
        return Run(
            kind,
            prefix + secrets.token_hex(12),
            int(time.time()),
            prefilled,
            decoders,
            logprobs,
            include_usage,
            0,
            template,
        )

    # ---- running it ------------------------------------------------------------------------

    def _streams(self, run: Run) -> list[Iterator[list[TokenEvent]]]:
        return [self.svc.token_events(d) for d in run.decoders]

    def _head(self, run: Run, kind: str | None = None) -> Body:
        return fmt.head(kind or run.kind, run.id, run.created, self.model_id, self.svc.lm.fingerprint)

    def _usage(self, run: Run) -> Body:
        completion = 0
        for d in run.decoders:
            assert d.finished is not None
            completion += d.finished.completion_tokens
        return fmt.usage(len(run.prefilled.ids), completion, run.prefilled.cached_tokens)

    def _after(self, run: Run) -> None:
        """Count the tokens, and cache each chat reply as the next turn's history."""
        finished = [d.finished for d in run.decoders if d.finished is not None]
        metrics.GENERATED_TOKENS.inc(sum(f.completion_tokens for f in finished))
        if run.template is not None:
            for text in dict.fromkeys(f.text for f in finished):  # distinct replies, in order
                self.cache.extend(run.prefilled, self.svc.tokenizer.encode(run.template.reply_as_message(text)))

    def _choice(self, run: Run, index: int, events: list[TokenEvent]) -> Body:
        done = run.decoders[index].finished
        assert done is not None
        reason = fmt.finish_reason(done.finish_reason)
        labels, top = self.svc.labels, run.logprobs
        if run.kind == "chat.completion":
            return {
                "index": index,
                "message": {"role": "assistant", "content": done.text, "refusal": None},
                "logprobs": None if top is None else fmt.chat_logprobs(events, labels, top),
                "finish_reason": reason,
            }
        logprobs = None if top is None else fmt.completion_logprobs(events, labels, top, run.prompt_chars)[0]
        return {"text": done.text, "index": index, "logprobs": logprobs, "finish_reason": reason}

    def complete(self, run: Run) -> Body:
        """The whole response at once."""
        events: list[list[TokenEvent]] = [[] for _ in run.decoders]
        streams = self._streams(run)
        try:
            for i, chunk in interleave(streams):
                if chunk:
                    events[i].extend(chunk)
        finally:
            for s in streams:
                getattr(s, "close", lambda: None)()
        self._after(run)
        choices = [self._choice(run, i, e) for i, e in enumerate(events)]
        return {**self._head(run), "choices": choices, "usage": self._usage(run)}

    def stream(self, run: Run) -> Iterator[bytes]:
        """Server-Sent Events in OpenAI's chunk format, then `data: [DONE]`. A failure after the
        headers ends the stream with an `error` event (the SDK raises it), never a cut connection."""
        chat = run.kind == "chat.completion"
        kind = "chat.completion.chunk" if chat else "text_completion"
        offsets = [run.prompt_chars] * len(run.decoders)
        streams = self._streams(run)
        try:
            if chat:
                for i in range(len(run.decoders)):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield fmt.sse({**self._head(run, kind), "choices": [{**first, "finish_reason": None}]})
            for i, chunk in interleave(streams):
                if chunk is None:
                    yield fmt.sse({**self._head(run, kind), "choices": [self._last(run, i, chat)]})
                elif chunk:
                    choice, offsets[i] = self._delta(run, i, chunk, offsets[i], chat)
                    yield fmt.sse({**self._head(run, kind), "choices": [choice]})
            self._after(run)
            if run.include_usage:
                yield fmt.sse({**self._head(run, kind), "choices": [], "usage": self._usage(run)})
            yield fmt.DONE
        except ApiError as exc:
            yield fmt.sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
        except Exception:
            log.exception("/v1 stream failed after its headers were sent")
            message = "generation failed; it has been logged"
            yield fmt.sse(
                {"error": {"message": message, "type": "server_error", "param": None, "code": "internal_error"}}
            )
        finally:
            for s in streams:
                getattr(s, "close", lambda: None)()

    def _delta(self, run: Run, i: int, events: list[TokenEvent], offset: int, chat: bool) -> tuple[Body, int]:
        text = "".join(e.text for e in events)
        top, labels = run.logprobs, self.svc.labels
        if chat:
            logprobs = None if top is None else fmt.chat_logprobs(events, labels, top)
            return {"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}, offset
        if top is None:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": None}, offset
        logprobs, offset = fmt.completion_logprobs(events, labels, top, offset)
        return {"text": text, "index": i, "logprobs": logprobs, "finish_reason": None}, offset

    def _last(self, run: Run, i: int, chat: bool) -> Body:
        done = run.decoders[i].finished
        reason = fmt.finish_reason(done.finish_reason) if done is not None else "length"
        if chat:
            return {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"text": "", "index": i, "logprobs": None, "finish_reason": reason}
