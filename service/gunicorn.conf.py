"""gunicorn settings, derived from the same Settings the app reads (PORT, WEB_CONCURRENCY, ...).

    gunicorn -c service/gunicorn.conf.py 'service:create_app()'

- gthread workers: a streamed /generate holds its thread for the whole response, and the
  threads of one worker share that worker's batching scheduler;
- no preload: each worker loads the model itself after the fork (torch and forks don't mix);
- torch/BLAS threads per worker = cores / workers (create_app), so workers don't oversubscribe;
- several workers need Redis for sessions: without REDIS_URL this refuses to start.
"""

import os
import sys
import tempfile

# prometheus_client multiprocess mode: every worker writes its samples to one directory, which
# must be empty at start and set before prometheus_client is first imported (in the workers).
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="lstm-lm-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
os.makedirs(_metrics_dir, exist_ok=True)
for _name in os.listdir(_metrics_dir):
    if _name.endswith(".db"):
        os.unlink(os.path.join(_metrics_dir, _name))

from service.settings import Settings, SettingsError  # noqa: E402 - after the metrics directory is set

try:
    _settings = Settings.from_env()
    _settings.check_store()
except SettingsError as _exc:
    sys.stderr.write(f"lstm-lm service refuses to start: {_exc}\n")
    sys.exit(1)

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.workers
worker_class = "gthread"
threads = _settings.threads
timeout = 120  # heartbeat; long streams are fine under gthread
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()


def child_exit(server, worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
