"""The README says what the service does: its examples, run in order against the quick-start
server, print what they show (scripts/readme_examples.py), and its Settings table lists exactly
the environment variables the service reads."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts import readme_examples as rx
from service.settings import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

Run = tuple[list[rx.Example], list[rx.Result]]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """What `bash scripts/serve.sh` serves: the shipped model, the embedded store, one worker."""
    with rx.quick_start_server() as url:
        yield url


@pytest.fixture(scope="module")
def run(server: str) -> Run:
    """The README's examples, run once in order in one shell against that server."""
    examples = rx.parse_examples(README.read_text(encoding="utf-8"))
    return examples, rx.run_examples(examples, server)


def test_every_example_prints_what_the_readme_shows(run: Run) -> None:
    examples, results = run
    problem = rx.check(examples, results)
    assert problem is None, (
        f"{problem}\n\nIf the change is intended: .venv/bin/python scripts/readme_examples.py --update"
    )


def test_the_runner_checks_from_the_command_line(server: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "readme_examples.py"), "--url", server],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "print what they show" in proc.stdout


# ---- the check catches what changed, and only that ----------------------------------------


def _render(items: list[rx.Item]) -> str:
    return "\n".join(
        json.dumps(v) if kind == "json" else f"data: {json.dumps(v)}" if kind == "sse" else v for kind, v in items
    )


def _first_leaf(value: Any, want: type, change: Any, skip: frozenset[str]) -> tuple[Any, bool]:
    """`value` with its first leaf of type `want` (outside the keys in `skip`) changed."""
    if isinstance(value, dict):
        out = dict(value)
        for key, v in value.items():
            if key in skip:
                continue
            out[key], done = _first_leaf(v, want, change, skip)
            if done:
                return out, True
        return value, False
    if isinstance(value, list):
        items = list(value)
        for i, v in enumerate(value):
            items[i], done = _first_leaf(v, want, change, skip)
            if done:
                return items, True
        return value, False
    if type(value) is want:
        return change(value), True
    return value, False


def _tamper(
    examples: list[rx.Example], want: type, change: Any, *, masked: bool = False, kinds: tuple[str, ...] = ("json",)
) -> tuple[int, list[rx.Example]]:
    """The examples with the first recorded leaf of type `want` changed, in an example that has
    one: outside the masked keys, or (masked=True) only in them. Returns that example's number."""
    skip = frozenset() if masked else rx.MASKED_KEYS | {"seed"}
    for ex in examples:
        items = rx.items(ex.output or "")
        for i, (kind, value) in enumerate(items):
            if kind not in kinds:
                continue
            if masked:  # change a masked key's value only
                keys = [k for k in sorted(rx.MASKED_KEYS) if isinstance(value, dict) and isinstance(value.get(k), want)]
                if not keys:
                    continue
                new: Any = {**value, keys[0]: change(value[keys[0]])}
            else:
                new, done = _first_leaf(value, want, change, skip)
                if not done:
                    continue
            items[i] = (kind, new)
            changed = dataclasses.replace(ex, output=_render(items))
            return ex.number, [changed if e is ex else e for e in examples]
    raise AssertionError(f"no recorded output holds a {want.__name__} of kinds {kinds} to change")


@pytest.mark.parametrize(
    ("what", "want", "change", "kinds"),
    [
        ("an integer", int, lambda v: v + 1, ("json",)),
        ("a string", str, lambda v: v + "!", ("json",)),
        ("a float beyond the tolerance", float, lambda v: v * (1 + 20 * rx.FLOAT_RTOL) + 1e-3, ("json",)),
        ("a streamed event", int, lambda v: v + 1, ("sse",)),
    ],
)
def test_a_changed_value_fails_naming_its_example(
    run: Run, what: str, want: type, change: Any, kinds: tuple[str, ...]
) -> None:
    examples, results = run
    number, tampered = _tamper(examples, want, change, kinds=kinds)
    problem = rx.check(tampered, results)
    assert problem is not None, f"{what} changed in example {number}, unnoticed"
    assert problem.startswith(f"example {number} "), problem


def test_a_changed_key_order_or_an_extra_line_fails(run: Run) -> None:
    examples, results = run

    def first(ex: rx.Example) -> rx.Item:
        return rx.items(ex.output or "")[0] if ex.output else ("text", "")

    target = next(ex for ex in examples if first(ex)[0] == "json" and len(first(ex)[1]) >= 2)
    kind, value = first(target)
    reordered = dict(reversed(list(value.items())))
    for output in (_render([(kind, reordered)]), f"{target.output}\nextra"):
        tampered = [dataclasses.replace(ex, output=output) if ex is target else ex for ex in examples]
        problem = rx.check(tampered, results)
        assert problem is not None and problem.startswith(f"example {target.number} "), problem


def test_what_differs_on_every_run_is_masked(run: Run) -> None:
    examples, results = run
    _, tampered = _tamper(examples, str, lambda v: "x" * len(v), masked=True)  # a session id
    _, tampered = _tamper(tampered, float, lambda v: v + 1000.0, masked=True)  # a timestamp
    drawn = next(ex for ex in tampered if ex.masks_seed and ex.output and '"seed"' in ex.output)
    reseeded = re.sub(r'("seed": ?)\d+', r"\g<1>12345", drawn.output or "")
    tampered = [dataclasses.replace(ex, output=reseeded) if ex is drawn else ex for ex in tampered]
    _, tampered = _tamper(tampered, float, lambda v: v * (1 + rx.FLOAT_RTOL / 10))  # within the tolerance
    assert rx.check(tampered, results) is None


# ---- the Settings table ------------------------------------------------------------------


def settings_table() -> list[list[str]]:
    """The variables each row of the README's Settings table names (`| \\`A\\` / \\`B\\` | ...`)."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"^## Settings\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert found, "README.md has no ## Settings section"
    rows = [line for line in found.group(1).splitlines() if line.startswith("| `")]
    return [re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1]) for row in rows]


def test_the_settings_table_lists_every_variable_the_service_reads_and_no_other() -> None:
    rows = settings_table()
    listed = [var for row in rows for var in row]
    assert all(rows), "a row of the Settings table names no `VARIABLE`"
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(v for v in listed if listed.count(v) > 1)}"
    missing = sorted(set(ENV_VARS) - set(listed))
    unknown = sorted(set(listed) - set(ENV_VARS))
    assert not missing, f"service/settings.py reads {missing}, which the README's Settings table does not list"
    assert not unknown, f"the README's Settings table lists {unknown}, which service/settings.py does not read"


def test_the_settings_table_parser_reads_rows_of_several_variables() -> None:
    rows = settings_table()
    assert ["MAX_STOP_SEQUENCES", "MAX_STOP_CHARS"] in rows
    assert ["REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"] in rows
