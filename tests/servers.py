"""Real servers for integration tests: a private redis-server, the Procfile's gunicorn command, and
scripts/stack.sh (nginx in front of gunicorn replicas)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
REDIS_MISSING = (
    "redis-server was not found on PATH; the integration tests start their own private Redis. "
    "Install it with `sudo apt-get install redis-server` (Debian/Ubuntu), `brew install redis` (macOS) "
    "or see https://redis.io/docs/latest/operate/oss_and_stack/install/"
)

NGINX_MISSING = (
    "nginx was not found on PATH; the stack tests run scripts/stack.sh, which puts nginx in front of the "
    "replicas. Install it with `sudo apt-get install nginx` (Debian/Ubuntu) or `brew install nginx` (macOS)"
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


# What most gunicorn tests run: two workers (so sessions must live in Redis), one torch thread
# each (two workers share the 2 cores), warnings only in the log.
TEST_ENV = {"WEB_CONCURRENCY": "2", "TORCH_THREADS": "1", "LOG_LEVEL": "WARNING"}


@contextlib.contextmanager
def serving(model_dir: Path, log_dir: Path, redis_url: str = "", **env: str) -> Iterator[Gunicorn]:
    """The Procfile's gunicorn on `model_dir` with TEST_ENV and `env` over it, stopped on exit;
    `redis_url` "" keeps sessions in the embedded store (one worker only)."""
    g = Gunicorn({"MODEL_DIR": str(model_dir), "REDIS_URL": redis_url, **TEST_ENV, **env}, log_dir / "gunicorn.log")
    try:
        yield g
    finally:
        g.stop()


class Stack:
    """scripts/stack.sh for real: a private Redis, `replicas` Procfile gunicorns, nginx in front."""

    def __init__(self, env: dict[str, str], log: Path, replicas: int = 2):
        if shutil.which("nginx") is None:
            raise RuntimeError(NGINX_MISSING)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "PORT": str(self.port), "REPLICAS": str(replicas)}
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "stack.sh")],
            cwd=ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: pids() finds everything it started
        )
        try:
            wait_until(lambda: self.proc.poll() is not None or "listening on" in self.output(), 180, "stack.sh")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"stack.sh did not start; output:\n{self.output()[-3000:]}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"stack.sh exited {self.proc.returncode}; output:\n{self.output()[-3000:]}")
        found = re.search(r"runtime files and logs in (\S+);", self.output())
        assert found, self.output()
        self.runtime = Path(found.group(1))
        # each replica's own address, to reach one past nginx: {"replica-1": "http://127.0.0.1:PORT"}
        self.replicas = {name: f"http://{addr}" for name, addr in re.findall(r"(replica-\d+)=(\S+)", self.output())}
        found = re.search(r"redis=(\S+)", self.output())
        assert found, self.output()
        self.redis_url = f"redis://{found.group(1)}/0"  # the stack's private Redis

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> set[int]:
        """Every live process in stack.sh's session but stack.sh: what it started, their children."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines()]
        mine = {int(pid) for pid, sid, stat in rows if int(sid) == self.proc.pid and "Z" not in stat}
        return mine - {self.proc.pid}

    def named_pids(self) -> dict[str, int]:
        """stack.sh's own record: redis, replica-N, nginx -> pid."""
        lines = (self.runtime / "stack.pids").read_text().split("\n")
        return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}

    def replica_port(self, name: str) -> int:
        """The loopback port replica `name` listens on (it keeps it across restarts)."""
        return int(self.replicas[name].rsplit(":", 1)[1])

    def replica_pids(self, name: str) -> list[int]:
        """Replica `name`'s processes as they are now: its gunicorn master, then its workers."""
        master = self.named_pids()[name]
        out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
        return [master, *(int(p) for p in out.split())]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal stack.sh and wait for it to exit (its whole group is killed if it hangs): its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self._log_file.closed:
            self._log_file.close()
        return int(self.proc.returncode)

    def kill_leftovers(self) -> None:
        """After stop(): kill whatever stack.sh failed to stop, so one failing test leaks nothing."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
