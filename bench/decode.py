"""Decode tokens/s at batch 1: the engine against the naive nn.LSTM-per-token loop, a fused-torch
variant, and the weight-bandwidth bound, all measured in this run with the same thread budget;
plus the aggregate rate of stepping many sequences together (what the service's batching uses).

    python -m bench.decode [--checkpoint DIR] [--tokens N] [--threads 2]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import LanguageModel, load
from model.engine import Engine, greedy_steps
from model.generation import Decoder, GenerationParams, start_decoders, step_decoders
from model.hugepages import huge_page_copies
from model.lstm import lstm_weights
from model.quantize import quantize_int8
from model.sampling import SamplingParams

from .common import DEFAULT_CHECKPOINT, median_time, save, set_threads, table


def naive_loop(lm: LanguageModel, n: int) -> None:
    """pytorch/examples word_language_model/generate.py: the full module called once per token."""
    inp = torch.tensor([[0]])
    state = None
    with torch.no_grad():
        for _ in range(n):
            logits, state = lm.model(inp, state)
            inp.fill_(int(torch.argmax(logits[0, -1])))


def batched_rate(engine: Engine, batch: int, steps: int) -> float:
    """Aggregate tokens/s of stepping `batch` independent sequences together (the scheduler's tick,
    without sampling)."""
    start = engine.start(batch)
    ids = np.full(batch, 2, dtype=np.int64)

    def go() -> None:
        rows = start
        for _ in range(steps):
            rows = engine.step(ids, rows)
            engine.logits(rows)

    return batch * steps / median_time(go, 3)


def scheduler_rate(engine: Engine, lm: LanguageModel, rows: int, ticks: int) -> float:
    """Aggregate tokens/s of the service's tick in process: `rows` sampling decoders (temperature
    0.8, each with its own seed) advanced together by step_decoders, the function the scheduler
    calls, with no HTTP and no threads."""

    def go() -> None:
        params = [
            GenerationParams(max_tokens=ticks, sampling=SamplingParams(temperature=0.8), seed=i) for i in range(rows)
        ]
        decoders = [Decoder(engine, lm.tokenizer, engine.start(), p) for p in params]
        start_decoders(engine, decoders)
        state = None
        for _ in range(ticks):
            state = step_decoders(engine, decoders, state)

    return rows * ticks / median_time(go, 3)


class TorchFused:
    """The same fused step written with torch ops (pre-transposed weights, one addmm per layer):
    kept here only to show by measurement why the engine uses numpy."""

    def __init__(self, lm: LanguageModel):
        m = lm.model
        self.layers = []
        for i in range(len(m.layers)):
            w_ih, w_hh, b_ih, b_hh = (t.detach() for t in lstm_weights(m.lstm(i)))
            self.layers.append((torch.cat([w_ih, w_hh], 1).t().contiguous(), (b_ih + b_hh).contiguous()))
        self.emb = m.embedding.weight.detach()
        self.dec_w = m.decoder.weight.detach().t().contiguous()
        self.dec_b = m.decoder.bias.detach()
        self.sizes = lm.config.layer_sizes

    @torch.no_grad()
    def run(self, n: int) -> None:
        hs = [torch.zeros(1, h) for h in self.sizes]
        cs = [torch.zeros(1, h) for h in self.sizes]
        token = 2
        for _ in range(n):
            x = self.emb[token].view(1, -1)
            for i, (w, b) in enumerate(self.layers):
                gates = torch.addmm(b, torch.cat([x, hs[i]], 1), w)
                ig, fg, gg, og = gates.chunk(4, 1)
                cs[i] = torch.sigmoid(fg) * cs[i] + torch.sigmoid(ig) * torch.tanh(gg)
                hs[i] = x = torch.sigmoid(og) * torch.tanh(cs[i])
            token = int(torch.addmm(self.dec_b, x, self.dec_w).argmax())


def weight_bytes_per_token(lm: LanguageModel) -> int:
    """Bytes of weights one decode step must read: W_hh of layer 1 (its input projection is a table
    row), [W_ih; W_hh] of the other layers, and the output matrix."""
    sizes = lm.config.layer_sizes
    inputs = [lm.config.embed_dim, *sizes[:-1]]
    floats = 4 * sizes[0] * sizes[0] + sum(4 * h * (i + h) for i, h in zip(inputs[1:], sizes[1:]))
    floats += sizes[-1] * lm.config.vocab_size
    return 4 * floats


def bound_matrix(total_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """A matrix of the model's weight size in huge pages, as the engine holds its weights, and a
    vector to multiply it by (W @ x: the engine's batch-1 layout)."""
    cols = 2048
    w = np.random.default_rng(0).standard_normal((max(1, total_bytes // 4 // cols), cols), dtype=np.float32)
    (w,) = huge_page_copies([w.T])
    return w, np.ones(w.shape[1], dtype=np.float32)


def gemv_bandwidth(total_bytes: int, repeats: int = 200) -> float:
    """Bytes/s numpy's BLAS streams through a matrix of the model's size in one GEMV."""
    w, x = bound_matrix(total_bytes)
    seconds = median_time(lambda: [w @ x for _ in range(repeats)], 5) / repeats
    return w.nbytes / seconds


def naive_rate(lm: LanguageModel, tokens: int) -> float:
    """Tokens/s of the naive loop (it gets a tenth of the fast contenders' tokens; rates are per token)."""
    n = max(50, tokens // 10)
    return n / median_time(lambda: naive_loop(lm, n), 3)


def stream_baselines(lm: LanguageModel, engine: Engine, tokens: int) -> dict[str, float]:
    """The two figures the 32-stream targets divide by: the naive loop and the scheduler's tick
    at 32 rows, in process, with the thread budget already set."""
    return {"naive": naive_rate(lm, tokens), "scheduler_32": scheduler_rate(engine, lm, 32, max(20, tokens // 128))}


def run(checkpoint: Path, tokens: int, threads: int, int8: bool = True) -> dict[str, Any]:
    set_threads(threads)
    lm = load(checkpoint)
    engine = Engine(lm.model)
    fused_torch = TorchFused(lm)
    naive_n = max(50, tokens // 10)  # the slow loop gets fewer tokens; rates are per token
    rates = {"naive nn.LSTM per token": naive_rate(lm, tokens)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an irrelevant note about Intel GPUs and TF32
        with torch.backends.mkldnn.flags(enabled=False):
            rates["naive, oneDNN off"] = naive_n / median_time(lambda: naive_loop(lm, naive_n), 3)
    rates["fused step in torch (addmm)"] = tokens / median_time(lambda: fused_torch.run(tokens), 3)
    rates["engine (fused numpy step)"] = tokens / median_time(lambda: greedy_steps(engine, tokens), 3)
    batches = {b: batched_rate(engine, b, max(20, tokens // (4 * b))) for b in (1, 8, 32, 64)}
    scheduler = {b: scheduler_rate(engine, lm, b, max(20, tokens // (4 * b))) for b in (1, 32)}
    set_threads(1)  # what one service worker gets (BLAS_THREADS=1, one worker per core)
    rates["engine, 1 thread (one service worker)"] = tokens / median_time(lambda: greedy_steps(engine, tokens), 3)
    set_threads(threads)
    if int8:
        q_engine = Engine(quantize_int8(lm).model)
        rates["int8 (quantized modules per token)"] = naive_n / median_time(lambda: greedy_steps(q_engine, naive_n), 3)
    per_token = weight_bytes_per_token(lm)
    bandwidth = gemv_bandwidth(per_token)
    bound = bandwidth / per_token
    engine_rate = rates["engine (fused numpy step)"]
    naive = rates["naive nn.LSTM per token"]
    return {
        "checkpoint": str(checkpoint),
        "threads": threads,
        "tokens": tokens,
        "tokens_per_second": rates,
        "weight_bytes_per_token": per_token,
        "gemv_bandwidth_gb_s": bandwidth / 1e9,
        "bound_tokens_per_second": bound,
        "engine_vs_naive": engine_rate / naive,
        "batched_tokens_per_second": batches,
        "scheduler_tokens_per_second": scheduler,
        "engine_vs_bound": engine_rate / bound,
    }


def report(r: dict[str, Any]) -> str:
    naive = r["tokens_per_second"]["naive nn.LSTM per token"]
    rows: list[list[Any]] = [[k, v, f"{v / naive:.1f}x"] for k, v in r["tokens_per_second"].items()]
    rows.append(
        [
            "bound: weights read once per token at GEMV bandwidth",
            r["bound_tokens_per_second"],
            f"{r['bound_tokens_per_second'] / naive:.1f}x",
        ]
    )
    text = table(["decode, batch 1", "tokens/s", "vs naive"], rows)
    text += (
        f"\n\nengine = {r['engine_vs_naive']:.1f}x the naive loop and {100 * r['engine_vs_bound']:.0f}% of the bound "
        f"({r['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token, "
        f"GEMV at {r['gemv_bandwidth_gb_s']:.1f} GB/s; {r['threads']} threads)"
    )
    batches = {int(b): v for b, v in r["batched_tokens_per_second"].items()}
    rows = [[b, v, f"{v / batches[1]:.1f}x"] for b, v in batches.items()]
    text += "\n\n" + table(["sequences stepped together", "aggregate tokens/s", "vs batch 1"], rows)
    sched = {int(b): v for b, v in r["scheduler_tokens_per_second"].items()}
    text += "\n\n" + table(
        ["scheduler tick in process (with sampling)", "aggregate tokens/s"],
        [[f"{b} rows", v] for b, v in sched.items()],
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per timed run of the fast contenders")
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads for every contender")
    args = p.parse_args()
    result = run(args.checkpoint, args.tokens, args.threads)
    save("decode", result)
    print(report(result))


if __name__ == "__main__":
    main()
