"""The model card the service answers /info with: what is served, how big, how good, under which limits."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Flask

from .inference import LMService
from .settings import Settings


def describe(service: LMService, settings: Settings) -> dict[str, Any]:
    lm = service.lm
    validation = lm.meta.get("metrics", {}).get("validation", {})
    return {
        "model": {
            "name": lm.name,
            "fingerprint": lm.fingerprint,
            "tokenizer": lm.tokenizer.kind,
            "vocab_size": lm.tokenizer.vocab_size,
            "layers": lm.config.num_layers,
            "hidden_size": lm.config.hidden_size,
            "embed_dim": lm.config.embed_dim,
            "tie_weights": lm.config.tie_weights,
            "parameters": lm.model.num_parameters(),
            "state_bytes": 4 * service.engine.state_size,
            "validation_bits_per_char": validation.get("bits_per_char"),
            "validation_nats_per_char": validation.get("nats_per_char"),
        },
        "limits": asdict(service.limits),
        "store": service.store.kind,
        "batching": settings.batching,
        "quantize": settings.quantize,
    }


def init_app(app: Flask, settings: Settings) -> None:
    """Compute the card once; /info serves it."""
    service: LMService = app.extensions["lm_service"]
    app.config["MODEL_CARD"] = describe(service, settings)
