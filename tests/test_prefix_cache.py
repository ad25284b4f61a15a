"""The prefix cache: a hit gives the very rows (and so the very output) of reading everything,
entries always expire, and a failing store never fails a request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from model import LanguageModel
from model.chat import PLAY_TEMPLATE, Message
from model.engine import SHORT_PREFILL, Engine
from model.generation import Finished, GenerationParams, generate
from model.sampling import SamplingParams
from service.prefix_cache import MAX_BOUNDARIES, PrefixCache, boundary_digests, digest
from service.sessions import MemorySessionStore, RedisSessionStore, StoreUnavailable
from service.state_codec import store_namespace

from servers import RedisServer

TURNS = [
    Message("system", "Elsinore. A platform before the castle. " * 3),  # > SHORT_PREFILL tokens: nn.LSTM
    Message("user", "Who's there?"),  # < SHORT_PREFILL: fused steps
    Message("assistant", "Nay, answer me: stand, and unfold yourself."),
    Message("user", "Long live the king!", name="BERNARDO"),
    Message("assistant", "Bernardo?"),
    Message("user", "He."),
]


def segments(lm: LanguageModel, messages: Sequence[Message]) -> list[list[int]]:
    rendered = PLAY_TEMPLATE.render(messages)
    return [lm.tokenizer.encode(t) for t in rendered.messages] + [lm.tokenizer.encode(rendered.reply_prompt)]


def read(cache: PrefixCache, segs: list[list[int]]) -> tuple[np.ndarray, int]:
    prefilled = cache.prefill(cache.lookup(segs, len(segs) - 1))
    return prefilled.rows, prefilled.cached_tokens


def seeded_text(lm: LanguageModel, engine: Engine, rows: np.ndarray) -> str:
    params = GenerationParams(max_tokens=60, sampling=SamplingParams(temperature=0.9), seed=11)
    return next(x for x in generate(engine, lm.tokenizer, rows, params) if isinstance(x, Finished)).text


@pytest.fixture()
def engine(char_lm: LanguageModel) -> Engine:
    return Engine(char_lm.model)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, char_lm: LanguageModel) -> MemorySessionStore | RedisSessionStore:
    if request.param == "memory":
        return MemorySessionStore(3600, 1 << 24)
    server: RedisServer = request.getfixturevalue("redis_server")
    server.client().flushall()
    return RedisSessionStore(server.url, store_namespace(char_lm.fingerprint), 3600)


def test_a_hit_gives_the_rows_and_output_of_reading_everything(
    char_lm: LanguageModel, engine: Engine, store: MemorySessionStore | RedisSessionStore
) -> None:
    cache = PrefixCache(store, engine, char_lm.fingerprint)
    nocache = PrefixCache(store, engine, char_lm.fingerprint, enabled=False)
    lengths = [len(s) for s in segments(char_lm, TURNS)]
    assert max(lengths) >= SHORT_PREFILL > min(lengths)  # both prefill paths are exercised
    for turn in range(1, len(TURNS) + 1):
        segs = segments(char_lm, TURNS[:turn])
        expected, none = read(nocache, segs)
        rows, cached = read(cache, segs)
        assert none == 0
        # every message before the newest was read by the previous turn and is cached now
        assert cached == sum(len(s) for s in segs[: turn - 1])
        assert np.array_equal(rows, expected)  # bit for bit
        assert seeded_text(char_lm, engine, rows) == seeded_text(char_lm, engine, expected)
    # and the cached path equals reading the same tokens in one call to float rounding
    whole = engine.prefill([t for s in segs for t in s], engine.start())
    assert np.abs(engine.log_probs(rows) - engine.log_probs(whole)).max() <= 1e-4


def test_extend_caches_the_reply_as_the_next_turn_sends_it(
    char_lm: LanguageModel, engine: Engine, store: MemorySessionStore | RedisSessionStore
) -> None:
    cache = PrefixCache(store, engine, char_lm.fingerprint)
    first = segments(char_lm, TURNS[:2])
    prefilled = cache.prefill(cache.lookup(first, len(first) - 1))
    reply = "Nay, answer me: stand, and unfold yourself."
    cache.extend(prefilled, char_lm.tokenizer.encode(PLAY_TEMPLATE.reply_as_message(reply)))
    nxt = segments(char_lm, TURNS[:4])
    rows, cached = read(cache, nxt)
    assert cached == sum(len(s) for s in nxt[:3])  # system, user, and the reply
    expected, _ = read(PrefixCache(store, engine, char_lm.fingerprint, enabled=False), nxt)
    assert np.array_equal(rows, expected)


def test_digests_hash_the_tokens_from_the_start() -> None:
    segs = [[5, 6, 7], [], [8], [9, 10]]
    assert boundary_digests(segs) == [
        digest([5, 6, 7]),
        digest([5, 6, 7]),
        digest([5, 6, 7, 8]),
        digest(list(range(5, 11))),
    ]
    assert digest([1, 2]) != digest([2, 1]) and digest([256]) != digest([1, 0])  # int32 bytes, in order


def test_redis_entries_expire_and_live_apart_from_sessions(
    char_lm: LanguageModel, engine: Engine, redis_server: RedisServer
) -> None:
    redis_server.client().flushall()
    store = RedisSessionStore(redis_server.url, store_namespace(char_lm.fingerprint), 600)
    read(PrefixCache(store, engine, char_lm.fingerprint), segments(char_lm, TURNS))
    client = redis_server.client()
    keys = list(client.scan_iter(match="*"))
    assert len(keys) == len(TURNS)  # one entry per message boundary, nothing else
    assert all(k.decode().startswith(f"lstm-lm:{store_namespace(char_lm.fingerprint)}:prefix:") for k in keys)
    assert all(0 < client.ttl(k) <= 600 for k in keys)  # every key expires
    assert store.count() == 0  # not sessions


def test_corrupt_or_mismatched_entries_are_skipped(char_lm: LanguageModel, engine: Engine) -> None:
    store = MemorySessionStore(3600, 1 << 24)
    cache = PrefixCache(store, engine, char_lm.fingerprint)
    segs = segments(char_lm, TURNS)
    read(cache, segs)
    digests = boundary_digests(segs[:-1])
    store.put_prefixes({digests[-1]: b"LSTM garbage"})  # the longest boundary is unreadable
    rows, cached = read(cache, segs)
    assert cached == sum(len(s) for s in segs[:-2])  # the one before it is used
    expected, _ = read(PrefixCache(store, engine, char_lm.fingerprint, enabled=False), segs)
    assert np.array_equal(rows, expected)


class FailingStore(MemorySessionStore):
    def __init__(self) -> None:
        super().__init__(3600, 1 << 20)
        self.calls = 0

    def get_prefixes(self, digests: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        raise StoreUnavailable("Redis is unavailable: connection refused")

    def put_prefixes(self, blobs: Mapping[str, bytes], touch: Sequence[str] = ()) -> None:
        self.calls += 1
        raise StoreUnavailable("Redis is unavailable: connection refused")


def test_a_failing_store_means_reading_everything_then_a_pause(char_lm: LanguageModel, engine: Engine) -> None:
    now = [1000.0]
    store = FailingStore()
    cache = PrefixCache(store, engine, char_lm.fingerprint, clock=lambda: now[0])
    segs = segments(char_lm, TURNS)
    rows, cached = read(cache, segs)
    expected, _ = read(PrefixCache(store, engine, char_lm.fingerprint, enabled=False), segs)
    assert cached == 0 and np.array_equal(rows, expected)
    assert store.calls == 1  # the lookup failed: the cache rests, nothing is written
    read(cache, segs)
    assert store.calls == 1
    now[0] += 60
    read(cache, segs)
    assert store.calls == 2  # tried again after the pause


def test_memory_entries_expire_and_never_evict_sessions(char_lm: LanguageModel, engine: Engine) -> None:
    now = [0.0]
    store = MemorySessionStore(100, 64 * 1024, clock=lambda: now[0])
    assert store.create("s" * 20, b"x" * 1000)
    cache = PrefixCache(store, engine, char_lm.fingerprint)
    for i in range(40):  # far more entries than a quarter of the budget holds
        read(cache, segments(char_lm, [Message("user", f"message {i}"), Message("user", "again")]))
    assert store.get("s" * 20) is not None
    segs = segments(char_lm, [Message("user", "message 39"), Message("user", "again")])
    assert read(cache, segs)[1] > 0
    now[0] += 101
    assert read(cache, segs)[1] == 0  # expired


class CountingStore(MemorySessionStore):
    def __init__(self) -> None:
        super().__init__(3600, 1 << 26)
        self.lookups: list[int] = []

    def get_prefixes(self, digests: Sequence[str]) -> list[bytes | None]:
        self.lookups.append(len(digests))
        return super().get_prefixes(digests)


def test_one_lookup_of_the_most_recent_boundaries(char_lm: LanguageModel, engine: Engine) -> None:
    store = CountingStore()
    cache = PrefixCache(store, engine, char_lm.fingerprint)
    segs = segments(char_lm, [Message("user", f"{i}") for i in range(MAX_BOUNDARIES + 10)])
    read(cache, segs)
    assert len(store._prefixes._items) == MAX_BOUNDARIES  # only the most recent are stored
    assert read(cache, segs)[1] == sum(len(s) for s in segs[:-1])
    assert store.lookups == [MAX_BOUNDARIES, MAX_BOUNDARIES]  # one round trip per request
