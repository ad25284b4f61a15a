"""Generation as a per-sequence state machine, stepped in batches by one function.

A `Decoder` owns everything one request needs between model steps: its state row, sampling
parameters and uniform draws, the text so far, and stop-string handling. `start_decoders`
samples the first token of new decoders from the logits after their prompts; `step_decoders`
then advances a batch of them by one token: one engine step and one output projection for the
whole batch, each decoder takes its new row, and those still going sample their next token in
one vectorised pass. The service's scheduler calls it once per tick; `generate` below calls it
with a batch of one.

Stop strings: text that could still grow into a stop string is held back; when one appears,
the text before it is the result, and the state is rewound to exactly that text (states of the
last few tokens are kept for this), so the sequence's state always matches the text returned.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .engine import Engine
from .sampling import SamplingParams, UniformStream, make_generator, new_seed, sample_rows
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 100
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int = 0  # top-N alternatives to report per generated token
    deadline: float | None = None  # time.monotonic() after which generation ends ("time_limit")
    # False: nothing continues from the final state (a request without a session), so a last
    # token reached by max_tokens is not fed through the model (one step fewer per request);
    # Finished.rows is then the state before that token
    keep_state: bool = True

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
    finish_reason: str  # "length", "stop" or "time_limit"
    text: str
    completion_tokens: int  # tokens the final state has consumed beyond the prompt
    rows: np.ndarray  # (1, S): the state after the prompt and `text` (before its last token if not keep_state)


@dataclass
class _Pending:
    event: TokenEvent
    end: int  # offset in the generated text where this token ends


class Decoder:
    """Generation for one sequence, from state rows (1, S) after its prompt.

    `row` is the current state (S,): in a batch, a view of the step's output, so taking it
    costs nothing. Drive it with start_decoders once, then step_decoders until `finished`."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        rows: np.ndarray,
        params: GenerationParams,
        context: list[int] | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self._texts = tokenizer.texts
        self.context = context or []  # prompt ids, for the repetition penalty
        self.row: np.ndarray = np.asarray(rows, dtype=np.float32).reshape(-1)
        self.finished: Finished | None = None
        self.seed = params.seed if params.seed is not None else new_seed()
        self._greedy = params.sampling.temperature == 0.0
        self._deadline = params.deadline
        self._uniforms = UniformStream(make_generator(self.seed))
        # the text so far as pieces (joined once at the end, never re-copied per token), plus
        # its last few characters: all that stop-string matching needs to look at
        self._pieces: list[str] = []
        self._length = 0
        self._tail = ""
        self._generated: list[int] = []
        # how often each token has been generated, for presence / frequency penalties only
        self._counts = np.zeros(tokenizer.vocab_size) if params.sampling.counts_tokens else None
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

    @property
    def started(self) -> bool:
        return self._next is not None or self.finished is not None

    def sampling_context(self) -> Iterable[int]:
        """What the repetition penalty looks at: the prompt and everything generated so far."""
        if self.params.sampling.repetition_penalty == 1.0:
            return ()
        return itertools.chain(self.context, self._generated)

    def generated_counts(self) -> np.ndarray | None:
        """How often each token (V,) has been generated so far; None when no penalty needs it."""
        return self._counts

    def draw(self) -> float:
        """This sequence's next uniform draw; greedy sequences draw nothing."""
        return 0.0 if self._greedy else self._uniforms.draw()

    def set_next(self, token: int, logits: np.ndarray) -> None:
        """Record the sampled next token; `logits` (V,) are the raw ones it was sampled from."""
        logprob = top = None
        if self.params.logprobs:
            logp = logits.astype(np.float64)
            logp -= logp.max()
            logp -= np.log(np.exp(logp).sum())
            logprob = float(logp[token])
            best = np.argsort(-logp, kind="stable")[: self.params.logprobs]
            top = [(int(i), float(logp[i])) for i in best]
        self._next = token
        self._next_event = TokenEvent(self._texts[token], token, logprob, top)

    def ends_unstepped(self) -> bool:
        """Whether the token about to be fed is this sequence's last (by length, with no stop
        string that could cut it) and nobody needs the state after it."""
        return (
            not self.params.keep_state
            and not self._max_stop
            and self.finished is None
            and len(self._generated) + 1 >= self.params.max_tokens
        )

    def next_input(self) -> int:
        """The token to feed this step (the one just sampled)."""
        if self._next is None or self.finished is not None:
            raise RuntimeError("the decoder has not started or has finished")
        return self._next

    def accept(self, row: np.ndarray) -> None:
        """Take the state row (S,) after feeding next_input(). Unless this finished the sequence,
        set_next() must follow (step_decoders does that for a whole batch at once)."""
        assert self._next is not None and self._next_event is not None
        event = self._next_event
        self._generated.append(self._next)
        if self._counts is not None:
            self._counts[self._next] += 1
        self._pieces.append(event.text)
        start = self._length
        self._length += len(event.text)
        self.row = row
        self._next = None
        if not self._max_stop:  # nothing can be held back: the token is final
            self._ready.append(event)
            if len(self._generated) >= self.params.max_tokens:
                self._finish("length", self._length)
            elif self._deadline is not None and time.monotonic() > self._deadline:
                self._finish("time_limit", self._length)
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
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._finish("time_limit", self._length)  # held-back text is released: no stop string came
            return
        self._release(self._safe_end())

    def take_events(self) -> list[TokenEvent]:
        """Tokens that can no longer be part of a stop string, in order; each is returned once."""
        ready, self._ready = self._ready, []
        return ready

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
        rows = np.array(row, dtype=np.float32, ndmin=2)  # a copy: a batch's rows are reused
        completion = kept
        if self._pending:  # a token straddles the stop: keep its text before the stop
            pending_start = self._pending[0].end - len(self._pending[0].event.text)
            partial = "".join(self._pieces)[pending_start:end]
            if partial:
                head = self._pending[0].event  # the piece's log-probability is its token's
                self._ready.append(TokenEvent(partial, None, head.logprob, head.top))
                ids = self.tokenizer.encode(partial)
                rows = self.engine.prefill(ids, rows)
                completion += len(ids)
            self._pending.clear()
        text = "".join(self._pieces)[:end]
        self._pieces, self._length, self._tail = [text], len(text), ""
        self.finished = Finished(reason, text, completion, rows)
        self.row = rows[0]
        self._next = None


def _choose(decoders: Sequence[Decoder], logits: np.ndarray) -> None:
    """Sample the next token of every decoder at once; row i of `logits` (B, V) belongs to
    decoders[i]. Each row uses its own parameters and draws, so the result equals sampling
    them one by one."""
    tokens = sample_rows(
        logits,
        [d.params.sampling for d in decoders],
        [d.draw() for d in decoders],
        [d.sampling_context() for d in decoders],
        [d.generated_counts() for d in decoders],
    )
    for row, (decoder, token) in enumerate(zip(decoders, tokens)):
        decoder.set_next(token, logits[row])


def start_decoders(engine: Engine, decoders: Sequence[Decoder]) -> None:
    """Sample the first token of each new decoder from the logits after its prompt."""
    waiting = [d for d in decoders if not d.started]
    if waiting:
        _choose(waiting, engine.logits(np.stack([d.row for d in waiting])))


def step_decoders(engine: Engine, decoders: Sequence[Decoder], rows: np.ndarray | None = None) -> np.ndarray:
    """Advance every (started, unfinished) decoder by one token: feed each its sampled token,
    hand it its new state row, and sample the next token of those still going.

    `rows` (B, S) are the decoders' current rows in order when the caller still holds them from
    the previous call (None: gathered from the decoders). Returns the new rows: row i belongs to
    decoders[i], and each decoder's `row` is a view into it."""
    if all(d.ends_unstepped() for d in decoders):  # every one ends here and keeps no state
        for d in decoders:
            d.accept(d.row)
        return rows if rows is not None else np.stack([d.row for d in decoders])
    if rows is None:
        rows = np.stack([d.row for d in decoders])
    ids = np.fromiter((d.next_input() for d in decoders), dtype=np.int64, count=len(decoders))
    rows = engine.step(ids, rows)
    logits = engine.logits(rows)
    going: list[int] = []
    for index, decoder in enumerate(decoders):
        decoder.accept(rows[index])  # a view: free
        if decoder.finished is None:
            going.append(index)
    if going:
        _choose([decoders[i] for i in going], logits if len(going) == len(decoders) else logits[going])
    return rows


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    rows: np.ndarray,
    params: GenerationParams,
    context: list[int] | None = None,
) -> Iterator[TokenEvent | Finished]:
    """Decode one sequence from rows (1, S): yields token events, then one Finished."""
    decoder = Decoder(engine, tokenizer, rows, params, list(context or []))
    start_decoders(engine, [decoder])
    batch: list[Decoder] = [decoder]
    current: np.ndarray | None = None
    while decoder.finished is None:
        current = step_decoders(engine, batch, current)
        yield from decoder.take_events()
    yield from decoder.take_events()
    yield decoder.finished
