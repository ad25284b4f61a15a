"""What the endpoints do: sessions, generation, next-token distributions, scoring.

Routes parse and serialise; this module loads a session's state, runs the model (through
model.engine and model.generation), and writes the new state back with compare-and-set. A
request without a session starts from the fresh state after <s> and never touches the store,
so it works even when Redis is down.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model import LanguageModel, State
from model.engine import Engine
from model.generation import Decoder, GenerationParams, TokenEvent
from model.lstm import flatten_state, state_size, unflatten_state
from model.sampling import SamplingParams
from model.tokenizer import BOS_ID, BOS_TEXT, UNK_ID, UNK_TEXT, Encoding

from . import metrics
from .errors import ApiError, conflict, not_found
from .scheduler import BatchScheduler, run_inline
from .schemas import (
    DetokenizeResponse,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    NextRequest,
    NextResponse,
    NextToken,
    ScoreRequest,
    ScoreResponse,
    SessionCreated,
    SessionInfo,
    StreamFinal,
    TokenizeResponse,
    TokenProb,
    TokenText,
    Usage,
)
from .sessions import CasResult, SessionStore
from .sse import SSEEncoder
from .state_codec import SessionState, StateDecodeError, decode_state, encode_state

log = logging.getLogger(__name__)


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


@dataclass
class _Context:
    """A request's starting point: a session's state, or the fresh state after <s>."""

    session_id: str | None
    state: State
    tokens: int
    version: int
    created_at: float


@dataclass
class _Generation:
    context: _Context
    prompt_tokens: int
    unknown_chars: int
    decoder: Decoder
    started: float


class LMService:
    def __init__(self, lm: LanguageModel, store: SessionStore, *, engine: Engine, batching: bool, max_batch: int):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.store = store
        self.engine = engine
        self.scheduler = BatchScheduler(engine, max_batch) if batching else None
        self._columns = state_size(lm.config)
        self.sse = SSEEncoder(lm.tokenizer.vocab_size, lm.tokenizer.token_text, self.label)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # ---- helpers ------------------------------------------------------------------------

    def label(self, token_id: int) -> str:
        """Display text of a token: specials by name, others as the text they decode to."""
        if token_id == BOS_ID:
            return BOS_TEXT
        if token_id == UNK_ID:
            return UNK_TEXT
        return self.tokenizer.token_text(token_id)

    def _decode_blob(self, session_id: str, blob: bytes) -> SessionState:
        try:
            return decode_state(blob, self.lm.fingerprint, self._columns)
        except StateDecodeError as exc:
            metrics.STORE_ERRORS.labels("corrupt_state").inc()
            log.error("session %s: stored state cannot be decoded: %s", session_id, exc)
            raise ApiError(
                500, "session_state_corrupt", f"the stored state of session {session_id!r} is unreadable: {exc}"
            ) from exc

    def _open(self, session_id: str | None) -> _Context:
        if session_id is None:
            return _Context(None, self.engine.start_state(), 0, 0, time.time())
        blob = self.store.get(session_id)
        if blob is None:
            raise not_found(session_id)
        saved = self._decode_blob(session_id, blob)
        return _Context(
            session_id, unflatten_state(saved.state, self.lm.config), saved.tokens, saved.version, saved.created_at
        )

    def _commit(self, ctx: _Context, state: State, added: int) -> int:
        """Write the new state of a session (compare-and-set); returns its token count."""
        tokens = ctx.tokens + added
        if ctx.session_id is None or added == 0:
            return tokens
        record = SessionState(flatten_state(state), tokens, ctx.version + 1, ctx.created_at, time.time())
        result = self.store.compare_and_set(ctx.session_id, ctx.version, encode_state(record, self.lm.fingerprint))
        if result is CasResult.CONFLICT:
            raise conflict(ctx.session_id)
        if result is CasResult.MISSING:
            raise not_found(ctx.session_id)
        return tokens

    def _create(self, state: State, tokens: int, created_at: float | None = None) -> str:
        now = time.time()
        blob = encode_state(SessionState(flatten_state(state), tokens, 0, created_at or now, now), self.lm.fingerprint)
        while True:
            session_id = new_session_id()
            if self.store.create(session_id, blob):
                return session_id

    def _prefill(self, text: str, state: State) -> tuple[State, Encoding]:
        """Consume `text` in one whole-sequence call; returns the new state and the encoding."""
        enc = self.tokenizer.encode_with_unknowns(text)
        metrics.PROMPT_TOKENS.inc(len(enc.ids))
        return self.engine.prefill(enc.ids, state), enc

    # ---- sessions -----------------------------------------------------------------------

    def create_session(self, text: str) -> SessionCreated:
        state, enc = self._prefill(text, self.engine.start_state())
        n = len(enc.ids)
        return SessionCreated(session_id=self._create(state, n), tokens=n, unknown_chars=enc.unknown_chars)

    def session_info(self, session_id: str) -> SessionInfo:
        blob = self.store.get(session_id)
        if blob is None:
            raise not_found(session_id)
        saved = self._decode_blob(session_id, blob)
        return SessionInfo(
            session_id=session_id,
            tokens=saved.tokens,
            created_at=saved.created_at,
            updated_at=saved.updated_at,
            expires_in=self.store.ttl(session_id),
            model=self.lm.fingerprint,
        )

    def delete_session(self, session_id: str) -> None:
        if not self.store.delete(session_id):
            raise not_found(session_id)

    def fork_session(self, session_id: str) -> SessionCreated:
        ctx = self._open(session_id)
        return SessionCreated(session_id=self._create(ctx.state, ctx.tokens), tokens=ctx.tokens, unknown_chars=0)

    # ---- generation ---------------------------------------------------------------------

    def start_generation(self, req: GenerateRequest) -> _Generation:
        """Everything that can fail with a clean HTTP status happens here, before any streaming."""
        ctx = self._open(req.session_id)
        state, enc = self._prefill(req.prompt, ctx.state)
        params = GenerationParams(
            max_tokens=req.max_tokens,
            sampling=SamplingParams(req.temperature, req.top_k, req.top_p, req.repetition_penalty),
            stop=tuple(req.stop),
            seed=req.seed,
            logprobs=req.logprobs,
        )
        decoder = Decoder(self.engine, self.tokenizer, state, params, enc.ids)
        return _Generation(ctx, len(enc.ids), enc.unknown_chars, decoder, time.monotonic())

    def _token_events(self, gen: _Generation) -> Iterator[list[TokenEvent]]:
        if self.scheduler is not None:
            return self.scheduler.run(gen.decoder)
        return run_inline(self.engine, gen.decoder)

    def _finish(self, gen: _Generation) -> StreamFinal:
        done = gen.decoder.finished
        assert done is not None
        session_tokens = self._commit(gen.context, done.state, gen.prompt_tokens + done.completion_tokens)
        elapsed = time.monotonic() - gen.started
        metrics.GENERATED_TOKENS.inc(done.completion_tokens)
        if done.completion_tokens and elapsed > 0:
            metrics.GENERATION_SPEED.observe(done.completion_tokens / elapsed)
        usage = Usage(
            prompt_tokens=gen.prompt_tokens, completion_tokens=done.completion_tokens, session_tokens=session_tokens
        )
        return StreamFinal(
            finish_reason=done.finish_reason,  # type: ignore[arg-type]
            session_id=gen.context.session_id,
            seed=gen.decoder.seed,
            usage=usage,
            unknown_chars=gen.unknown_chars,
            text=done.text,
        )

    def generate(self, gen: _Generation) -> GenerateResponse:
        events = [
            GeneratedToken.model_validate(self.sse.event_dict(e)) for chunk in self._token_events(gen) for e in chunk
        ]
        final = self._finish(gen)
        return GenerateResponse(
            **final.model_dump(exclude={"text"}),
            text=final.text,
            tokens=events if gen.decoder.params.logprobs else None,
        )

    def generate_stream(self, gen: _Generation) -> Iterator[bytes]:
        """Server-Sent Events: token events as they come, then the final summary (or an error if
        saving the session failed). If the consumer stops early (client gone), generation stops
        and nothing is saved."""
        events = self._token_events(gen)
        try:
            for chunk in events:
                yield self.sse.tokens(chunk)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        try:
            yield self.sse.final(self._finish(gen))
        except ApiError as exc:
            yield self.sse.final(exc)

    # ---- distributions and scores -------------------------------------------------------

    def next(self, req: NextRequest) -> NextResponse:
        ctx = self._open(req.session_id)
        state, enc = self._prefill(req.text, ctx.state)
        n = len(enc.ids)
        logp = self.engine.log_probs(state)[0].double()
        probs = logp.exp()
        entropy = float(torch.special.entr(probs).sum())
        k = probs.numel() if req.top_n == 0 else min(req.top_n, probs.numel())
        values, ids = torch.topk(probs, k)
        listed = [
            NextToken(token=self.label(int(i)), id=int(i), prob=float(p), logprob=float(logp[i]))
            for p, i in zip(values, ids)
        ]
        if req.commit:
            self._commit(ctx, state, n)
        return NextResponse(
            session_id=ctx.session_id, tokens_processed=n, unknown_chars=enc.unknown_chars, next=listed, entropy=entropy
        )

    def score(self, req: ScoreRequest) -> ScoreResponse:
        ctx = self._open(req.session_id)
        enc = self.tokenizer.encode_with_unknowns(req.text)
        metrics.PROMPT_TOKENS.inc(len(enc.ids))
        scores, state = self.engine.score(enc.ids, ctx.state)
        if req.commit:
            self._commit(ctx, state, len(enc.ids))
        total = float(scores.double().sum())
        n = len(enc.ids)
        return ScoreResponse(
            session_id=ctx.session_id,
            tokens=[TokenProb(token=self.label(i), id=i, logprob=float(s)) for i, s in zip(enc.ids, scores)],
            total_logprob=total,
            num_tokens=n,
            num_chars=len(req.text),
            unknown_chars=enc.unknown_chars,
            bits_per_char=-total / math.log(2) / len(req.text),
            perplexity=math.exp(-total / n) if n else float("nan"),
        )

    # ---- tokenizer ----------------------------------------------------------------------

    def tokenize(self, text: str) -> TokenizeResponse:
        enc = self.tokenizer.encode_with_unknowns(text)
        return TokenizeResponse(
            tokens=[TokenText(id=i, token=self.label(i)) for i in enc.ids], unknown_chars=enc.unknown_chars
        )

    def detokenize(self, ids: list[int]) -> DetokenizeResponse:
        vocab = self.tokenizer.vocab_size
        bad = [
            {"field": f"ids.{n}", "message": f"{i} is not a token id (0..{vocab - 1})"}
            for n, i in enumerate(ids)
            if not 0 <= i < vocab
        ]
        if bad:
            raise ApiError(422, "invalid_request", f"ids must be between 0 and {vocab - 1}", bad[:20])
        return DetokenizeResponse(text=self.tokenizer.decode(ids))
