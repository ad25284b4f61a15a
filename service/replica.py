"""Which instance answered: every response names its replica and worker (handy behind a balancer)."""

from __future__ import annotations

import os

from flask import Flask, Response

from .settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    replica = settings.replica()

    @app.after_request
    def _identify(response: Response) -> Response:
        response.headers["X-Replica"] = replica
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response
