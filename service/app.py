"""Building the Flask app: load the checkpoint, connect the store, register routes and hooks."""

from __future__ import annotations

import logging
import os
import time

import torch
from flask import Flask, Response, g, request
from threadpoolctl import threadpool_limits

from model import CheckpointError, load
from model.engine import Engine
from model.lstm import state_size

from . import metrics
from .api import api, openapi_for
from .errors import error_body, register_error_handlers
from .inference import LMService
from .schemas import InfoResponse, Limits
from .sessions import MemorySessionStore, RedisSessionStore, SessionStore, StoreUnavailable
from .settings import Settings, SettingsError
from .state_codec import store_namespace

log = logging.getLogger(__name__)


def build_store(settings: Settings, fingerprint: str) -> SessionStore:
    if settings.redis_url:
        return RedisSessionStore(settings.redis_url, store_namespace(fingerprint), settings.session_ttl_seconds)
    return MemorySessionStore(settings.session_ttl_seconds, settings.memory_store_max_bytes)


def _limits(settings: Settings) -> Limits:
    return Limits(
        max_prompt_chars=settings.max_prompt_chars,
        max_tokens=settings.max_tokens_limit,
        max_top_n=settings.max_top_n,
        max_stop_sequences=settings.max_stop_sequences,
        max_stop_chars=settings.max_stop_chars,
        max_logprobs=settings.max_logprobs,
        max_detokenize_ids=settings.max_detokenize_ids,
    )


def create_app(settings: Settings | None = None, *, store: SessionStore | None = None) -> Flask:
    """Build the app: load the checkpoint, connect the session store, register the routes."""
    settings = settings or Settings.from_env()
    if store is None:
        settings.check_store()  # before the (slow) model load: fail fast
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = settings.effective_torch_threads()
    torch.set_num_threads(threads)
    threadpool_limits(settings.blas_threads)  # see Settings.blas_threads
    try:
        lm = load(settings.model_dir)
    except CheckpointError as exc:
        raise SettingsError(f"MODEL_DIR={settings.model_dir}: {exc}") from exc
    if settings.quantize == "int8":
        from model.quantize import quantize_int8

        lm = quantize_int8(lm)
    engine = Engine(lm.model)
    store = store or build_store(settings, lm.fingerprint)
    limits = _limits(settings)
    lm_service = LMService(lm, store, engine=engine, batching=settings.batching, max_batch=settings.max_batch)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    validation = lm.meta.get("metrics", {}).get("validation", {})
    app.extensions.update(
        lm_service=lm_service,
        lm_limits=limits,
        lm_settings=settings,
        lm_metrics_multiprocess=bool(settings.metrics_dir),
        lm_openapi=openapi_for(limits, lm.name),
        lm_info=InfoResponse(
            model={
                "name": lm.name,
                "fingerprint": lm.fingerprint,
                "tokenizer": lm.tokenizer.kind,
                "vocab_size": lm.tokenizer.vocab_size,
                "layers": lm.config.num_layers,
                "hidden_size": lm.config.hidden_size,
                "embed_dim": lm.config.embed_dim,
                "tie_weights": lm.config.tie_weights,
                "parameters": lm.model.num_parameters(),
                "state_bytes": 4 * state_size(lm.config),
                "validation_bits_per_char": validation.get("bits_per_char"),
                "validation_nats_per_char": validation.get("nats_per_char"),
            },
            limits=vars(limits),
            store=store.kind,
            batching=settings.batching,
            quantize=settings.quantize,
        ),
    )
    register_error_handlers(app)

    @app.errorhandler(StoreUnavailable)
    def _store_down(exc: StoreUnavailable) -> tuple[Response, int]:
        metrics.STORE_ERRORS.labels("unavailable").inc()
        log.warning("session store unavailable: %s", exc)
        return error_body(503, "store_unavailable", f"the session store is unavailable, retry later ({exc})")

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
        if "started" in g:
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        response.headers["X-Worker-Pid"] = str(os.getpid())  # which worker answered: handy behind a balancer
        return response

    app.register_blueprint(api.blueprint)
    log.info(
        "serving %s (%s) with a %s store, %d torch threads, batching %s",
        lm.name,
        lm.fingerprint,
        store.kind,
        threads,
        "on" if settings.batching else "off",
    )
    return app
