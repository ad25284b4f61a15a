"""Generation as a per-sequence state machine, so one sequence or many can be stepped together.

A `Decoder` owns everything one request needs between model steps: its state row, sampling
parameters and generator, the text so far, and stop-string handling. A driver (the loop in
`generate` below, or the service's batching scheduler) asks each active decoder for its next
input token, steps the model once for all of them, and hands each its new state.

Stop strings: text that could still grow into a stop string is held back; when one appears,
the text before it is the result, and the state is rewound to exactly that text (states of the
last few tokens are kept for this), so the sequence's state always matches the text returned.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .engine import Engine
from .lstm import State
from .sampling import SamplingParams, UniformStream, make_generator, new_seed, sample_rows
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 100
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int = 0  # top-N alternatives to report per generated token

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class TokenEvent:
    """One generated token as the client sees it. `id` is None for a piece cut by a stop string."""

    text: str
    id: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    finish_reason: str  # "length" or "stop"
    text: str
    completion_tokens: int  # tokens the final state has consumed beyond the prompt
    state: State


@dataclass
class _Pending:
    event: TokenEvent
    end: int  # offset in the generated text where this token ends


class Decoder:
    """Generation for one sequence. Call `next_input()`, step the model, then `advance(row)`.

    The state is a flat float32 row (S,) (Engine.rows layout): in a batch it is a view of the
    scheduler's step output, so taking it costs nothing."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        state: State,
        params: GenerationParams,
        context: list[int] | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self.context = context or []  # prompt ids, for the repetition penalty
        self.row: np.ndarray = engine.rows(state)[0]  # the state after the prompt and what followed
        self.finished: Finished | None = None
        self.seed = params.seed if params.seed is not None else new_seed()
        self._uniforms = UniformStream(make_generator(self.seed))
        # the text so far as pieces (joined once at the end, never re-copied per token), plus
        # its last few characters: all that stop-string matching needs to look at
        self._pieces: list[str] = []
        self._length = 0
        self._tail = ""
        self._generated: list[int] = []
        self._pending: deque[_Pending] = deque()
        self._ready: list[TokenEvent] = []
        self._max_stop = max((len(s) for s in params.stop), default=0)
        # rows after each of the last few tokens, to rewind to the text before a stop string
        self._history: deque[tuple[int, np.ndarray]] = deque(maxlen=self._max_stop + 2)
        self._history.append((0, self.row))
        self._next: int | None = None
        self._next_event: TokenEvent | None = None
        if params.max_tokens <= 0:
            self._finish("length", 0)
        else:
            self._choose(self.engine.logits_rows(self.row[None])[0])

    def sampling_context(self) -> Iterable[int]:
        """What the repetition penalty looks at: the prompt and everything generated so far."""
        if self.params.sampling.repetition_penalty == 1.0:
            return ()
        return itertools.chain(self.context, self._generated)

    def set_next(self, token: int, logits: torch.Tensor | np.ndarray) -> None:
        """Record the sampled next token; `logits` (V,) are the raw ones it was sampled from."""
        logprob = top = None
        if self.params.logprobs:
            x = np.asarray(logits.detach().numpy() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
            logp = x - x.max()
            logp -= np.log(np.exp(logp).sum())
            logprob = float(logp[token])
            best = np.argsort(-logp, kind="stable")[: self.params.logprobs]
            top = [(int(i), float(logp[i])) for i in best]
        self._next = token
        self._next_event = TokenEvent(self.tokenizer.token_text(token), token, logprob, top)

    def _choose(self, logits: torch.Tensor | np.ndarray) -> None:
        """Sample the next token from the distribution after the current state."""
        token = sample_rows(logits[None], [self.params.sampling], [self.draw()], [self.sampling_context()])[0]
        self.set_next(token, logits)

    def draw(self) -> float:
        """This sequence's next uniform draw; greedy sequences draw nothing."""
        return 0.0 if self.params.sampling.temperature == 0.0 else self._uniforms.draw()

    def next_input(self) -> int:
        """The token to feed this step (the one just sampled)."""
        assert self._next is not None and self.finished is None, "decoder is finished"
        return self._next

    def advance(self, row: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Take the state row (S,) after feeding next_input() and sample the next token;
        `logits` (V,) may be passed if already computed."""
        self.accept(row)
        if self.finished is None:
            self._choose(self.engine.logits_rows(row[None])[0] if logits is None else logits)

    def accept(self, row: np.ndarray) -> None:
        """Take the state row (S,) after feeding next_input(), without sampling: unless this
        finished the sequence, set_next() must follow (choose_batch does that for many at once)."""
        assert self._next is not None and self._next_event is not None
        event = self._next_event
        self._generated.append(self._next)
        self._pieces.append(event.text)
        start = self._length
        self._length += len(event.text)
        self.row = row
        self._next = None
        if not self._max_stop:  # nothing can be held back: the token is final
            self._ready.append(event)
            if len(self._generated) >= self.params.max_tokens:
                self._finish("length", self._length)
            return
        self._tail = (self._tail + event.text)[-(self._max_stop + len(event.text)) :]
        self._history.append((len(self._generated), row))
        self._pending.append(_Pending(event, self._length))
        stop_at = self._find_stop(start)
        if stop_at is not None:
            self._finish("stop", stop_at)
            return
        if len(self._generated) >= self.params.max_tokens:
            self._finish("length", self._length)
            return
        self._release(self._safe_end())

    def take_events(self) -> list[TokenEvent]:
        """Tokens that can no longer be part of a stop string, in order; each is returned once."""
        ready, self._ready = self._ready, []
        return ready

    @property
    def text(self) -> str:
        return "".join(self._pieces) if self.finished is None else self.finished.text

    def _find_stop(self, new_from: int) -> int | None:
        best = None
        tail_start = self._length - len(self._tail)
        for stop in self.params.stop:
            pos = self._tail.find(stop, max(0, new_from - len(stop) + 1 - tail_start))
            if pos != -1 and (best is None or tail_start + pos < best):
                best = tail_start + pos
        return best

    def _safe_end(self) -> int:
        """Offset up to which the text cannot turn out to belong to a stop string."""
        text = self._tail
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.params.stop):
                return self._length - k
        return self._length

    def _release(self, upto: int) -> None:
        while self._pending and self._pending[0].end <= upto:
            self._ready.append(self._pending.popleft().event)

    def _finish(self, reason: str, end: int) -> None:
        self._release(end)
        kept = len(self._generated) - len(self._pending)  # tokens wholly before `end`
        row = self.row if not self._pending else next(r for n, r in reversed(self._history) if n <= kept)
        state = self.engine.state_of(row[None])
        completion = kept
        if self._pending:  # a token straddles the stop: keep its text before the stop
            pending_start = self._pending[0].end - len(self._pending[0].event.text)
            partial = "".join(self._pieces)[pending_start:end]
            if partial:
                self._ready.append(TokenEvent(partial, None))
                ids = self.tokenizer.encode(partial)
                state = self.engine.prefill(ids, state)
                completion += len(ids)
            self._pending.clear()
        text = "".join(self._pieces)[:end]
        self._pieces, self._length, self._tail = [text], len(text), ""
        self.finished = Finished(reason, text, completion, state)
        self.row = self.engine.rows(state)[0]
        self._next = None


def choose_batch(decoders: list[Decoder], logits: torch.Tensor | np.ndarray) -> None:
    """Sample the next token of every decoder at once; row i of `logits` (B, V) belongs to decoders[i].
    Each row uses its own parameters and generator, so the result equals sampling them one by one."""
    raw = logits.detach().numpy() if isinstance(logits, torch.Tensor) else logits
    tokens = sample_rows(
        raw,
        [d.params.sampling for d in decoders],
        [d.draw() for d in decoders],
        [d.sampling_context() for d in decoders],
    )
    for row, (decoder, token) in enumerate(zip(decoders, tokens)):
        decoder.set_next(token, raw[row])


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    state: State,
    params: GenerationParams,
    context: list[int] | None = None,
) -> Iterator[TokenEvent | Finished]:
    """Decode one sequence from `state`: yields token events, then one Finished."""
    decoder = Decoder(engine, tokenizer, state, params, list(context or []))
    while decoder.finished is None:
        token = np.array([decoder.next_input()])
        decoder.advance(engine.step_rows(token, decoder.row[None])[0])
        yield from decoder.take_events()
    yield from decoder.take_events()
    yield decoder.finished
