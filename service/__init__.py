"""The HTTP microservice: `create_app()` builds a Flask app around one checkpoint.

    gunicorn -c service/gunicorn.conf.py 'service:create_app()'

Configuration flows one way: environment -> Settings.from_env() -> constructor arguments.
The model is loaded inside create_app (once per worker, after the fork), never at import time.
Importing this package is cheap on purpose: gunicorn's master reads service.settings without
pulling in torch or prometheus_client (whose multiprocess mode must be configured first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from flask import Flask

    from .sessions import SessionStore

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None, *, store: SessionStore | None = None) -> Flask:
    """Build the app (see service.app.create_app)."""
    from .app import create_app as build

    return build(settings, store=store)
