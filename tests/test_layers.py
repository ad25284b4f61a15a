"""The architecture, checked: model/ knows nothing of Flask or Redis, and service/ knows nothing of
how an LSTM computes (it talks to model.engine in flat state rows)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("forbidden", ["flask", "redis", "werkzeug", "service"])
def test_model_never_imports_the_server(forbidden: str) -> None:
    for path, names in _imports("model").items():
        assert not any(n == forbidden or n.startswith(forbidden + ".") for n in names), f"{path} imports {forbidden}"


def test_service_never_reaches_into_the_lstm() -> None:
    for path, names in _imports("service").items():
        assert "model.lstm" not in names and "model.fused" not in names, f"{path} imports LSTM internals"
