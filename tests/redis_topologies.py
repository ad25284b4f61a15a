"""Redis beyond one node, for real, on loopback: a 3-master Redis Cluster (made with
`redis-cli --cluster create`) and a Sentinel deployment (a master, a replica, three sentinels)."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import redis

from servers import REDIS_MISSING, free_port, wait_until


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: both below 65536."""
    for _ in range(100):
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class _Node:
    def __init__(self, workdir: Path, *args: str, conf: Path | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        self.port = _cluster_port() if "--cluster-enabled" in args else free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        first = [str(conf)] if conf else []  # a sentinel rewrites its config file: it goes first
        port = [] if "{port}" in args else ["--port", str(self.port)]  # a TLS node: its TLS port only
        rest = [a.replace("{port}", str(self.port)) for a in args]
        self.args = [binary, *first, *port, "--bind", "127.0.0.1", "--dir", str(workdir), *rest]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.client().ping, 10, f"redis on {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                # a graceful shutdown can stall (an AOF rewrite, a busy disk): a test's teardown
                # must not fail for it, the node only has to be gone
                self.kill()


class Cluster:
    """Three masters, no replicas: every slot covered, keys spread over three processes."""

    def __init__(self, workdir: Path, masters: int = 3):
        self.nodes = [
            _Node(
                workdir / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
            )
            for i in range(masters)
        ]
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(lambda: self.nodes[0].client().cluster("info")["cluster_state"] == "ok", 30, "the cluster")
        self.url = "redis+cluster://" + ",".join(addresses)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Sentinels:
    """A master, one replica, three sentinels watching them (quorum 2), failing over quickly."""

    NAME = "lstm"

    def __init__(self, workdir: Path):
        persist = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")
        self.master = _Node(workdir / "master", *persist)
        self.replica = _Node(workdir / "replica", *persist, "--replicaof", "127.0.0.1", str(self.master.port))
        wait_until(
            lambda: self.master.client().info("replication").get("slave0", {}).get("state") == "online",
            20,
            "the replica to be in sync",
        )
        self.sentinels = []
        for i in range(3):
            conf = workdir / f"sentinel{i}.conf"
            conf.write_text(
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                f"sentinel failover-timeout {self.NAME} 5000\n"
                f"sentinel parallel-syncs {self.NAME} 1\n"
            )
            self.sentinels.append(_Node(workdir / f"s{i}", "--sentinel", conf=conf))
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.NAME}/0"

    def current_master_port(self) -> int:
        host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.NAME)
        return int(port)

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=lstm-lm test CA")  # fmt: skip
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "ext")  # fmt: skip
    return {n: directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


class TLSNode(_Node):
    """A redis-server speaking only TLS, requiring client certificates signed by the same CA."""

    def __init__(self, workdir: Path, certs: dict[str, Path]):
        self.certs = certs
        super().__init__(
            workdir,
            "--port", "0", "--tls-port", "{port}",
            "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
            "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no",
        )  # fmt: skip

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",  # the certificate's name
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.certs["ca.crt"]),
            ssl_certfile=str(self.certs["client.crt"]),
            ssl_keyfile=str(self.certs["client.key"]),
            socket_timeout=2,
        )
