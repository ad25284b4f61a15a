"""Building the Flask app: settings -> model -> session store -> the service, then each part of
the app registered by its own module's init_app."""

from __future__ import annotations

import logging
from typing import Any

import torch
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider
from threadpoolctl import threadpool_limits

from model import CheckpointError, LanguageModel, load, sampling
from model.engine import Engine

from . import access, api, card, errors, metrics, openai_api, replica, ui
from .admission import Admission
from .inference import LMService
from .redis_client import connect
from .schemas import Limits
from .sessions import MemorySessionStore, RedisSessionStore, SessionStore
from .settings import Settings, SettingsError
from .state_codec import store_namespace

log = logging.getLogger(__name__)


class StrictJSON(DefaultJSONProvider):
    """Bodies keep the schemas' field order and are strict JSON: a NaN or an infinity is a bug to
    fix where it is computed, never a token a client's parser chokes on."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class ServiceFlask(Flask):
    """Flask, answering an OPTIONS request (a preflight, or a client asking what a route allows)
    with 204 and `Allow`: no HTML page, and no body that is not the one JSON shape."""

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.status_code = 204
        response.set_data(b"")
        del response.headers["Content-Type"]
        return response


def build_store(settings: Settings, fingerprint: str) -> SessionStore:
    if settings.redis_url:
        client = connect(settings.redis_url, settings.redis_tls())
        return RedisSessionStore(
            client,
            store_namespace(fingerprint),
            settings.session_ttl_seconds,
            wait_replicas=settings.redis_wait_replicas,
        )
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
    sampling.warm_up()  # the compiled sampler, before the first request rather than during it
    service = LMService(
        lm,
        store or build_store(settings, lm.fingerprint),
        engine=Engine(lm.model),
        batching=settings.batching,
        max_batch=settings.max_batch,
        flush_interval=settings.stream_flush_ms / 1000,
        limits=Limits.from_settings(settings),
        admission=Admission(settings.admission_tokens, settings.admission_queue, settings.admission_wait_seconds),
        generation_timeout=settings.generation_timeout_seconds,
    )
    app = ServiceFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = StrictJSON(app)
    app.extensions["lm_service"] = service
    errors.init_app(app)
    access.init_app(app, settings)
    metrics.init_app(app, multiprocess=bool(settings.metrics_dir))
    card.init_app(app, settings)
    replica.init_app(app, settings)
    api.init_app(app)
    openai_api.init_app(app, settings)  # /v1: the OpenAI-compatible routes and their prefix cache
    ui.init_app(app)  # the playground and /docs (adds /docs to the document api.init_app built)
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
