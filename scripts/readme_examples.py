"""Run the README's "API by example" section and check, or record, what each example prints.

    .venv/bin/python scripts/readme_examples.py             # check: exit 1 naming the first example that differs
    .venv/bin/python scripts/readme_examples.py --update    # rewrite the recorded outputs in README.md
    .venv/bin/python scripts/readme_examples.py --url URL   # against a running server instead of a fresh one

The section lies between `<!-- examples:start -->` and `<!-- examples:end -->`. Every ```bash block
in it runs, in order, in one bash shell (so variables such as U, H and SID carry over from one
example to the next); the ```json or ```text block right after a bash block is what its commands
printed. The first example sets `U=http://localhost:8000`; the runner points U at its server.

Without --url the runner serves the documented quick start itself, as `bash scripts/serve.sh` does:
the Procfile's gunicorn with the shipped model/checkpoints/shakespeare-char, the embedded session
store and one worker, on a free loopback port, with none of the service's environment variables
inherited from the caller's shell.

The check is structural: JSON (and each Server-Sent Event's JSON) must have the same keys in the
same order, the same types, the same strings, integers and booleans, and floats equal within
FLOAT_RTOL (see there). Values that differ on every run are masked on both sides: session ids
(also inside strings, e.g. an error message naming one), timestamps, `expires_in`, the `seed` the
server draws when an example gives none, and the headers `Date`, `X-Worker-Pid`, `X-Replica` and
`Content-Length` should an example print headers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # the service's settings, and the tests' server helper
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from service.settings import ENV_VARS  # noqa: E402

from servers import Gunicorn  # noqa: E402

README = ROOT / "README.md"
START, END = "<!-- examples:start -->", "<!-- examples:end -->"
DOCUMENTED_URL = "http://localhost:8000"
U_LINE = re.compile(r"^U=http://localhost:8000$", re.MULTILINE)
SHIPPED_MODEL = ROOT / "model" / "checkpoints" / "shakespeare-char"
OUTPUT_LANGS = ("json", "text")

# Floats: equal within a relative 1e-4, or 1e-5 absolute for values near zero. The model runs in
# float32 (epsilon 1.2e-7); another CPU's BLAS kernels or thread split sum the 512- and 2048-term
# dot products in another order, which moves a logit by ~1e-6 and a log-probability, after a few
# dozen recurrent steps, by ~1e-6 to 1e-5 relative. 1e-4 is ten to a hundred times that noise,
# while anything a reader would call a change (other weights, a changed formula or default)
# moves these values by 1e-3 or far more. Near zero (the log-probability of a near-certain token,
# -0.0048) the same absolute error is a large relative one, hence the absolute floor: 1e-5 nats
# is far below anything the README's numbers say.
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-5

MASKED_KEYS = frozenset({"session_id", "created_at", "updated_at", "expires_in"})
MASKED_HEADERS = re.compile(r"^(Date|X-Worker-Pid|X-Replica|Content-Length):.*$", re.IGNORECASE)
SEED_GIVEN = re.compile(r"\bseed\b")  # an example that gives a seed gets it back: not masked
MARK = "@@readme-example-end"
MARK_OUT = re.compile(rf"\n{MARK} (\d+) (\d+)@@\n")
MARK_ERR = re.compile(rf"\n{MARK} (\d+)@@\n")


@dataclass
class Example:
    """A ```bash block of the section and the output block recorded after it (if any)."""

    number: int  # 1-based, in README order
    code: str
    bash_end: int  # line index (in the README) of the bash block's closing fence
    output: str | None  # the recorded output; None: no output block
    output_span: tuple[int, int] | None  # line indices of the output block's opening and closing fences

    @property
    def name(self) -> str:
        first = next((line for line in self.code.splitlines() if line.strip()), "")
        return f"example {self.number} (`{first[:70]}{'...' if len(first) > 70 else ''}`)"

    @property
    def masks_seed(self) -> bool:
        return not SEED_GIVEN.search(self.code)


@dataclass
class Result:
    """What an example's commands printed, and the exit status of the last one."""

    stdout: str
    stderr: str
    status: int


class ReadmeError(Exception):
    """The README's examples section cannot be read or run."""


# ---- reading the README ------------------------------------------------------------------


def _fence_end(lines: list[str], start: int, stop: int) -> int:
    for i in range(start + 1, stop):
        if lines[i].strip() == "```":
            return i
    raise ReadmeError(f"README.md line {start + 1}: code block never closed")


def section(lines: list[str]) -> tuple[int, int]:
    """Line indices of the start and end markers."""
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == START)
        end = next(i for i, line in enumerate(lines) if line.strip() == END and i > start)
    except StopIteration:
        raise ReadmeError(f"README.md has no section between {START} and {END}") from None
    return start, end


def parse_examples(text: str) -> list[Example]:
    lines = text.split("\n")
    start, end = section(lines)
    examples: list[Example] = []
    i = start + 1
    while i < end:
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        close = _fence_end(lines, i, end)
        if fence != "```bash":
            if fence[3:] in OUTPUT_LANGS:
                raise ReadmeError(f"README.md line {i + 1}: an output block that follows no ```bash block")
            i = close + 1  # another language: not an example
            continue
        code = "\n".join(lines[i + 1 : close])
        k = close + 1
        while k < end and not lines[k].strip():
            k += 1
        output: str | None = None
        span: tuple[int, int] | None = None
        if k < end and lines[k].strip()[3:] in OUTPUT_LANGS and lines[k].strip().startswith("```"):
            out_close = _fence_end(lines, k, end)
            output = "\n".join(lines[k + 1 : out_close])
            span = (k, out_close)
            i = out_close + 1
        else:
            i = close + 1
        examples.append(Example(len(examples) + 1, code, close, output, span))
    if not examples:
        raise ReadmeError("README.md's examples section holds no ```bash block")
    return examples


# ---- running them ------------------------------------------------------------------------


def build_script(examples: list[Example], url: str) -> str:
    """One bash script: every example, each followed by a marker on stdout (with its exit
    status) and on stderr, so one shell runs them all and each one's output can be told apart."""
    if not U_LINE.search(examples[0].code):
        raise ReadmeError(f"{examples[0].name} must set U=http://localhost:8000 (the runner points it at its server)")
    parts = []
    for ex in examples:
        code = U_LINE.sub(lambda _: f"U={url}", ex.code, count=1) if ex.number == 1 else ex.code
        parts.append(
            f"{code}\n"
            f"__readme_status=$?\n"
            f"printf '\\n{MARK} {ex.number} %d@@\\n' \"$__readme_status\"\n"
            f"printf '\\n{MARK} {ex.number}@@\\n' >&2\n"
        )
    return "\n".join(parts)


def run_examples(examples: list[Example], url: str, timeout: float = 600) -> list[Result]:
    """Run every example in order in one bash shell against `url`."""
    with tempfile.TemporaryDirectory(prefix="readme-examples-") as tmp:
        script = Path(tmp) / "examples.sh"
        script.write_text(build_script(examples, url.rstrip("/")), encoding="utf-8")
        proc = subprocess.run(
            ["bash", str(script)],
            cwd=tmp,  # an example that writes a file writes it here
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    stdout = proc.stdout.decode("utf-8", errors="replace")
    stderr = proc.stderr.decode("utf-8", errors="replace")
    results: list[Result] = []
    out_pos = err_pos = 0
    out_marks = list(MARK_OUT.finditer(stdout))
    err_marks = list(MARK_ERR.finditer(stderr))
    for ex, out_m, err_m in zip(examples, out_marks, err_marks):
        if int(out_m.group(1)) != ex.number or int(err_m.group(1)) != ex.number:
            raise ReadmeError(f"{ex.name}: the shell's output is out of order")
        results.append(Result(stdout[out_pos : out_m.start()], stderr[err_pos : err_m.start()], int(out_m.group(2))))
        out_pos, err_pos = out_m.end(), err_m.end()
    if len(results) < len(examples):
        ex = examples[len(results)]
        raise ReadmeError(
            f"{ex.name} did not finish (the shell exited {proc.returncode}):\n"
            f"{stdout[out_pos:][-2000:]}{stderr[err_pos:][-2000:]}"
        )
    return results


def failure(ex: Example, result: Result) -> str | None:
    """Why an example's run cannot stand (a command failed or complained), if it cannot."""
    if result.stderr.strip():
        return f"{ex.name} wrote to stderr:\n{result.stderr.rstrip()}"
    if result.status != 0:
        return f"{ex.name}: its last command exited {result.status}"
    return None


# ---- comparing ---------------------------------------------------------------------------

Item = tuple[str, Any]  # ("json", value), ("sse", value) or ("text", line)


def items(output: str) -> list[Item]:
    """An output as a list of items: JSON values (compact on one line or pretty over several),
    Server-Sent Events (`data: <JSON>` lines) and other non-blank lines of text."""
    decoder = json.JSONDecoder()
    found: list[Item] = []
    pos, n = 0, len(output)
    while pos < n:
        if output[pos].isspace():
            pos += 1
            continue
        eol = output.find("\n", pos)
        eol = n if eol < 0 else eol
        line = output[pos:eol].rstrip()
        if line.startswith("data: "):
            try:
                found.append(("sse", json.loads(line[6:])))
            except ValueError:
                found.append(("text", line))
            pos = eol
            continue
        try:
            found.append(("json", json.loads(line)))
            pos = eol
            continue
        except ValueError:
            pass
        if line[0] in "{[":
            try:
                value, end = decoder.raw_decode(output, pos)
            except ValueError:
                pass
            else:
                found.append(("json", value))
                pos = end
                continue
        found.append(("text", line))
        pos = eol
    return found


def session_ids(outputs: list[str]) -> set[str]:
    """Every session id a run printed (the values of `session_id` keys): masked wherever they appear."""
    ids: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "session_id" and isinstance(v, str) and v:
                    ids.add(v)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for output in outputs:
        for kind, value in items(output):
            if kind != "text":
                walk(value)
    return ids


def _mask_text(text: str, ids: set[str]) -> str:
    for sid in ids:
        text = text.replace(sid, "<session_id>")
    return text


def _mask_line(line: str, ids: set[str]) -> str:
    if MASKED_HEADERS.match(line):
        line = line.split(":", 1)[0] + ": <masked>"
    return _mask_text(line, ids)


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def diff_json(recorded: Any, actual: Any, where: str, ids: tuple[set[str], set[str]], mask_seed: bool) -> str | None:
    """The first difference between two JSON values, or None."""
    if _kind(recorded) != _kind(actual):
        return f"{where}: recorded {json.dumps(recorded)}, got {json.dumps(actual)} (another type)"
    if isinstance(recorded, dict):
        if list(recorded) != list(actual):
            return f"{where}: recorded keys {list(recorded)}, got {list(actual)}"
        for key in recorded:
            if key in MASKED_KEYS or (key == "seed" and mask_seed):
                if _kind(recorded[key]) != _kind(actual[key]):
                    return f"{where}.{key}: recorded a {_kind(recorded[key])}, got a {_kind(actual[key])}"
                continue
            found = diff_json(recorded[key], actual[key], f"{where}.{key}", ids, mask_seed)
            if found:
                return found
        return None
    if isinstance(recorded, list):
        if len(recorded) != len(actual):
            return f"{where}: recorded {len(recorded)} elements, got {len(actual)}"
        for i, (r, a) in enumerate(zip(recorded, actual)):
            found = diff_json(r, a, f"{where}[{i}]", ids, mask_seed)
            if found:
                return found
        return None
    if isinstance(recorded, float):
        if not math.isclose(recorded, actual, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL):
            return f"{where}: recorded {recorded!r}, got {actual!r} (beyond rel {FLOAT_RTOL:g}, abs {FLOAT_ATOL:g})"
        return None
    if isinstance(recorded, str):
        recorded, actual = _mask_text(recorded, ids[0]), _mask_text(actual, ids[1])
    if recorded != actual:
        return f"{where}: recorded {json.dumps(recorded)}, got {json.dumps(actual)}"
    return None


def diff_output(ex: Example, recorded: str, actual: str, ids: tuple[set[str], set[str]]) -> str | None:
    """The first difference between an example's recorded output and what it printed, or None."""
    want, got = items(recorded), items(actual)
    for i, (w, g) in enumerate(zip(want, got)):
        where = f"item {i + 1}"
        if w[0] != g[0]:
            return f"{where}: recorded a {w[0]} item, got a {g[0]} item: {g[1]!r}"
        if w[0] == "text":
            if _mask_line(w[1], ids[0]) != _mask_line(g[1], ids[1]):
                return f"{where}: recorded {w[1]!r}, got {g[1]!r}"
            continue
        found = diff_json(w[1], g[1], where, ids, ex.masks_seed)
        if found:
            return found
    if len(want) != len(got):
        return f"recorded {len(want)} items (JSON values, events, lines), got {len(got)}"
    return None


def check(examples: list[Example], results: list[Result]) -> str | None:
    """None if every example printed what the README records; else why the first one did not."""
    recorded_ids = session_ids([ex.output or "" for ex in examples])
    actual_ids = session_ids([r.stdout for r in results])
    for ex, result in zip(examples, results):
        problem = failure(ex, result)
        if problem:
            return problem
        found = diff_output(ex, ex.output or "", result.stdout, (recorded_ids, actual_ids))
        if found:
            shown = result.stdout.rstrip("\n") or "(nothing)"
            return f"{ex.name} differs from README.md: {found}\nit printed:\n{shown}"
    return None


# ---- recording ---------------------------------------------------------------------------


def output_block(output: str) -> list[str]:
    """The fenced block recording an output: json if it is only JSON objects or arrays."""
    body = output.rstrip("\n")
    if not body.strip():
        return []
    if any(line.strip() == "```" for line in body.split("\n")):
        raise ReadmeError("an output holds a line ``` that would close its code block")
    parsed = items(body)
    lang = "json" if all(k == "json" and isinstance(v, dict | list) for k, v in parsed) else "text"
    return [f"```{lang}", *body.split("\n"), "```"]


def update(text: str, examples: list[Example], results: list[Result]) -> str:
    """The README with every example's output block replaced by what it printed."""
    for ex, result in zip(examples, results):
        problem = failure(ex, result)
        if problem:
            raise ReadmeError(f"not recording: {problem}")
    lines = text.split("\n")
    for ex, result in reversed(list(zip(examples, results))):  # from the end: indices stay valid
        block = output_block(result.stdout)
        if ex.output_span is not None:
            lines[ex.output_span[0] : ex.output_span[1] + 1] = block
        elif block:
            lines[ex.bash_end + 1 : ex.bash_end + 1] = block
    return "\n".join(lines)


# ---- the server --------------------------------------------------------------------------


@contextlib.contextmanager
def quick_start_server() -> Iterator[str]:
    """`bash scripts/serve.sh` as documented: the Procfile's gunicorn, the shipped character
    model, the embedded store, one worker, every other setting at its default (the caller's
    environment does not leak in), on a free loopback port. Yields its URL."""
    with tempfile.TemporaryDirectory(prefix="readme-server-") as tmp:
        env = {
            "MODEL_DIR": str(SHIPPED_MODEL),
            "WEB_CONCURRENCY": "1",
            "BIND_HOST": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(Path(tmp) / "metrics"),
        }
        with mock.patch.dict(os.environ):
            for var in ENV_VARS:
                os.environ.pop(var, None)
            server = Gunicorn(env, Path(tmp) / "gunicorn.log")
        try:
            yield server.base
        finally:
            server.stop()


# ---- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="rewrite the recorded outputs in the README")
    parser.add_argument("--url", help="run against this server instead of starting the quick-start one")
    parser.add_argument("--readme", type=Path, default=README, help="the README to read (default: README.md)")
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text(encoding="utf-8")
        examples = parse_examples(text)
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(quick_start_server())
            results = run_examples(examples, url)
        problem = check(examples, results)
        if args.update:
            # all or nothing: one run's outputs, so a session id reads the same in every block;
            # and nothing to write when only masked values (ids, timestamps...) would change
            new = text if problem is None else update(text, examples, results)
            if new != text:
                args.readme.write_text(new, encoding="utf-8")
            print(f"{args.readme}: {len(examples)} examples {'recorded' if new != text else 'unchanged'}")
            return 0
    except (ReadmeError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if problem:
        print(problem, file=sys.stderr)
        print("\n(if the change is intended: scripts/readme_examples.py --update)", file=sys.stderr)
        return 1
    print(f"{args.readme}: all {len(examples)} examples print what they show")
    return 0


if __name__ == "__main__":
    sys.exit(main())
