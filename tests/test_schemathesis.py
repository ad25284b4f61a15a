"""The OpenAPI document, attacked: schemathesis generates requests from /openapi.json (examples,
coverage, fuzzing, and stateful sequences that follow the document's links from a created
session) against the real gunicorn and Redis, with every check on. 0 failures: no 500, every
schema-valid request accepted, every answer (streamed events included) as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import Gunicorn, RedisServer, serving

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def server(
    char_lm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    # generated requests stay cheap: the run tests the contract, not the model
    with serving(char_lm_dir, tmp_path_factory.mktemp("schemathesis"), redis_server.url, MAX_TOKENS_LIMIT="64") as g:
        yield g


def test_the_document_holds_under_generated_requests(server: Gunicorn, tmp_path: Path) -> None:
    assert SCHEMATHESIS.exists() or shutil.which("schemathesis"), "pip install schemathesis (the dev extra)"
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{server.base}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "25",
            "--max-time",
            "150",
            "--seed",
            "20261125",
            "--request-timeout",
            "30",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-20000:]
    assert "Stateful" in run.stdout  # the stateful phase ran (it follows the links from a new session)
    log = Path(server.log).read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]  # nothing reached the unexpected-error handler
