"""Docker has no engine here, so the deploy files are kept correct by construction: they must run
the very command the gunicorn tests run (the Procfile's), with the settings the service reads."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from service.settings import ENV_VARS, Settings

from servers import ROOT

PROCFILE_COMMAND = "gunicorn -c service/gunicorn.conf.py 'service:create_app()'"


def test_procfile_serves_on_port() -> None:
    line = (ROOT / "Procfile").read_text().strip()
    assert line == f"web: {PROCFILE_COMMAND}"
    conf = (ROOT / "service" / "gunicorn.conf.py").read_text()
    assert 'bind = f"{_settings.bind_host}:{_settings.port}"' in conf
    assert ENV_VARS["PORT"] == "port" and ENV_VARS["BIND_HOST"] == "bind_host"
    assert Settings.from_env({}).bind_host == "0.0.0.0"  # the Procfile and the image listen on every address


def test_stack_runs_the_procfile_command() -> None:
    # scripts/stack.sh takes each replica's command from the Procfile itself, and only sets
    # variables the service reads (plus gunicorn's own PROMETHEUS_MULTIPROC_DIR, also a setting)
    script = (ROOT / "scripts" / "stack.sh").read_text()
    assert "sed -n 's/^web:[[:space:]]*//p' Procfile" in script and 'bash -c "exec $WEB"' in script
    start = script[script.index("start_replica() {") :]
    start = start[: start.index("\n}\n")]
    assigned = set(re.findall(r"\b([A-Z_]+)=", start))
    assert assigned and assigned <= set(ENV_VARS), assigned - set(ENV_VARS)


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
    redis, app, nginx = doc["services"]["redis"], doc["services"]["app"], doc["services"]["nginx"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    command = " ".join(redis["command"])
    assert "--maxmemory " in command and "--maxmemory-policy volatile-lru" in command
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-data" in doc["volumes"]
    # the app: the image's CMD (the Procfile's command), several replicas, only nginx in front
    assert "command" not in app and "ports" not in app
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    env = app["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert app["deploy"]["replicas"] >= 2 and int(env["WEB_CONCURRENCY"]) >= 1  # fine: Redis is set
    assert set(env) <= set(ENV_VARS), "compose sets a variable the service does not read"
    assert "/ready" in " ".join(app["healthcheck"]["test"])
    # nginx: deploy/nginx.conf with the compose upstream files, published, once the app is healthy
    assert nginx["image"].startswith("nginx:")
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"
    assert "8080:8080" in nginx["ports"]
    mounts = {target: ROOT / source for source, target, *_ in (v.split(":") for v in nginx["volumes"])}
    conf_path = nginx["command"][nginx["command"].index("-c") + 1]
    assert mounts[conf_path] == ROOT / "deploy" / "nginx.conf"
    conf = mounts[conf_path].read_text()
    for included in re.findall(r"^\s*include (\S+);", conf, re.M):
        upstream = mounts[f"{conf_path.rsplit('/', 1)[0]}/{included}"].read_text()
        assert re.search(rf"^server app:{env['PORT']}\b", upstream, re.M), included


def test_nginx_agrees_with_the_service() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    settings = Settings.from_env({})  # the defaults
    size, unit = re.search(r"client_max_body_size (\d+)([km]?);", conf).groups()  # type: ignore[union-attr]
    assert int(size) * {"": 1, "k": 1024, "m": 1 << 20}[unit] == settings.max_body_bytes
    # nginx closes idle upstream connections before gunicorn would (a POST on a connection
    # gunicorn just closed fails and is not retried)
    upstreams = re.findall(r"^\s*upstream \w+ \{(.*?)\}", conf, re.M | re.S)
    upstream_idle = {int(t) for block in upstreams for t in re.findall(r"keepalive_timeout (\d+)s;", block)}
    assert upstream_idle and max(upstream_idle) < settings.keepalive_seconds
    assert re.search(r"^\s*listen 8080;", conf, re.M)  # scripts/stack.sh renders $PORT there
    # nginx's own errors: the app's JSON shape, with the app's codes where the app has them
    pages = re.findall(r"return (\d{3}) '(.*)';", conf)
    assert {int(status) for status, _ in pages} >= {400, 404, 408, 413, 414, 431, 500, 502, 503, 504}
    for _, page in pages:
        error = json.loads(page.replace("\\n", ""))["error"]
        assert set(error) == {"code", "message", "details"} and error["code"] and error["message"]
    assert f"larger than the {settings.max_body_bytes} bytes allowed" in conf


def test_torch_pinned_exactly() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
