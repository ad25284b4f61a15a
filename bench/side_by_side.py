"""Batch-1 decode side by side: the service over HTTP, the engine in process, onnxruntime and the
weight-sweep bound, timed in alternating rounds within one run.

Why rounds: on a shared 2-core machine the same code measured 6,500 and 4,000 tokens/s twenty
minutes apart, so a ratio of two figures taken minutes apart says more about the host than
about the code. Here every round times each contender once, in turn, on the same prompt and
token count, so a drift moves all of them alike; each ratio is the median of the per-round
ratios. Between two contenders the machine rests briefly, so that one's spinning BLAS or
onnxruntime threads are asleep before the next starts (OpenBLAS threads spin ~0.1 s after a
call). Nothing runs concurrently: the gunicorn worker idles while the in-process contenders run.

Contenders (the thread count in brackets):
- http: POST /generate of N tokens at temperature 1 to gunicorn, one worker, default settings
  (which give that worker both cores);
- engine [2] and [1]: greedy decoding with the fused engine in this process (model.engine);
- onnxruntime [2] and [1]: the same checkpoint exported to ONNX, one session.run per token
  (bench/onnx_peer.py), greedy;
- bound [2]: the model's weights read once per token at the GEMV bandwidth this process gets.

    python -m bench.side_by_side [--checkpoint DIR] [--tokens 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model import load
from model.engine import Engine, greedy_steps

from . import onnx_peer
from .common import DEFAULT_CHECKPOINT, environment, save, set_threads, table
from .decode import bound_matrix, weight_bytes_per_token
from servers import Gunicorn, RedisServer  # noqa: I001 - on sys.path via .common

REST = 0.5  # seconds between contenders: long enough for spinning threads to go to sleep


def _http_generate(port: int, tokens: int) -> Callable[[], None]:
    body = json.dumps({"prompt": "ROMEO:\n", "max_tokens": tokens, "temperature": 1.0})

    def go() -> None:
        # a connection per call: the rounds' pauses outlast the server's keep-alive
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        if resp.status != 200 or data["usage"]["completion_tokens"] != tokens:
            raise RuntimeError(f"/generate: HTTP {resp.status}: {data}")

    return go


def _bound(per_token_bytes: int, passes: int) -> Callable[[], None]:
    """`passes` GEMV passes over a matrix as large as the weights a decode step reads: as many as
    the other contenders decode tokens, so each is timed over the same stretch (50 passes, ~4 ms
    right after a rest, measured the BLAS threads waking up: 4,400-12,300 tokens/s in one run)."""
    w, x = bound_matrix(per_token_bytes)

    def go() -> None:
        for _ in range(passes):
            w @ x

    return go


def run(checkpoint: Path, tokens: int, rounds: int) -> dict[str, Any]:
    lm = load(checkpoint)
    engine = Engine(lm.model)
    # name -> (threads in this process, tokens one call decodes, the call)
    contenders: dict[str, tuple[int, int, Callable[[], Any]]] = {
        "engine [2]": (2, tokens, lambda: greedy_steps(engine, tokens)),
        "engine [1]": (1, tokens, lambda: greedy_steps(engine, tokens)),
        "bound [2]": (2, tokens, _bound(weight_bytes_per_token(lm), tokens)),
    }
    peer: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp(prefix="lstm-onnx-")) / "step.onnx"
        onnx_peer.export(lm, path)
        for threads in (2, 1):
            session = onnx_peer.session(ort, path, threads)
            contenders[f"onnxruntime [{threads}]"] = (
                threads,
                tokens,
                lambda s=session: onnx_peer.onnx_loop(s, lm, tokens),  # type: ignore[misc]
            )
        same = onnx_peer.onnx_loop(session, lm, 50) == greedy_steps(engine, 50)
        peer = {"onnxruntime": ort.__version__, "same_tokens": same}
    except ImportError:
        peer = {"skipped": "onnxruntime is not installed (pip install -e '.[bench]')"}

    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-"))
    redis = RedisServer(tmp)
    env = {"MODEL_DIR": str(checkpoint), "REDIS_URL": redis.url, "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "1"}
    try:
        server = Gunicorn(env, tmp / "gunicorn.log")
        try:
            contenders["http"] = (1, tokens, _http_generate(server.port, tokens))  # this process only waits
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for round_ in range(rounds + 1):  # round 0 warms everything up and is not counted
                for name, (threads, _, call) in contenders.items():
                    set_threads(threads)
                    time.sleep(REST)
                    start = time.perf_counter()
                    call()
                    if round_:
                        times[name].append(time.perf_counter() - start)
        finally:
            server.stop()
    finally:
        redis.stop()
        set_threads(2)
    rates = {name: [contenders[name][1] / t for t in ts] for name, ts in times.items()}
    return {
        "checkpoint": str(checkpoint),
        "tokens": tokens,
        "rounds": rounds,
        "environment": environment(),
        "tokens_per_second": rates,
        "peer": peer,
    }


def median_rate(r: dict[str, Any], name: str) -> float:
    return statistics.median(r["tokens_per_second"][name])


def median_ratio(r: dict[str, Any], a: str, b: str) -> float:
    """The median over rounds of a's rate / b's rate in the same round."""
    rates = r["tokens_per_second"]
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


def report(r: dict[str, Any]) -> str:
    rates = r["tokens_per_second"]
    rows = [
        [name, median_rate(r, name), min(v), max(v), f"{median_ratio(r, name, 'engine [2]'):.2f}x"]
        for name, v in rates.items()
    ]
    text = table(["batch 1 [threads]", "tokens/s (median)", "lowest", "highest", "vs engine [2]"], rows)
    peer = r["peer"]
    note = (
        f"onnxruntime {peer['onnxruntime']}, one `session.run` per token; it and the engine produce the same "
        f"tokens: {'yes' if peer['same_tokens'] else 'NO'}"
        if "onnxruntime" in peer
        else f"onnxruntime: {peer['skipped']}"
    )
    return text + (
        f"\n\n{r['rounds']} rounds of {r['tokens']} tokens, each contender once per round in turn; ratios are "
        f"medians of the per-round ratios. http: /generate at temperature 1 through gunicorn (1 worker, "
        f"default settings); the others greedy, in process. {note}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per timed call")
    p.add_argument("--rounds", type=int, default=7, help="rounds counted (one more warms up)")
    args = p.parse_args()
    result = run(args.checkpoint, args.tokens, args.rounds)
    save("side_by_side", result)
    print(report(result))


if __name__ == "__main__":
    main()
