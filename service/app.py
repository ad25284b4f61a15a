"""Building the Flask app: settings -> model -> session store -> the service, then each part of
the app registered by its own module's init_app."""

from __future__ import annotations

import logging

import torch
from flask import Flask
from threadpoolctl import threadpool_limits

from model import CheckpointError, LanguageModel, load
from model.engine import Engine

from . import api, card, errors, metrics, replica
from .inference import LMService
from .schemas import Limits
from .sessions import MemorySessionStore, RedisSessionStore, SessionStore
from .settings import Settings, SettingsError
from .state_codec import store_namespace

log = logging.getLogger(__name__)


def build_store(settings: Settings, fingerprint: str) -> SessionStore:
    if settings.redis_url:
        return RedisSessionStore(settings.redis_url, store_namespace(fingerprint), settings.session_ttl_seconds)
    return MemorySessionStore(settings.session_ttl_seconds, settings.memory_store_max_bytes)


def load_model(settings: Settings) -> LanguageModel:
    try:
        lm = load(settings.model_dir)
    except CheckpointError as exc:
        raise SettingsError(f"MODEL_DIR={settings.model_dir}: {exc}") from exc
    if settings.quantize == "int8":
        from model.quantize import quantize_int8

        lm = quantize_int8(lm)
    return lm


def create_app(settings: Settings | None = None, *, store: SessionStore | None = None) -> Flask:
    """Build the app: load the checkpoint, connect the session store, register the parts."""
    settings = settings or Settings.from_env()
    if store is None:
        settings.check_store()  # before the (slow) model load: fail fast
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(settings.effective_torch_threads())
    threadpool_limits(settings.effective_blas_threads())
    lm = load_model(settings)
    service = LMService(
        lm,
        store or build_store(settings, lm.fingerprint),
        engine=Engine(lm.model),
        batching=settings.batching,
        max_batch=settings.max_batch,
        limits=Limits.from_settings(settings),
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["lm_service"] = service
    errors.init_app(app)
    metrics.init_app(app, multiprocess=bool(settings.metrics_dir))
    card.init_app(app, settings)
    replica.init_app(app, settings)
    api.init_app(app)
    log.info(
        "serving %s (%s) with a %s store, %d torch / %d BLAS threads, batching %s",
        lm.name,
        lm.fingerprint,
        service.store.kind,
        settings.effective_torch_threads(),
        settings.effective_blas_threads(),
        "on" if settings.batching else "off",
    )
    return app
