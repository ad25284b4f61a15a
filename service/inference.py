"""What the endpoints do: sessions, generation, next-token distributions, scoring.

Routes parse and serialise; this module loads a session's state, runs the model (through
model.engine and model.generation), and writes the new state back with compare-and-set. A
request without a session starts from the fresh state after <s> and never touches the store,
so it works even when Redis is down.

A state is the engine's flat float32 rows (1, S) from the store's bytes to the decode step and
back: nothing here knows how an LSTM lays out its state. Responses are plain dicts shaped as
service.schemas describes (the tests check every response against those models): building a
pydantic object per generated or scored token cost more than generating it.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from model import LanguageModel
from model.engine import Engine
from model.generation import Decoder, GenerationParams, TokenEvent
from model.sampling import SamplingParams
from model.tokenizer import BOS_ID, BOS_TEXT, UNK_ID, UNK_TEXT, Encoding

from . import metrics
from .admission import Admission
from .errors import ApiError, conflict, not_found
from .scheduler import BatchScheduler, run_inline
from .schemas import GenerateRequest, Limits, NextRequest, ScoreRequest
from .sessions import CasResult, SessionStore, StoreUnavailable
from .sse import SSEEncoder
from .state_codec import SessionState, StateDecodeError, decode_state, encode_state

log = logging.getLogger(__name__)

Body = dict[str, Any]


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


@dataclass
class _Context:
    """A request's starting point: a session's state, or the fresh state after <s>."""

    session_id: str | None
    rows: np.ndarray  # (1, S)
    tokens: int
    version: int
    created_at: float


@dataclass
class Generation:
    """A generation that has passed every check that can fail with a clean HTTP status."""

    context: _Context
    prompt_tokens: int
    unknown_chars: int
    decoder: Decoder
    started: float


class LMService:
    def __init__(
        self,
        lm: LanguageModel,
        store: SessionStore,
        *,
        engine: Engine,
        batching: bool,
        max_batch: int,
        limits: Limits,
        flush_interval: float = 0.0,
        admission: Admission | None = None,
        generation_timeout: float | None = None,
    ):
        self.lm = lm
        self.limits = limits  # what requests are validated against
        self.admission = admission or Admission(budget=1 << 62, queue=0, wait_seconds=0)
        self.generation_timeout = generation_timeout
        self.tokenizer = lm.tokenizer
        self.store = store
        self.engine = engine
        self.flush_interval = flush_interval  # seconds a stream's tokens may gather before a write
        self.scheduler = BatchScheduler(engine, max_batch, on_tick=metrics.BATCH_SIZE.observe) if batching else None
        self.labels = [self._label(i) for i in range(lm.tokenizer.vocab_size)]
        self.sse = SSEEncoder(lm.tokenizer.texts, self.labels)

    def close(self) -> None:
        """Nothing to stop: the scheduler has no thread of its own (kept for the app's teardown)."""

    # ---- helpers ------------------------------------------------------------------------

    def _label(self, token_id: int) -> str:
        """Display text of a token: specials by name, others as the text they decode to."""
        if token_id == BOS_ID:
            return BOS_TEXT
        if token_id == UNK_ID:
            return UNK_TEXT
        return self.tokenizer.token_text(token_id)

    def _decode_blob(self, session_id: str, blob: bytes) -> SessionState:
        try:
            return decode_state(blob, self.lm.fingerprint, self.engine.state_size)
        except StateDecodeError as exc:
            metrics.STORE_ERRORS.labels("corrupt_state").inc()
            log.error("session %s...: stored state cannot be decoded: %s", session_id[:4], exc)  # ids are secrets
            raise ApiError(
                500, "session_state_corrupt", f"the stored state of session {session_id!r} is unreadable: {exc}"
            ) from exc

    def _open(self, session_id: str | None) -> _Context:
        if session_id is None:
            return _Context(None, self.engine.start(), 0, 0, time.time())
        blob = self.store.get(session_id)
        if blob is None:
            raise not_found(session_id)
        saved = self._decode_blob(session_id, blob)
        return _Context(session_id, saved.rows, saved.tokens, saved.version, saved.created_at)

    def _commit(self, ctx: _Context, rows: np.ndarray, added: int) -> int:
        """Write the new state of a session (compare-and-set); returns its token count."""
        tokens = ctx.tokens + added
        if ctx.session_id is None or added == 0:
            return tokens
        record = SessionState(rows, tokens, ctx.version + 1, ctx.created_at, time.time())
        result = self.store.compare_and_set(ctx.session_id, ctx.version, encode_state(record, self.lm.fingerprint))
        if result is CasResult.CONFLICT:
            raise conflict(ctx.session_id)
        if result is CasResult.MISSING:
            raise not_found(ctx.session_id)
        return tokens

    def _create(self, rows: np.ndarray, tokens: int) -> str:
        now = time.time()
        blob = encode_state(SessionState(rows, tokens, 0, now, now), self.lm.fingerprint)
        while True:
            session_id = new_session_id()
            if self.store.create(session_id, blob):
                return session_id

    def _prefill(self, text: str, rows: np.ndarray) -> tuple[np.ndarray, Encoding]:
        """Consume `text`; returns the new rows and the encoding."""
        enc = self.tokenizer.encode_with_unknowns(text)
        metrics.PROMPT_TOKENS.inc(len(enc.ids))
        return self.engine.prefill(enc.ids, rows), enc

    # ---- sessions -----------------------------------------------------------------------

    @contextmanager
    def _admitted(self, cost: int) -> Iterator[None]:
        ticket = self.admission.admit(cost)
        try:
            yield
        finally:
            ticket.release()

    def create_session(self, text: str) -> Body:
        with self._admitted(len(text)):
            rows, enc = self._prefill(text, self.engine.start())
        n = len(enc.ids)
        return {"session_id": self._create(rows, n), "tokens": n, "unknown_chars": enc.unknown_chars}

    def session_info(self, session_id: str) -> Body:
        blob = self.store.get(session_id)
        if blob is None:
            raise not_found(session_id)
        saved = self._decode_blob(session_id, blob)
        return {
            "session_id": session_id,
            "tokens": saved.tokens,
            "created_at": saved.created_at,
            "updated_at": saved.updated_at,
            "expires_in": self.store.ttl(session_id),
            "model": self.lm.fingerprint,
        }

    def delete_session(self, session_id: str) -> None:
        if not self.store.delete(session_id):
            raise not_found(session_id)

    def fork_session(self, session_id: str) -> Body:
        ctx = self._open(session_id)
        return {"session_id": self._create(ctx.rows, ctx.tokens), "tokens": ctx.tokens, "unknown_chars": 0}

    # ---- generation ---------------------------------------------------------------------

    def start_generation(self, req: GenerateRequest) -> Generation:
        """Everything that can fail with a clean HTTP status happens here, before any streaming."""
        ctx = self._open(req.session_id)
        with self._admitted(len(req.prompt)):
            rows, enc = self._prefill(req.prompt, ctx.rows)
        started = time.monotonic()
        params = GenerationParams(
            max_tokens=req.max_tokens,
            sampling=SamplingParams(req.temperature, req.top_k, req.top_p, req.repetition_penalty),
            stop=tuple(req.stop),
            seed=req.seed,
            logprobs=req.logprobs,
            deadline=None if self.generation_timeout is None else started + self.generation_timeout,
            keep_state=ctx.session_id is not None,
        )
        decoder = Decoder(self.engine, self.tokenizer, rows, params, enc.ids)
        return Generation(ctx, len(enc.ids), enc.unknown_chars, decoder, started)

    def token_events(self, decoder: Decoder, flush_interval: float | None = None) -> Iterator[list[TokenEvent]]:
        """A decoder's token events in lists, batched with other requests unless BATCHING is off;
        `flush_interval` as in BatchScheduler.run (default: the service's)."""
        interval = self.flush_interval if flush_interval is None else flush_interval
        if self.scheduler is not None:
            return self.scheduler.run(decoder, interval)
        return run_inline(self.engine, decoder, interval)

    def _finish(self, gen: Generation) -> Body:
        """Save the session and summarise: the last streamed event, and most of the JSON answer."""
        done = gen.decoder.finished
        assert done is not None
        session_tokens = self._commit(gen.context, done.rows, gen.prompt_tokens + done.completion_tokens)
        elapsed = time.monotonic() - gen.started
        metrics.GENERATED_TOKENS.inc(done.completion_tokens)
        if done.completion_tokens and elapsed > 0:
            metrics.GENERATION_SPEED.observe(done.completion_tokens / elapsed)
        return {
            "text": done.text,
            "session_id": gen.context.session_id,
            "finish_reason": done.finish_reason,
            "seed": gen.decoder.seed,
            "usage": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "session_tokens": session_tokens,
            },
            "unknown_chars": gen.unknown_chars,
        }

    def generate(self, gen: Generation) -> Body:
        events = [e for chunk in self.token_events(gen.decoder, math.inf) for e in chunk]  # only the end matters
        body = self._finish(gen)
        if gen.decoder.params.logprobs:
            body["tokens"] = [self.sse.event_dict(e) for e in events]
        return body

    def generate_stream(self, gen: Generation) -> Iterator[bytes]:
        """Server-Sent Events: token events as they come, then the final summary. Whatever fails
        after the headers went out (saving the session, the store, a step) ends the stream with
        an `error` event, never a cut connection. If the consumer stops early (client gone),
        generation stops and nothing is saved."""
        events = self.token_events(gen.decoder)
        final: Body | ApiError
        try:
            for chunk in events:
                yield self.sse.tokens(chunk)
            final = self._finish(gen)
        except ApiError as exc:
            final = exc
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("unavailable").inc()
            log.warning("stream: session store unavailable: %s", exc)
            final = ApiError(503, "store_unavailable", "the session store is unavailable; nothing was saved, retry")
        except Exception:
            log.exception("stream failed after its headers were sent")
            final = ApiError(500, "internal_error", "generation failed; it has been logged and nothing was saved")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        yield self.sse.final(final)

    # ---- distributions and scores -------------------------------------------------------

    def next(self, req: NextRequest) -> Body:
        ctx = self._open(req.session_id)
        with self._admitted(len(req.text)):
            rows, enc = self._prefill(req.text, ctx.rows)
        n = len(enc.ids)
        logp = self.engine.log_probs(rows)[0]
        probs = np.exp(logp)
        entropy = float(-(probs * logp)[probs > 0].sum())
        k = probs.size if req.top_n == 0 else min(req.top_n, probs.size)
        best = np.argsort(-probs, kind="stable")[:k].tolist()
        labels = self.labels
        listed = [{"token": labels[i], "id": i, "prob": float(probs[i]), "logprob": float(logp[i])} for i in best]
        if req.commit:
            self._commit(ctx, rows, n)
        return {
            "session_id": ctx.session_id,
            "tokens_processed": n,
            "unknown_chars": enc.unknown_chars,
            "next": listed,
            "entropy": entropy,
        }

    def score(self, req: ScoreRequest) -> Body:
        ctx = self._open(req.session_id)
        enc = self.tokenizer.encode_with_unknowns(req.text)
        metrics.PROMPT_TOKENS.inc(len(enc.ids))
        with self._admitted(len(req.text)):
            scores, rows = self.engine.score(enc.ids, ctx.rows)
        if req.commit:
            self._commit(ctx, rows, len(enc.ids))
        total = float(scores.sum())
        n = len(enc.ids)
        labels = self.labels
        return {
            "session_id": ctx.session_id,
            "tokens": [{"token": labels[i], "id": i, "logprob": s} for i, s in zip(enc.ids, scores.tolist())],
            "total_logprob": total,
            "num_tokens": n,
            "num_chars": len(req.text),
            "unknown_chars": enc.unknown_chars,
            "bits_per_char": -total / math.log(2) / len(req.text),
            "perplexity": math.exp(-total / max(n, 1)),  # n >= 1: the text is not empty
        }

    # ---- tokenizer ----------------------------------------------------------------------

    def tokenize(self, text: str) -> Body:
        enc = self.tokenizer.encode_with_unknowns(text)
        labels = self.labels
        return {"tokens": [{"id": i, "token": labels[i]} for i in enc.ids], "unknown_chars": enc.unknown_chars}

    def detokenize(self, ids: list[int]) -> Body:
        vocab = self.tokenizer.vocab_size
        bad = [
            {"field": f"ids.{n}", "message": f"{i} is not a token id (0..{vocab - 1})"}
            for n, i in enumerate(ids)
            if not 0 <= i < vocab
        ]
        if bad:
            raise ApiError(422, "invalid_request", f"ids must be between 0 and {vocab - 1}", bad[:20])
        return {"text": self.tokenizer.decode(ids)}
