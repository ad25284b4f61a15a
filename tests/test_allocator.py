"""The glibc malloc settings gunicorn's master applies before forking its workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from servers import ROOT

_PROBE = "from service.allocator import tune_malloc; print(tune_malloc())"


def _probe(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_settings() -> None:
    assert _probe({}) == "malloc: 2 arenas, mmap threshold 256 KiB, trim threshold 1 MiB"


@pytest.mark.parametrize("name", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"])
def test_settings_from_the_environment_win(name: str) -> None:
    assert _probe({name: "4" if name == "MALLOC_ARENA_MAX" else "glibc.malloc.arena_max=4"}) == (
        "malloc: left as the environment sets it"
    )


def test_gunicorn_master_applies_them_before_forking(server_log: str) -> None:
    assert "malloc: 2 arenas" in server_log


@pytest.fixture
def server_log() -> str:
    """What gunicorn.conf.py says when loaded as the Procfile loads it (its master's stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    code = "import runpy; runpy.run_path('service/gunicorn.conf.py')"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stderr
