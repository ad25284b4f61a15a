"""The official `openai` SDK against the Procfile's gunicorn (two workers, a private Redis):
what an OpenAI client sees, its own exceptions, and the prefix cache over a 10-turn chat."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from model import load
from model.chat import PLAY_TEMPLATE, Message

from servers import Gunicorn, RedisServer


def start(env: dict[str, str], log: Path) -> Gunicorn:
    return Gunicorn({"TORCH_THREADS": "1", "GUNICORN_THREADS": "8", "LOG_LEVEL": "WARNING", **env}, log)


@pytest.fixture(scope="module")
def server(
    char_lm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    redis_server.client().flushall()
    env = {"MODEL_DIR": str(char_lm_dir), "REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "2"}
    g = start(env, tmp_path_factory.mktemp("gunicorn-openai") / "gunicorn.log")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def client(server: Gunicorn) -> openai.OpenAI:
    # no retries: a 5xx or a 429 must show up as the error it is
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(char_lm_dir: Path) -> str:
    return char_lm_dir.name


HAMLET: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Who's there?"}]


def test_models(client: openai.OpenAI, name: str) -> None:
    assert [m.id for m in client.models.list()] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion(client: openai.OpenAI, name: str) -> None:
    done = client.completions.create(model=name, prompt="ROMEO:\n", max_tokens=20, seed=1, logprobs=2)
    choice = done.choices[0]
    assert done.object == "text_completion" and choice.finish_reason == "length"
    assert done.usage is not None and done.usage.prompt_tokens == len("ROMEO:\n")
    assert done.usage.completion_tokens == 20 and done.usage.total_tokens == 27
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 20
    assert lp.text_offset is not None and lp.text_offset[0] == len("ROMEO:\n")
    assert all(len(top) == 2 for top in lp.top_logprobs)
    again = client.completions.create(model=name, prompt="ROMEO:\n", max_tokens=20, seed=1)
    assert again.choices[0].text == choice.text  # the seed reproduces
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == len("ROMEO:\n")  # the same prompt, cached


def test_completion_stop_string_and_list(client: openai.OpenAI, name: str) -> None:
    one = client.completions.create(model=name, prompt="ROMEO:\n", max_tokens=100, seed=2, stop=" ")
    assert one.choices[0].finish_reason == "stop" and " " not in one.choices[0].text
    many = client.completions.create(model=name, prompt="ROMEO:\n", max_tokens=100, seed=2, stop=["e", " ", "\n"])
    text = many.choices[0].text
    assert many.choices[0].finish_reason == "stop" and not {"e", " ", "\n"} & set(text)


def test_chat(client: openai.OpenAI, name: str) -> None:
    done = client.chat.completions.create(model=name, messages=HAMLET, max_tokens=50, seed=3, user="horatio")
    choice = done.choices[0]
    assert done.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and "\n\n" not in (choice.message.content or "")
    assert done.usage is not None and done.usage.prompt_tokens == len("HORATIO:\nWho's there?\n\nHAMLET:\n")
    streamed = client.chat.completions.create(
        model=name, messages=HAMLET, max_tokens=50, seed=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_chat_n_seed_and_logprobs(client: openai.OpenAI, name: str) -> None:
    kwargs = dict(model=name, messages=HAMLET, max_tokens=30, n=2, seed=8, logprobs=True, top_logprobs=2)
    done = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in done.choices] == [0, 1]
    for c in done.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    again = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.message.content for c in again.choices] == [c.message.content for c in done.choices]
    streamed = client.chat.completions.create(**{**kwargs, "stream": True})  # type: ignore[call-overload]
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in done.choices]


def test_the_sdk_raises_its_own_exceptions(client: openai.OpenAI, name: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=HAMLET, temperature=5)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=HAMLET)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="not supported") as tools:
        client.chat.completions.create(
            model=name,
            messages=HAMLET,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.param == "tools"
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=name, messages=HAMLET, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model=name, prompt="x", echo=True)
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing-here", cast_to=object)


def test_ten_turns_cost_only_the_new_message(client: openai.OpenAI, name: str, char_lm_dir: Path) -> None:
    """Each turn re-sends the whole history; the cache holds every message of the previous turns
    (the replies too), so cached_tokens is exactly the rendered history before the new message."""
    tokenizer = load(char_lm_dir).tokenizer
    run = uuid.uuid4().hex[:8]  # a history no earlier test has cached
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": f"Scene {run}: the castle."}]
    rendered = [PLAY_TEMPLATE.render_message(Message("system", f"Scene {run}: the castle."))]
    cached = []
    for turn in range(10):
        line = f"Speak, turn {turn}: what news?"
        history.append({"role": "user", "content": line})
        done = client.chat.completions.create(model=name, messages=history, max_tokens=40, seed=turn)
        assert done.usage is not None and done.usage.prompt_tokens_details is not None
        cached.append(done.usage.prompt_tokens_details.cached_tokens)
        expected = sum(len(tokenizer.encode(text)) for text in rendered)
        assert cached[-1] == (0 if turn == 0 else expected), f"turn {turn}: {cached}"
        reply = done.choices[0].message.content or ""
        history.append({"role": "assistant", "content": reply})
        rendered += [
            PLAY_TEMPLATE.render_message(Message("user", line)),
            PLAY_TEMPLATE.render_message(Message("assistant", reply)),
        ]
    assert cached == sorted(cached) and cached[-1] > cached[1] > 0


def test_keys_and_rate_limits_reach_the_sdk_as_its_exceptions(
    char_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The app-wide key check (401) and rate limit (429) answer /v1 in OpenAI's shape too."""
    env = {"MODEL_DIR": str(char_lm_dir), "API_KEYS": "sesame", "RATE_LIMIT": "4/minute"}
    g = start(env, tmp_path_factory.mktemp("gunicorn-keys") / "gunicorn.log")
    try:
        stranger = openai.OpenAI(base_url=f"{g.base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            stranger.models.list()
        assert denied.value.type == "authentication_error"
        friend = openai.OpenAI(base_url=f"{g.base}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in friend.models.list()] == [char_lm_dir.name]
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(5):
                friend.models.list()
        assert limited.value.type == "rate_limit_error" and limited.value.response.headers.get("Retry-After")
    finally:
        g.stop()
