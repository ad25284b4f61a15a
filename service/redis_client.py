"""One Redis client from one URL, whichever way Redis is deployed (all through redis-py):

    redis://[user:password@]host:port[/db]                       a single node
    rediss://...                                                 the same over TLS
    unix:///path/to/redis.sock[?db=0]                            a local socket
    redis+cluster://[user:password@]host:port[,host:port...]     Redis Cluster (any seed nodes)
    redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/db]
                                                                 Sentinel: the current master of MASTER_NAME
    rediss+cluster://..., rediss+sentinel://...                  either over TLS

TLS options (CA bundle, client certificate and key) come from Settings (REDIS_TLS_*), never
from the URL. Timeouts are short on purpose: a store that does not answer is a 503 now, not a
request thread stuck for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")

Client = redis.Redis | RedisCluster


@dataclass(frozen=True)
class TLS:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.ca_file:
            out["ssl_ca_certs"] = str(self.ca_file)
        if self.cert_file:
            out["ssl_certfile"] = str(self.cert_file)
        if self.key_file:
            out["ssl_keyfile"] = str(self.key_file)
        return out


def valid_url(url: str) -> bool:
    return url.startswith(SCHEMES + SENTINEL_SCHEMES)


def _nodes(netloc: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """'user:pw@h1:p1,h2:p2' -> [(h1, p1), (h2, p2)] and the credentials."""
    creds: dict[str, Any] = {}
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, password = auth.partition(":")
        if user:
            creds["username"] = unquote(user)
        if password:
            creds["password"] = unquote(password)
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, creds


def connect(url: str, tls: TLS | None = None, timeout: float = 2.0) -> Client:
    """A client for `url` (see the module docstring); raises ValueError for a malformed URL."""
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": min(timeout, 1.0)}
    scheme = url.split("://", 1)[0]
    secure = scheme.startswith("rediss")
    if secure:
        common.update((tls or TLS()).options())
    if secure and "+" in scheme:  # rediss:// makes from_url use TLS itself; the others are told
        common["ssl"] = True
    if scheme.endswith("+cluster"):
        nodes, creds = _nodes(urlsplit(url).netloc)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **creds, **common)
    if scheme.endswith("+sentinel"):
        parts = urlsplit(url)
        nodes, creds = _nodes(parts.netloc)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a Sentinel URL names the master: redis+sentinel://host:port,.../MASTER_NAME[/db]")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(nodes, sentinel_kwargs=common, **common)  # credentials are the data nodes'
        return sentinel.master_for(path[0], db=db, **creds)
    return redis.Redis.from_url(url, **common)
