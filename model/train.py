"""Training: truncated BPTT with carried state, AdamW, warm-up + cosine/plateau, exact resume."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import save_checkpoint, weights_for_saving
from .data import BatchStream, encode_documents, read_texts, split_documents
from .evaluate import EvalResult, stream_nll, summarize
from .lstm import LSTMLanguageModel, ModelConfig, detach_state
from .plot import plot_history
from .resume import load_resume_state, save_resume_state
from .tokenizer import BOS_ID, CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

RESUME_DIR = "resume"
CURVE_FILE = "training_curve.png"
HISTORY_FILE = "history.json"


@dataclass
class TrainConfig:
    data: list[str]
    out_dir: str
    tokenizer: str = "char"  # "char" or "sentencepiece"
    sp_vocab_size: int = 1024
    sp_model_type: str = "unigram"
    val_fraction: float = 0.1
    # model
    embed_dim: int = 128
    hidden_size: int = 512
    num_layers: int = 3
    tie_weights: bool = False
    dropout_embed: float = 0.0
    dropout_input: float = 0.1
    dropout_hidden: float = 0.2
    dropout_output: float = 0.2
    weight_drop: float = 0.2
    # optimisation
    batch_size: int = 64
    bptt: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    schedule: str = "cosine"  # "cosine" or "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    weight_decay: float = 0.01
    clip: float = 1.0
    max_steps: int = 5000
    reset_prob: float = 0.01  # per row and window: restart from <s> so fresh states are trained
    epoch_offset: int = 128  # each epoch cuts its rows up to this many tokens into the stream
    # bookkeeping
    eval_interval: int = 250
    checkpoint_interval: int = 100
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = never
    seed: int = 1337
    threads: int = 0  # 0 = every core
    name: str | None = None

    def model_config(self, vocab_size: int) -> ModelConfig:
        names = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
        return ModelConfig(vocab_size=vocab_size, **{n: getattr(self, n) for n in names})

    def validate(self) -> None:
        if self.tokenizer not in ("char", "sentencepiece"):
            raise ValueError("tokenizer must be 'char' or 'sentencepiece'")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError("schedule must be 'cosine' or 'plateau'")
        if min(self.batch_size, self.bptt, self.max_steps, self.eval_interval, self.checkpoint_interval) < 1:
            raise ValueError("batch size, bptt, steps and intervals must be positive")
        if self.epoch_offset < 0:
            raise ValueError("epoch_offset must be 0 or more")


@dataclass
class Schedule:
    """Linear warm-up, then cosine decay to min_lr_ratio, or a plateau decay on validation loss."""

    config: TrainConfig
    plateau_scale: float = 1.0
    best: float = math.inf
    bad_evals: int = 0

    def lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "plateau":
            return c.lr * self.plateau_scale
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def observe(self, val_loss: float) -> None:
        if val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
            return
        self.bad_evals += 1
        if self.config.schedule == "plateau" and self.bad_evals >= self.config.plateau_patience:
            self.plateau_scale = max(self.config.min_lr_ratio, self.plateau_scale * self.config.plateau_factor)
            self.bad_evals = 0

    def state(self) -> dict[str, float | int]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}


@dataclass
class TrainResult:
    steps: int
    best_val: EvalResult | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "max_steps"


def build_tokenizer(cfg: TrainConfig, train_docs: list[str]) -> Tokenizer:
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train_docs)
    return SentencePieceTokenizer.train(train_docs, cfg.sp_vocab_size, cfg.sp_model_type, cfg.threads or 2)


def make_optimizer(model: LSTMLanguageModel, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; biases and gains are not capacity worth shrinking.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def evaluate_documents(model: LSTMLanguageModel, tokenizer: Tokenizer, docs: list[str]) -> EvalResult:
    """Each validation document scored from <s> with its state carried throughout."""
    total, tokens, unknown = 0.0, 0, 0
    for doc in docs:
        enc = tokenizer.encode_with_unknowns(doc)
        nats, n = stream_nll(model, torch.tensor([BOS_ID, *enc.ids]))
        total, tokens, unknown = total + nats, tokens + n, unknown + enc.unknown_chars
    return summarize(total, tokens, sum(len(d) for d in docs), unknown)


def train(
    cfg: TrainConfig, *, resume: bool = False, max_minutes: float | None = None, progress: bool = True
) -> TrainResult:
    """Train (or continue) a model; the best checkpoint by validation loss is written to out_dir."""
    cfg.validate()
    out = Path(cfg.out_dir)
    resume_dir = out / RESUME_DIR
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)  # every core unless told otherwise
    texts = read_texts([Path(p) for p in cfg.data])
    train_docs, val_docs = split_documents(texts, cfg.val_fraction)

    saved = load_resume_state(resume_dir) if resume else None
    tokenizer = load_tokenizer(cfg.tokenizer, resume_dir) if saved is not None else build_tokenizer(cfg, train_docs)
    torch.manual_seed(cfg.seed)
    model = LSTMLanguageModel(cfg.model_config(tokenizer.vocab_size))
    optimizer = make_optimizer(model, cfg)
    schedule = Schedule(cfg)
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)
    batches = BatchStream.from_stream(
        encode_documents(tokenizer, train_docs), cfg.batch_size, cfg.bptt, cfg.epoch_offset
    )
    carried = model.init_state(cfg.batch_size)
    step, elapsed, history = 0, 0.0, []
    loss_sum, loss_count = 0.0, 0  # training loss since the last evaluation
    best: EvalResult | None = None

    if saved is not None:
        info = saved["info"]
        model.load_state_dict(saved["model"], strict=not cfg.tie_weights)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        data_rng.set_state(saved["data_rng"])
        flat = saved["carried"]
        carried = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))
        step, elapsed, history = info["step"], info["elapsed"], info["history"]
        loss_sum, loss_count = info["loss_sum"], info["loss_count"]
        for key, value in info["schedule"].items():
            setattr(schedule, key, value)
        best = EvalResult(**info["best"]) if info.get("best") else None
    else:
        resume_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(resume_dir)
        (resume_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def save_resume() -> None:
        save_resume_state(
            resume_dir,
            model_state=weights_for_saving(model),
            optimizer_state=optimizer.state_dict(),
            carried=[t for hc in carried for t in hc],
            data_rng=data_rng.get_state(),
            info={
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "schedule": schedule.state(),
                "best": best.to_dict() if best else None,
            },
        )

    tokens_per_step = cfg.batch_size * cfg.bptt
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    started = time.monotonic()
    seg_start, seg_elapsed, seg_step = time.monotonic(), elapsed, step
    stopped = "max_steps"
    model.train()
    while step < cfg.max_steps:
        window = step % batches.windows_per_epoch
        if window == 0:
            carried = model.init_state(cfg.batch_size)
        inputs, targets = batches.window(window, batches.epoch_offset(cfg.seed, step // batches.windows_per_epoch))
        inputs = inputs.clone()
        if cfg.reset_prob > 0:
            restart = torch.rand(cfg.batch_size, generator=data_rng) < cfg.reset_prob
            inputs[:, 0] = torch.where(restart, BOS_ID, inputs[:, 0])
            keep = (~restart).float().unsqueeze(1)
            carried = tuple((h * keep, c * keep) for h, c in carried)
        lr = schedule.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, carried = model(inputs, carried)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        carried = detach_state(carried)
        step += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        elapsed = seg_elapsed + time.monotonic() - seg_start
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            tok_s=f"{tokens_per_step * (step - seg_step) / max(elapsed - seg_elapsed, 1e-9):.0f}",
            lr=f"{lr:.2e}",
            refresh=False,
        )

        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            result = evaluate_documents(model, tokenizer, val_docs)
            history.append(
                {
                    "step": step,
                    "epoch": step / batches.windows_per_epoch,
                    "train_loss": loss_sum / loss_count,
                    "val_nats_per_char": result.nats_per_char,
                    "val_token_loss": result.total_nats / max(result.num_tokens, 1),
                    "lr": lr,
                    "elapsed": elapsed,
                }
            )
            loss_sum, loss_count = 0.0, 0
            bar.write(
                f"step {step}: train loss {history[-1]['train_loss']:.4f}  "
                f"val {result.nats_per_char:.4f} nats/char ({result.bits_per_char:.4f} bits/char)"
            )
            schedule.observe(result.nats_per_char)
            if best is None or result.nats_per_char < best.nats_per_char:
                best = result
                save_checkpoint(
                    out,
                    model,
                    tokenizer,
                    name=cfg.name,
                    training={**asdict(cfg), "best_step": step, "train_seconds": round(elapsed, 1)},
                    metrics={"validation": result.to_dict(), "step": step},
                )
            plot_history(history, out / CURVE_FILE, title=cfg.name or out.name)
            save_resume()
            if cfg.early_stop_patience and _evals_since_best(history) >= cfg.early_stop_patience:
                stopped = "early_stop"
                break
        elif step % cfg.checkpoint_interval == 0:
            save_resume()
        if max_minutes is not None and time.monotonic() - started > max_minutes * 60:
            save_resume()
            stopped = "time_budget"
            break
    bar.close()
    _write_history(out, history)
    return TrainResult(step, best, history, stopped)


def _evals_since_best(history: list[dict[str, Any]]) -> int:
    losses = [h["val_nats_per_char"] for h in history]
    return len(losses) - 1 - losses.index(min(losses))


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
