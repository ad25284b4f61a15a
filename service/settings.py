"""Typed settings, read from the environment in exactly one place (Settings.from_env).

Everything else receives a Settings object (or values from it) as constructor arguments.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.redis_client import TLS, valid_url

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare-char"

# environment variable -> field; the README's settings table is this list
ENV_VARS = {
    "MODEL_DIR": "model_dir",
    "REDIS_URL": "redis_url",
    "SESSION_TTL_SECONDS": "session_ttl_seconds",
    "MEMORY_STORE_MAX_BYTES": "memory_store_max_bytes",
    "MAX_BODY_BYTES": "max_body_bytes",
    "MAX_PROMPT_CHARS": "max_prompt_chars",
    "MAX_TOKENS_LIMIT": "max_tokens_limit",
    "MAX_TOP_N": "max_top_n",
    "MAX_STOP_SEQUENCES": "max_stop_sequences",
    "MAX_STOP_CHARS": "max_stop_chars",
    "MAX_LOGPROBS": "max_logprobs",
    "MAX_DETOKENIZE_IDS": "max_detokenize_ids",
    "TORCH_THREADS": "torch_threads",
    "BLAS_THREADS": "blas_threads",
    "QUANTIZE": "quantize",
    "BATCHING": "batching",
    "MAX_BATCH": "max_batch",
    "STREAM_FLUSH_MS": "stream_flush_ms",
    "MALLOC_TUNING": "malloc_tuning",
    "LOG_LEVEL": "log_level",
    "PORT": "port",
    "BIND_HOST": "bind_host",
    "WEB_CONCURRENCY": "workers",
    "GUNICORN_THREADS": "threads",
    "KEEPALIVE_SECONDS": "keepalive_seconds",
    "HEADER_TIMEOUT_SECONDS": "header_timeout_seconds",
    "BODY_TIMEOUT_SECONDS": "body_timeout_seconds",
    "SEND_TIMEOUT_SECONDS": "send_timeout_seconds",
    "PROMETHEUS_MULTIPROC_DIR": "metrics_dir",
    "REPLICA_NAME": "replica_name",
    "PREFIX_CACHE": "prefix_cache",
    "REDIS_WAIT_REPLICAS": "redis_wait_replicas",
    "REDIS_TLS_CA_FILE": "redis_tls_ca_file",
    "REDIS_TLS_CERT_FILE": "redis_tls_cert_file",
    "REDIS_TLS_KEY_FILE": "redis_tls_key_file",
    "API_KEYS": "api_keys",
    "API_KEYS_FILE": "api_keys_file",
    "RATE_LIMIT": "rate_limit",
    "CORS_ORIGINS": "cors_origins",
    "PROXY_HOPS": "proxy_hops",
    "ADMISSION_TOKENS": "admission_tokens",
    "ADMISSION_QUEUE": "admission_queue",
    "ADMISSION_WAIT_SECONDS": "admission_wait_seconds",
    "GENERATION_TIMEOUT_SECONDS": "generation_timeout_seconds",
}


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path = DEFAULT_MODEL_DIR
    redis_url: str | None = None  # None: the embedded in-process store (one worker only)
    session_ttl_seconds: int = Field(86_400, ge=1)
    memory_store_max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(2_097_152, ge=1024)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_tokens_limit: int = Field(2_048, ge=1)
    max_top_n: int = Field(1_000, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_chars: int = Field(64, ge=1)
    max_logprobs: int = Field(20, ge=0)
    max_detokenize_ids: int = Field(100_000, ge=1)
    torch_threads: int = Field(0, ge=0)  # 0: cores / workers
    blas_threads: int = Field(0, ge=0)  # numpy's OpenBLAS (the decode step); 0: cores / workers
    quantize: Literal["none", "int8"] = "none"
    batching: bool = True  # continuous batching of concurrent generations in a worker
    max_batch: int = Field(64, ge=1)
    # a stream's tokens gathered into one write after its first (service/scheduler.py says why)
    stream_flush_ms: float = Field(25.0, ge=0, le=1000)  # 10 -> 25: +10-20% for 32 streams, first token unchanged
    malloc_tuning: bool = True  # glibc arenas and mmap threshold for the workers (service/allocator.py)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    threads: int = Field(32, ge=1)
    bind_host: str = "0.0.0.0"  # scripts/stack.sh: 127.0.0.1, only nginx faces clients
    # gunicorn's own limits on slow clients (a proxy in front absorbs them better: deploy/nginx.conf)
    keepalive_seconds: int = Field(5, ge=0)  # an idle kept-alive connection is closed after this (gunicorn: whole s)
    header_timeout_seconds: float = Field(10.0, gt=0)  # request line and headers, from their first byte
    body_timeout_seconds: float = Field(30.0, gt=0)  # the whole body, once the headers are in
    send_timeout_seconds: float = Field(60.0, gt=0)  # a client that takes no response bytes this long is dropped
    metrics_dir: str | None = None  # prometheus_client's multiprocess directory (gunicorn.conf.py sets it)
    replica_name: str | None = None  # the X-Replica header; None: host name and port
    prefix_cache: bool = True  # /v1: cache states at prompt boundaries in the store (service/prefix_cache.py)
    redis_wait_replicas: int = Field(0, ge=0)  # a session write waits until this many replicas hold it (WAIT)
    redis_tls_ca_file: Path | None = None  # rediss://: the CA bundle that signed the server's certificate
    redis_tls_cert_file: Path | None = None  # rediss://: a client certificate, if the server asks for one
    redis_tls_key_file: Path | None = None
    api_keys: str | None = None  # comma-separated; with API_KEYS_FILE, the keys every API route needs
    api_keys_file: Path | None = None  # one key per line (# comments)
    rate_limit: str | None = None  # e.g. "120/minute"; per key, or per client address without keys
    cors_origins: str | None = None  # comma-separated origins allowed to call from a browser; "*" = any
    proxy_hops: int = Field(0, ge=0)  # trusted proxies in front (nginx: 1): take the client address from them
    # a worker's budget of concurrent prefill/scoring work, in input characters; beyond it requests
    # queue (ADMISSION_QUEUE deep, ADMISSION_WAIT_SECONDS at most) or get 503 (service/admission.py)
    admission_tokens: int = Field(200_000, ge=1)
    admission_queue: int = Field(64, ge=0)
    admission_wait_seconds: float = Field(10.0, ge=0)
    generation_timeout_seconds: float = Field(300.0, gt=0)  # wall-clock cap on one generation

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, v: str | None) -> str | None:
        if v is not None:
            from limits import parse_many

            try:
                parse_many(v)
            except ValueError as exc:
                raise ValueError(f"{exc}; use e.g. 120/minute or 10/second;1000/hour") from exc
        return v

    @model_validator(mode="after")
    def _body_holds_the_longest_text(self) -> Settings:
        # a text of MAX_PROMPT_CHARS characters can take 12 bytes each as JSON (an escaped surrogate
        # pair): a smaller body cap would refuse with 413 what the text cap promises to accept
        need = 12 * self.max_prompt_chars + 4096
        if self.max_body_bytes < need:
            raise ValueError(
                f"MAX_BODY_BYTES={self.max_body_bytes} cannot hold a MAX_PROMPT_CHARS={self.max_prompt_chars} "
                f"text sent as JSON (up to 12 bytes a character): set MAX_BODY_BYTES >= {need}"
            )
        return self

    def redis_tls(self) -> TLS:
        return TLS(self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)

    def keys(self) -> frozenset[str]:
        """The API keys from API_KEYS and API_KEYS_FILE (empty: no authentication)."""
        found = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SettingsError(f"API_KEYS_FILE={self.api_keys_file}: {exc.strerror}") from exc
            found += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return frozenset(k for k in found if k)

    def origins(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    def replica(self) -> str:
        return self.replica_name or f"{socket.gethostname()}:{self.port}"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not valid_url(v):
            raise ValueError(
                "must be redis://, rediss://, unix://, redis+cluster://host:port[,host:port...] or "
                "redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db] (e.g. redis://localhost:6379/0)"
            )
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for var, name in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip().upper() if name == "log_level" else raw.strip()
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            field_to_var = {v: k for k, v in ENV_VARS.items()}
            problems = "; ".join(
                f"{field_to_var.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" if e["loc"] else e["msg"]
                for e in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from exc

    def check_store(self) -> None:
        """Several workers need a shared store: refuse what would silently split sessions."""
        if self.workers > 1 and not self.redis_url:
            raise SettingsError(
                f"WEB_CONCURRENCY={self.workers} workers but no REDIS_URL: each worker would keep its own "
                "sessions and a client's next request could land on a worker that has never seen its session. "
                "Set REDIS_URL (e.g. redis://localhost:6379/0), or run one worker."
            )

    def _per_worker(self, cpu_count: int | None) -> int:
        """Cores / workers: all workers together use the machine's cores once."""
        return max(1, (cpu_count or os.cpu_count() or 1) // self.workers)

    def effective_torch_threads(self, cpu_count: int | None = None) -> int:
        """torch threads per worker (prefill, scoring)."""
        return self.torch_threads or self._per_worker(cpu_count)

    def effective_blas_threads(self, cpu_count: int | None = None) -> int:
        """OpenBLAS threads per worker (the decode step)."""
        return self.blas_threads or self._per_worker(cpu_count)
