"""Model cards: README.md for a checkpoint, written from what the checkpoint records about itself
plus fresh measurements (validation fp32 and int8, decode speed fp32 and int8, a seeded sample)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LanguageModel
from .data import read_texts, split_documents
from .engine import Engine, greedy_steps
from .generation import Finished, GenerationParams, generate
from .options import command_flags
from .quantize import quantize_int8
from .sampling import SamplingParams
from .train import CURVE_FILE, TrainConfig, evaluate_documents


def train_command(training: dict[str, Any]) -> str:
    """The `lstm-lm train` command line that reproduces a run (non-default flags only)."""
    parts = ["lstm-lm train", *training.get("data", []), "--out", str(training.get("out_dir", "OUT"))]
    return " ".join(parts + command_flags(training, TrainConfig))


def _median_rate(n: int, run: Callable[[], object], repeats: int = 3) -> float:
    """Items per second, the median of a few timed runs (one run on a shared machine is noise)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def _decode_rate(engine: Engine, tokens: int) -> float:
    return _median_rate(tokens, lambda: greedy_steps(engine, tokens))


def _prefill_rate(engine: Engine, ids: list[int]) -> float:
    engine.prefill(ids[:100], engine.start())  # warm-up
    return _median_rate(len(ids), lambda: engine.prefill(ids, engine.start()))


def _sample(lm: LanguageModel, prompt: str, tokens: int, seed: int) -> str:
    engine = Engine(lm.model)
    ids = lm.tokenizer.encode(prompt)
    state = engine.prefill(ids, engine.start())
    params = GenerationParams(max_tokens=tokens, sampling=SamplingParams(temperature=0.8), seed=seed)
    for item in generate(engine, lm.tokenizer, state, params, ids):
        if isinstance(item, Finished):
            return prompt + item.text
    raise AssertionError("generation did not finish")


NOTES_FILE = "NOTES.md"


def write_card(lm: LanguageModel, *, prompt: str = "ROMEO:\n", sample_tokens: int = 500, seed: int = 1) -> Path:
    """Evaluate, sample and write README.md into the checkpoint directory (with NOTES.md, if the
    directory has one, appended as its last section)."""
    assert lm.path is not None
    meta = lm.meta
    training = meta.get("training", {})
    texts = read_texts([Path(p) for p in training["data"]])
    val_docs = split_documents(texts, training["val_fraction"])[1]
    fp32 = evaluate_documents(lm.model, lm.tokenizer, val_docs)
    int8_lm = quantize_int8(lm)
    int8 = evaluate_documents(int8_lm.model, int8_lm.tokenizer, val_docs)
    torch.set_num_threads(2)
    n = 300 if lm.tokenizer.kind == "char" else 150
    fp32_engine, int8_engine = Engine(lm.model), Engine(int8_lm.model)
    fp32_rate, int8_rate = _decode_rate(fp32_engine, n), _decode_rate(int8_engine, n)
    prompt_ids = lm.tokenizer.encode(val_docs[0][:5000])
    fp32_prefill, int8_prefill = _prefill_rate(fp32_engine, prompt_ids), _prefill_rate(int8_engine, prompt_ids)
    sample = _sample(lm, prompt, sample_tokens if lm.tokenizer.kind == "char" else sample_tokens // 3, seed)
    cfg = lm.config
    hours = training.get("train_seconds", 0) / 3600
    threads = training.get("threads", 2)
    chars_per_token = fp32.num_chars / max(fp32.num_tokens, 1)
    card = f"""# {lm.name}

An LSTM language model trained on Tiny Shakespeare (`data/tinyshakespeare.txt`), shipped with
the service. Fingerprint `{lm.fingerprint}`.

| | |
|---|---|
| tokenizer | {lm.tokenizer.kind}, {lm.tokenizer.vocab_size} tokens (ids 0 `<s>`, 1 `<unk>`); {chars_per_token:.2f} characters per token on validation |
| network | embedding {cfg.embed_dim} -> {cfg.num_layers} x LSTM {cfg.hidden_size} -> linear{" (tied)" if cfg.tie_weights else ""} |
| parameters | {lm.model.num_parameters():,} ({(lm.path / "model.safetensors").stat().st_size / 2**20:.1f} MiB of float32 weights) |
| regularisation | weight drop {cfg.weight_drop}, {cfg.dropout_mode} dropout in/hidden/out {cfg.dropout_input}/{cfg.dropout_hidden}/{cfg.dropout_output}, embedding dropout {cfg.dropout_embed}, AdamW weight decay {training.get("weight_decay")} |
| state per session | {2 * sum(cfg.layer_sizes) * 4:,} bytes |
| training | {training.get("best_step")} steps of {training.get("batch_size")} x {training.get("bptt")} tokens (best checkpoint), {hours:.2f} h of wall clock with {threads} thread{"s" if threads != 1 else ""} on a 2-core machine |

## Validation (last {100 * training["val_fraction"]:.0f}% of the corpus, {fp32.num_chars:,} characters, state carried throughout)

| weights | nats/char | bits/char | token perplexity | decode tokens/s | prefill tokens/s |
|---|---|---|---|---|---|
| float32 (default) | {fp32.nats_per_char:.4f} | {fp32.bits_per_char:.4f} | {fp32.token_perplexity:.3f} | {fp32_rate:,.0f} (fused engine) | {fp32_prefill:,.0f} |
| int8 (`QUANTIZE=int8`) | {int8.nats_per_char:.4f} | {int8.bits_per_char:.4f} | {int8.token_perplexity:.3f} | {int8_rate:,.0f} (quantized modules) | {int8_prefill:,.0f} |

int8 changes validation by {int8.bits_per_char - fp32.bits_per_char:+.4f} bits/char; its speed is
{int8_rate / fp32_rate:.2f}x the float32 engine's when decoding one token at a time and
{int8_prefill / fp32_prefill:.2f}x for a {len(prompt_ids):,}-token prefill (batch 1, 2 threads; median of three timed runs each,
measured while writing this card). Reproduce: `lstm-lm card {lm.path}` (rewrites this file).

## Training

```
{train_command(training)}
```

![training curve]({CURVE_FILE})

## Sample (temperature 0.8, seed {seed}, prompt {prompt!r})

```
{sample}
```
"""
    notes = lm.path / NOTES_FILE
    if notes.is_file():  # what a human adds (how the run went, what was tried) survives a rewrite
        card += "\n## Notes\n\n" + notes.read_text(encoding="utf-8").strip() + "\n"
    path = lm.path / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
