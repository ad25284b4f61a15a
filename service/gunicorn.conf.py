"""gunicorn settings, derived from the same Settings the app reads (PORT, WEB_CONCURRENCY, ...).

    gunicorn -c service/gunicorn.conf.py 'service:create_app()'

- gthread workers: a streamed /generate holds its thread for the whole response, and the
  threads of one worker share that worker's batching scheduler;
- no preload: each worker loads the model itself after the fork (torch and forks don't mix);
- torch/BLAS threads per worker = cores / workers (create_app), so workers don't oversubscribe;
- several workers need Redis for sessions: without REDIS_URL this refuses to start;
- slow clients: a request's headers and body must arrive within deadlines and a client must keep
  taking its response (service/gunicorn_worker.py), gunicorn's own errors answer JSON, and access
  logs never hold a whole session id (service/gunicorn_logger.py). A worker still gives each
  connection a thread while its request arrives: in production run behind a buffering proxy
  (deploy/nginx.conf, scripts/stack.sh), which holds slow clients without a thread each.
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

from service.allocator import tune_malloc  # noqa: E402
from service.gunicorn_logger import RedactingLogger  # noqa: E402
from service.gunicorn_worker import ClientLimits, with_limits  # noqa: E402
from service.settings import Settings, SettingsError  # noqa: E402 - after the metrics directory is set

try:
    _settings = Settings.from_env()
    _settings.check_store()
except SettingsError as _exc:
    sys.stderr.write(f"lstm-lm service refuses to start: {_exc}\n")
    sys.exit(1)

if _settings.malloc_tuning:  # before the workers fork: they inherit it (service/allocator.py says why)
    sys.stderr.write(tune_malloc() + "\n")

bind = f"{_settings.bind_host}:{_settings.port}"
workers = _settings.workers
# gthread with deadlines on reading a request and on writing its response
worker_class = with_limits(
    ClientLimits(
        header_timeout=_settings.header_timeout_seconds,
        body_timeout=_settings.body_timeout_seconds,
        send_timeout=_settings.send_timeout_seconds,
        replica=_settings.replica(),
    )
)
threads = _settings.threads  # each request holds one while it runs, a stream for its whole length
timeout = 120  # heartbeat; long streams are fine under gthread
graceful_timeout = 30
keepalive = _settings.keepalive_seconds  # idle kept-alive connections wait in the poller, not a thread
# what a request line and its headers may be: nginx's large_client_header_buffers (8 KiB) agree
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
logger_class = RedactingLogger
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl): replicas
# and test servers on one host would take it from each other. Nothing here uses gunicornc.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()


def child_exit(server, worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
