"""Shared fixtures: tiny *real* models trained in a few seconds on a slice of the corpus."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient

from model import LanguageModel, load
from model.train import TrainConfig, train
from service import Settings, create_app
from service.sessions import RedisSessionStore

from servers import REDIS_MISSING, RedisServer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
SHIPPED = {name: ROOT / "model" / "checkpoints" / name for name in ("shakespeare-char", "shakespeare-sp")}


def pytest_sessionstart(session: pytest.Session) -> None:
    if shutil.which("redis-server") is None:
        pytest.exit(REDIS_MISSING, returncode=4)


TINY = dict(
    embed_dim=16,
    hidden_size=32,
    num_layers=2,
    batch_size=8,
    bptt=32,
    max_steps=40,
    eval_interval=20,
    checkpoint_interval=10,
    warmup_steps=5,
    threads=1,
)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def train_tiny(corpus: Path, out: Path, **overrides: object) -> Path:
    cfg = TrainConfig(data=[str(corpus)], out_dir=str(out), **{**TINY, **overrides})  # type: ignore[arg-type]
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def char_lm_dir(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("char-lm"))


@pytest.fixture(scope="session")
def sp_lm_dir(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(
        tiny_corpus, tmp_path_factory.mktemp("sp-lm"), tokenizer="sentencepiece", sp_vocab_size=200, tie_weights=True
    )


@pytest.fixture(scope="session")
def char_lm(char_lm_dir: Path) -> LanguageModel:
    torch.set_num_threads(1)
    return load(char_lm_dir)


@pytest.fixture(scope="session")
def sp_lm(sp_lm_dir: Path) -> LanguageModel:
    return load(sp_lm_dir)


@pytest.fixture(params=["char", "sp"])
def any_lm(request: pytest.FixtureRequest) -> LanguageModel:
    return request.getfixturevalue("char_lm" if request.param == "char" else "sp_lm")


# ---- service fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


AppFactory = Callable[..., Flask]


@pytest.fixture()
def make_app(char_lm_dir: Path, redis_server: RedisServer) -> Iterator[AppFactory]:
    """Build apps on a tiny real model; `redis=True` uses the private Redis (flushed first)."""
    apps: list[Flask] = []

    def factory(model_dir: Path | None = None, redis: bool = False, **overrides: Any) -> Flask:
        settings = Settings(model_dir=model_dir or char_lm_dir, torch_threads=1, **overrides)
        store = None
        if redis:
            client = redis_server.client()
            client.flushall()
            lm_fp = load(settings.model_dir).fingerprint
            store = RedisSessionStore(redis_server.url, lm_fp, settings.session_ttl_seconds)
        app = create_app(settings, store=store)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["lm_service"].close()


@pytest.fixture()
def app(make_app: AppFactory) -> Flask:
    return make_app()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()
