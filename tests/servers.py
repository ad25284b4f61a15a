"""Real servers for integration tests: a private redis-server and the Procfile's gunicorn command."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
REDIS_MISSING = (
    "redis-server was not found on PATH; the integration tests start their own private Redis. "
    "Install it with `sudo apt-get install redis-server` (Debian/Ubuntu), `brew install redis` (macOS) "
    "or see https://redis.io/docs/latest/operate/oss_and_stack/install/"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on a free port; never the user's own instance."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "volatile-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class Gunicorn:
    """The Procfile's web command, run for real with the given environment."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        procfile = (ROOT / "Procfile").read_text().strip()
        command = procfile.split(":", 1)[1].strip().replace("$PORT", str(self.port))
        full_env = {**os.environ, **env, "PORT": str(self.port)}
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            shlex.split(command),
            cwd=ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: requests.get(f"{self.base}/ready", timeout=2).status_code == 200, 90, "gunicorn /ready")
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"gunicorn did not become ready; log:\n{log.read_text(errors='replace')[-3000:]}"
            ) from None

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()
