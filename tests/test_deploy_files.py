"""Docker has no engine here, so the deploy files are kept correct by construction: they must run
the very command the gunicorn tests run (the Procfile's), with the settings the service reads."""

from __future__ import annotations

import re
import tomllib

import yaml

from service.settings import ENV_VARS

from servers import ROOT

PROCFILE_COMMAND = "gunicorn -c service/gunicorn.conf.py 'service:create_app()'"


def test_procfile_serves_on_port() -> None:
    line = (ROOT / "Procfile").read_text().strip()
    assert line == f"web: {PROCFILE_COMMAND}"
    conf = (ROOT / "service" / "gunicorn.conf.py").read_text()
    assert (
        'bind = f"0.0.0.0:{_settings.port}"' in conf
        and '"PORT": "port"' in (ROOT / "service" / "settings.py").read_text()
    )


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text  # CPU build, pinned
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must not run as root"
    assert "HEALTHCHECK" in text and "/health" in text
    assert PROCFILE_COMMAND in text
    ignored = (ROOT / ".dockerignore").read_text()
    assert "model/checkpoints/*/resume" in ignored and ".venv" in ignored


def test_compose() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis, app = doc["services"]["redis"], doc["services"]["app"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    command = " ".join(redis["command"])
    assert "--maxmemory " in command and "--maxmemory-policy volatile-lru" in command
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-data" in doc["volumes"]
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["environment"]["REDIS_URL"].startswith("redis://redis:6379")
    assert int(app["environment"]["WEB_CONCURRENCY"]) > 1  # fine: Redis is set
    assert set(app["environment"]) <= set(ENV_VARS), "compose sets a variable the service does not read"
    assert "/ready" in " ".join(app["healthcheck"]["test"])


def test_torch_pinned_exactly() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
