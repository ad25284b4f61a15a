"""Training: truncated BPTT with carried state, AdamW, warm-up + cosine/plateau, exact resume.

One process, or data-parallel across torchrun's processes (model/distributed.py): each rank trains
its share of the batch's rows, DDP averages the gradients, and every rank keeps the same run state
(step, schedule, history, best result) while only rank 0 validates and writes files."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .chat import TEMPLATES, template_named
from .checkpoint import save_checkpoint, save_weights, weights_for_saving
from .data import BatchStream, encode_documents, read_texts, split_documents
from .distributed import SINGLE, DistContext, wrap
from .evaluate import EvalResult, stream_nll, summarize
from .lstm import INIT_SCHEMES, LSTMLanguageModel, ModelConfig, ModelHyperparameters, State, detach_state
from .options import option
from .plot import plot_history
from .resume import load_resume_state, save_resume_state
from .tokenizer import BOS_ID, CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

RESUME_DIR = "resume"
SNAPSHOT_DIR = "snapshots"
TRAIN_CONFIG_FILE = "train_config.json"
CURVE_FILE = "training_curve.png"
HISTORY_FILE = "history.json"
TOKENIZERS = ("char", "sentencepiece")
SCHEDULES = ("cosine", "plateau")


@dataclass(kw_only=True)
class TrainConfig(ModelHyperparameters):
    """A training run: the model's hyperparameters (inherited, declared once in lstm.py) plus how
    to train it. `lstm-lm train` derives one flag per option field; a checkpoint records asdict()."""

    data: list[str]
    out_dir: str
    tokenizer: str = option("char", "token unit", group="tokenizer", choices=TOKENIZERS)
    sp_vocab_size: int = option(1024, "SentencePiece vocabulary size", group="tokenizer")
    sp_model_type: str = option("unigram", "SentencePiece algorithm", group="tokenizer", choices=("unigram", "bpe"))
    val_fraction: float = option(0.1, "last fraction of the characters held out for validation", group="tokenizer")
    extra_train: str | None = option(
        None,
        "a UTF-8 text file to train on beside the data's training part, never held out for validation nor "
        "used to build the vocabulary (e.g. text sampled from a teacher model: distillation by samples)",
        group="tokenizer",
    )
    init: str = option(
        "forget_bias",
        "weight initialisation: forget_bias (N(0,1) embeddings, zero biases, forget gate 1) or pytorch "
        "(every module's own default)",
        group="optimisation",
        choices=INIT_SCHEMES,
    )
    batch_size: int = option(64, "parallel rows of the corpus", group="optimisation")
    bptt: int = option(128, "truncated-BPTT window in tokens", group="optimisation")
    lr: float = option(2e-3, "peak AdamW learning rate", group="optimisation")
    adam_beta2: float = option(0.99, "AdamW's second-moment decay (PyTorch's default is 0.999)", group="optimisation")
    min_lr_ratio: float = option(
        0.05, "final (cosine) or lowest (plateau) learning rate as a fraction of --lr", group="optimisation"
    )
    warmup_steps: int = option(200, "linear warm-up steps", group="optimisation")
    schedule: str = option("cosine", "learning-rate decay after warm-up", group="optimisation", choices=SCHEDULES)
    plateau_factor: float = option(0.5, "plateau: learning-rate multiplier on a stall", group="optimisation")
    plateau_patience: int = option(2, "plateau: evaluations without improvement before decaying", group="optimisation")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay", group="optimisation")
    decay_all: bool = option(
        False, "apply weight decay to every parameter, biases included (default: matrices only)", group="optimisation"
    )
    clip: float = option(1.0, "gradient-norm clipping threshold", group="optimisation")
    max_steps: int = option(
        5000,
        "optimizer steps in total, which sets the cosine schedule's length (with --resume: a new total that "
        "extends the run)",
        group="optimisation",
    )
    reset_prob: float = option(
        0.01, "chance per row and window of restarting from <s> (trains fresh states)", group="optimisation"
    )
    epoch_offset: int = option(
        128,
        "each epoch cuts the corpus into rows starting a random 0..N tokens in, so windows differ between "
        "epochs (0: the same cut every epoch)",
        group="optimisation",
    )
    eval_interval: int = option(250, "steps between validation runs (and best-checkpoint saves)", group="bookkeeping")
    checkpoint_interval: int = option(100, "steps between resumable-state saves", group="bookkeeping")
    snapshots_from: int = option(
        0,
        "from this step on, also keep the weights of every resumable-state save in --out/snapshots/ "
        "(for `lstm-lm average`; 0: keep none)",
        group="bookkeeping",
    )
    early_stop_patience: int = option(
        0, "stop after this many evaluations without improvement (0: never)", group="bookkeeping"
    )
    max_minutes: float | None = option(
        None, "stop after this much wall time, with a checkpoint of the best weights (resumable)", group="bookkeeping"
    )
    fit_minutes: float | None = option(
        None,
        "size a new run to about this many minutes on this machine: before step 0, a few throwaway steps and "
        "one validation pass are timed and --max-steps is set so that training and its evaluations end near "
        "it (the cosine runs over those steps; the run records them, so it resumes and reproduces as a "
        "fixed-length one)",
        group="bookkeeping",
    )
    seed: int = option(1337, "seed for initialisation, dropout and data", group="bookkeeping")
    threads: int = option(
        0, "torch threads per process (0: every core, shared among the processes torchrun starts)", group="bookkeeping"
    )
    name: str | None = option(
        None, "model name recorded in config.json (default: --out's folder name)", group="bookkeeping"
    )
    chat_template: str = option(
        "speaker-headings",
        "chat template recorded in config.json for /v1/chat/completions: speaker-headings (NAME:\\n speech "
        "\\n\\n, the format of plays such as Tiny Shakespeare) or none",
        group="bookkeeping",
        choices=tuple(TEMPLATES),
    )

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **self.hyperparameters())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A run's record (train_config.json, or a checkpoint's "training" entry) as a config."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}")
        if min(self.batch_size, self.bptt, self.max_steps, self.eval_interval, self.checkpoint_interval) < 1:
            raise ValueError("batch size, bptt, steps and intervals must be positive")
        if self.epoch_offset < 0:
            raise ValueError("epoch_offset must be 0 or more")
        if self.snapshots_from < 0:
            raise ValueError("snapshots_from must be 0 or more")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ValueError("adam_beta2 must be in [0, 1)")
        if self.fit_minutes is not None and self.fit_minutes <= 0:
            raise ValueError("fit_minutes must be positive")


# what may change when a run is resumed without making it a different run
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "max_minutes",
        "eval_interval",
        "checkpoint_interval",
        "snapshots_from",
        "threads",
        "name",
        "chat_template",
    }
)


@dataclass(frozen=True)
class Preset:
    about: str  # what it is for and how long it takes on 2 cores (the --help text)
    settings: dict[str, Any]


PRESETS = {
    "tiny": Preset(
        "1 x 256 LSTM, done in under 3 minutes, writes words",
        dict(
            embed_dim=64,
            hidden_size=256,
            num_layers=1,
            dropout_mode="ordinary",
            dropout_input=0.0,
            dropout_hidden=0.0,
            dropout_output=0.1,
            weight_drop=0.0,
            init="pytorch",
            batch_size=32,
            bptt=64,
            warmup_steps=0,
            reset_prob=0.0,
            max_steps=600,
            eval_interval=200,
            max_minutes=3.0,
        ),
    ),
    "small": Preset(
        "2 x 256 LSTM, sized to 20 minutes on the machine it runs on (--fit-minutes 20)",
        dict(
            embed_dim=64,
            hidden_size=256,
            num_layers=2,
            dropout_mode="ordinary",
            dropout_input=0.1,
            dropout_hidden=0.1,
            dropout_output=0.1,
            weight_drop=0.0,
            init="pytorch",
            warmup_steps=0,
            reset_prob=0.0,
            fit_minutes=20.0,
            eval_interval=150,
            max_minutes=25.0,  # a guard: the fitted length ends near 20
        ),
    ),
    "shakespeare": Preset(
        "the shipped shakespeare-char recipe (3 x 512 LSTM, see its model card), about 1.5 hours",
        dict(
            embed_dim=256,
            hidden_size=512,
            num_layers=3,
            dropout_mode="ordinary",
            dropout_input=0.3,
            dropout_hidden=0.3,
            dropout_output=0.3,
            weight_drop=0.0,
            init="pytorch",
            adam_beta2=0.999,
            decay_all=True,
            weight_decay=0.1,
            warmup_steps=0,
            reset_prob=0.01,
            epoch_offset=128,
            min_lr_ratio=0.05,
            max_steps=2400,
            eval_interval=150,
        ),
    ),
}


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


def update(
    net: torch.nn.Module,
    model: LSTMLanguageModel,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    carried: State,
    clip: float,
) -> tuple[torch.Tensor, State]:
    """One optimizer step on a window: the loss and the carried state, detached. `net` is what
    runs the forward pass (the model, or its DDP wrapper); `model` owns the parameters to clip."""
    logits, carried = net(inputs, carried)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP this also averages the gradients across ranks
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss, detach_state(carried)


def build_tokenizer(cfg: TrainConfig, train_docs: list[str]) -> Tokenizer:
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train_docs)
    return SentencePieceTokenizer.train(train_docs, cfg.sp_vocab_size, cfg.sp_model_type, cfg.threads or 2)


def make_optimizer(model: LSTMLanguageModel, cfg: TrainConfig) -> torch.optim.AdamW:
    # By default weight decay on matrices only: biases are not capacity worth shrinking.
    decay = [p for p in model.parameters() if cfg.decay_all or p.dim() >= 2]
    no_decay = [p for p in model.parameters() if not cfg.decay_all and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2))


def evaluate_documents(model: LSTMLanguageModel, tokenizer: Tokenizer, docs: list[str]) -> EvalResult:
    """Each validation document scored from <s> with its state carried throughout."""
    total, tokens, unknown = 0.0, 0, 0
    for doc in docs:
        enc = tokenizer.encode_with_unknowns(doc)
        nats, n = stream_nll(model, torch.tensor([BOS_ID, *enc.ids]))
        total, tokens, unknown = total + nats, tokens + n, unknown + enc.unknown_chars
    return summarize(total, tokens, sum(len(d) for d in docs), unknown)


class Trainer:
    """One training run, fresh or resumed. `run()` steps until a stop condition and always leaves
    the best weights seen as a checkpoint in out_dir and the resumable state in out_dir/resume."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dist: DistContext = SINGLE):
        setup_started = time.monotonic()
        cfg.validate()
        self.cfg = cfg
        self.dist = dist
        self.rows = dist.rows(cfg.batch_size)  # this rank's rows of the global batch (all of them alone)
        self.out = Path(cfg.out_dir)
        self.resume_dir = self.out / RESUME_DIR
        self.progress = progress and dist.is_main
        torch.set_num_threads(dist.threads(cfg.threads, os.cpu_count()))  # the cores unless told otherwise
        texts = read_texts([Path(p) for p in cfg.data])
        train_docs, self.val_docs = split_documents(texts, cfg.val_fraction)
        saved = load_resume_state(self.resume_dir) if resume else None
        if saved is None and dist.is_main:
            # a fresh run: rank 0 builds the vocabulary once and the others read it (a SentencePiece
            # model trained on each rank need not come out the same)
            self.tokenizer = build_tokenizer(cfg, train_docs)
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.resume_dir)
            (self.resume_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        dist.barrier()
        if saved is not None or not dist.is_main:
            self.tokenizer = load_tokenizer(cfg.tokenizer, self.resume_dir)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = LSTMLanguageModel(cfg.model_config(self.tokenizer.vocab_size))
        if cfg.init != "forget_bias":  # the constructor's scheme
            # Drawn from the seed itself, as a plain PyTorch model of the same modules would be.
            # Drawn after the constructor's own draws instead, the same distributions trained
            # measurably worse (~0.09 nats/char at step 150 over four seeds; NOTES.md of
            # shakespeare-char), for a reason not yet understood.
            torch.manual_seed(cfg.seed)
            self.model.initialize(cfg.init)
        if dist.rank > 0:
            torch.manual_seed(dist.dropout_seed(cfg.seed))  # its own dropout masks (rank 0's: a lone run's)
        self.optimizer = make_optimizer(self.model, cfg)
        self.data_rng = torch.Generator().manual_seed(cfg.seed + 1)
        if cfg.extra_train is not None:  # first, so every batch's rows hold both (rows are cut in order)
            train_docs = read_texts([Path(cfg.extra_train)]) + train_docs
        self.batches = BatchStream.from_stream(
            encode_documents(self.tokenizer, train_docs), cfg.batch_size, cfg.bptt, cfg.epoch_offset
        )
        if saved is None and cfg.fit_minutes is not None:
            self.cfg = cfg = self._fit_to_minutes(cfg, setup_started)
        self.schedule = Schedule(cfg)
        self.carried = self._zero_state()
        self.step, self.elapsed = 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.loss_sum, self.loss_count = 0.0, 0  # training loss since the last evaluation
        self.best: EvalResult | None = None
        self.lr = cfg.lr
        if saved is not None:
            self._restore(saved)
        self.net = wrap(self.model, dist)  # what training calls: DDP under torchrun

    def _fit_to_minutes(self, cfg: TrainConfig, started: float) -> TrainConfig:
        """The config with max_steps sized to cfg.fit_minutes (counted from `started`), from the
        time of a few steps and one validation pass on throwaway copies of the model and the
        optimizer (the run's weights and random streams are untouched). Rank 0's figure wins, so
        every rank runs the same number of steps."""
        main = self.dist.is_main
        model = copy.deepcopy(self.model)
        optimizer = make_optimizer(model, cfg)
        with torch.random.fork_rng(devices=[]):
            model.train()
            state = model.init_state(self.rows.stop - self.rows.start)
            timed, clock = 0, 0.0
            for k in range(1000):
                inputs, targets = self.batches.window(k % self.batches.windows_per_epoch)
                begun = time.monotonic()
                _, state = update(model, model, optimizer, inputs[self.rows], targets[self.rows], state, cfg.clip)
                if k >= 2:  # the first steps pay for allocation and warm-up
                    timed, clock = timed + 1, clock + time.monotonic() - begun
                if timed >= 10 and clock >= 2.0:
                    break
            begun = time.monotonic()
            if main:
                evaluate_documents(model, self.tokenizer, self.val_docs)
            eval_seconds = time.monotonic() - begun
        step_seconds = clock / timed
        left = cfg.fit_minutes * 60 - (time.monotonic() - started) if cfg.fit_minutes else 0.0
        steps = steps_for_budget(left, step_seconds, eval_seconds, cfg.eval_interval)
        (steps,) = (int(v) for v in self.dist.broadcast_floats([float(steps)]))
        if steps < 1:
            raise ValueError(
                f"--fit-minutes {cfg.fit_minutes} is too short on this machine: a step takes {step_seconds:.2f} s "
                f"and a validation pass {eval_seconds:.1f} s; give more minutes or --max-steps instead"
            )
        fitted = replace(cfg, max_steps=steps, fit_minutes=None)
        if main:
            print(
                f"fitted to {cfg.fit_minutes:g} minutes on this machine: --max-steps {steps} "
                f"({step_seconds:.3f} s a step, {eval_seconds:.1f} s a validation pass)",
                flush=True,
            )
            (self.resume_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(asdict(fitted), indent=2) + "\n")
        return fitted

    def _zero_state(self) -> State:
        return self.model.init_state(self.rows.stop - self.rows.start)

    def _restore(self, saved: dict[str, Any]) -> None:
        info = saved["info"]
        self.model.load_state_dict(saved["model"], strict=not self.cfg.tie_weights)
        self.optimizer.load_state_dict(saved["optimizer"])
        # Each rank continues its own dropout stream. A rank the saved run did not have (resumed
        # with more processes) starts a stream of its own; the run is then no longer bit-identical
        # to any uninterrupted one, as masks and reduction order differ with the world size anyway.
        rngs = saved["torch_rngs"]
        if self.dist.rank < len(rngs):
            torch.set_rng_state(rngs[self.dist.rank])
        else:
            torch.manual_seed(self.dist.dropout_seed(self.cfg.seed) + info["step"])
        self.data_rng.set_state(saved["data_rng"])
        flat = saved["carried"]  # the global batch's rows, whatever the saved world size
        if flat and flat[0].size(0) != self.cfg.batch_size:
            raise ValueError(f"the resumable state holds {flat[0].size(0)} rows, not {self.cfg.batch_size}")
        self.carried = tuple((flat[2 * i][self.rows], flat[2 * i + 1][self.rows]) for i in range(len(flat) // 2))
        self.step, self.elapsed, self.history = info["step"], info["elapsed"], info["history"]
        self.loss_sum, self.loss_count = info["loss_sum"], info["loss_count"]
        for key, value in info["schedule"].items():
            setattr(self.schedule, key, value)
        self.best = EvalResult(**info["best"]) if info.get("best") else None

    def save_resume(self) -> None:
        """Rank 0 writes one resume file holding every rank's carried rows and RNG; weights,
        optimizer, schedule and data position are the same on every rank."""
        carried = self.dist.gather_rows([t for hc in self.carried for t in hc])
        torch_rngs = self.dist.gather_each(torch.get_rng_state())
        if self.dist.is_main:
            save_resume_state(
                self.resume_dir,
                model_state=weights_for_saving(self.model),
                optimizer_state=self.optimizer.state_dict(),
                carried=carried,
                data_rng=self.data_rng.get_state(),
                torch_rngs=torch_rngs,
                info={
                    "step": self.step,
                    "elapsed": self.elapsed,
                    "history": self.history,
                    "loss_sum": self.loss_sum,
                    "loss_count": self.loss_count,
                    "schedule": self.schedule.state(),
                    "best": self.best.to_dict() if self.best else None,
                    "world_size": self.dist.world_size,
                },
            )
            if self.cfg.snapshots_from and self.step >= self.cfg.snapshots_from:
                # the resume file is replaced at every save; these stay, for weight averaging
                (self.out / SNAPSHOT_DIR).mkdir(exist_ok=True)
                save_weights(self.model, self.out / SNAPSHOT_DIR / f"step-{self.step}.safetensors")
        self.dist.barrier()

    def train_step(self) -> float:
        """One optimizer step on the next window; returns its training loss."""
        cfg, batches, model = self.cfg, self.batches, self.model
        window = self.step % batches.windows_per_epoch
        if window == 0:
            self.carried = self._zero_state()
        epoch = self.step // batches.windows_per_epoch
        inputs, targets = batches.window(window, batches.epoch_offset(cfg.seed, epoch))
        inputs, targets = inputs[self.rows].clone(), targets[self.rows]  # (B / ranks, T): this rank's rows
        carried = self.carried
        if cfg.reset_prob > 0:
            # drawn for the whole batch on every rank, so the data RNG stays in step everywhere
            restart = (torch.rand(cfg.batch_size, generator=self.data_rng) < cfg.reset_prob)[self.rows]
            inputs[:, 0] = torch.where(restart, BOS_ID, inputs[:, 0])
            keep = (~restart).float().unsqueeze(1)
            carried = tuple((h * keep, c * keep) for h, c in carried)
        self.lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        loss, self.carried = update(self.net, model, self.optimizer, inputs, targets, carried, cfg.clip)
        self.step += 1
        value = self.dist.mean(loss.item())  # the global batch's loss
        self.loss_sum, self.loss_count = self.loss_sum + value, self.loss_count + 1
        return value

    def evaluate(self, bar: tqdm, *, record: bool = True) -> None:
        """Score the validation split and write the checkpoint if it is the best yet. `record`:
        a scheduled evaluation, which enters the history and the schedule; the one a stop adds
        between them only keeps the best weights (so a resumed run stays the run it continues).
        Rank 0 validates and writes; every rank records the same result, so the schedule, the
        history and early stopping agree everywhere, and the others wait until rank 0 is done."""
        cfg, main = self.cfg, self.dist.is_main
        result = self._shared(evaluate_documents(self.model, self.tokenizer, self.val_docs) if main else None)
        if record:
            self.history.append(
                {
                    "step": self.step,
                    "epoch": self.step / self.batches.windows_per_epoch,
                    "train_loss": self.loss_sum / max(self.loss_count, 1),
                    "val_nats_per_char": result.nats_per_char,
                    "val_token_loss": result.total_nats / max(result.num_tokens, 1),
                    "lr": self.lr,
                    "elapsed": self.elapsed,
                }
            )
            self.loss_sum, self.loss_count = 0.0, 0
            self.schedule.observe(result.nats_per_char)
            if main:
                plot_history(self.history, self.out / CURVE_FILE, title=cfg.name or self.out.name)
        if main:
            bar.write(
                f"step {self.step}: val {result.nats_per_char:.4f} nats/char ({result.bits_per_char:.4f} bits/char)"
                + (f", train loss {self.history[-1]['train_loss']:.4f}" if record else " (at the stop)")
            )
            sys.stdout.flush()  # a log file (--no-progress under nohup) shows each evaluation as it happens
        if self.best is None or result.nats_per_char < self.best.nats_per_char:
            self.best = result
        if main and self.best is result:
            save_checkpoint(
                self.out,
                self.model,
                self.tokenizer,
                name=cfg.name,
                training={**asdict(cfg), "best_step": self.step, "train_seconds": round(self.elapsed, 1)},
                metrics={"validation": result.to_dict(), "step": self.step},
                chat_template=template_named(cfg.chat_template),
            )
        self.dist.barrier()

    def _shared(self, result: EvalResult | None) -> EvalResult:
        """Rank 0's validation result on every rank (rebuilt from its sums as summarize built it)."""
        sums = [result.total_nats, result.num_tokens, result.num_chars, result.unknown_chars] if result else [0.0] * 4
        total, tokens, chars, unknown = self.dist.broadcast_floats([float(v) for v in sums])
        return result if result is not None else summarize(total, int(tokens), int(chars), int(unknown))

    def run(self, signals: list[str] | None = None) -> TrainResult:
        """Train until a stop condition. `signals` collects the names of stop signals received
        (see _stop_requests, which train() installs around the whole run)."""
        signals = [] if signals is None else signals
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.bptt
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True)
        main = self.dist.is_main
        started = seg_start = time.monotonic()
        seg_elapsed, seg_step = self.elapsed, self.step
        stopped = "max_steps"
        self.model.train()
        while self.step < cfg.max_steps:
            loss = self.train_step()
            self.elapsed = seg_elapsed + time.monotonic() - seg_start
            bar.update(1)
            rate = tokens_per_step * (self.step - seg_step) / max(self.elapsed - seg_elapsed, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", lr=f"{self.lr:.2e}", refresh=False)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                self.evaluate(bar)
                self.save_resume()
                if cfg.early_stop_patience and _evals_since_best(self.history) >= cfg.early_stop_patience:
                    stopped = "early_stop"
                    break
            elif self.step % cfg.checkpoint_interval == 0:
                self.save_resume()
            # a stop asked of any rank (its clock, a signal) stops every rank after the same step
            out_of_time, signalled = self.dist.any(
                cfg.max_minutes is not None and time.monotonic() - started > cfg.max_minutes * 60, bool(signals)
            )
            if out_of_time:
                stopped = "time_budget"
                break
            if signalled:
                stopped = "interrupted"
                if main:
                    cause = signals[0] if signals else "a signal to another rank"
                    bar.write(f"{cause}: saving the best checkpoint and the resumable state, then stopping")
                break
        # however the run stopped, the best weights so far are a checkpoint
        if not self.history or self.history[-1]["step"] != self.step:
            self.evaluate(bar, record=False)
            self.save_resume()
        bar.close()
        if main:
            _write_history(self.out, self.history)
        return TrainResult(self.step, self.best, self.history, stopped)


@contextmanager
def _stop_requests(signals: list[str]) -> Iterator[None]:
    """The first SIGINT or SIGTERM asks the run to stop after the current step (with a
    checkpoint); a second one interrupts at once."""

    def ask(signum: int, frame: object) -> None:
        if signals:
            raise KeyboardInterrupt
        signals.append(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, ask)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dist: DistContext = SINGLE) -> TrainResult:
    """Train (or continue) a model; the best checkpoint by validation loss is written to out_dir.
    With `dist` (inside its process group): this rank's part of a data-parallel run."""
    signals: list[str] = []
    with _stop_requests(signals):  # from the start: a stop during the set-up still ends with a checkpoint
        return Trainer(cfg, resume=resume, progress=progress, dist=dist).run(signals)


def steps_for_budget(seconds: float, step_seconds: float, eval_seconds: float, eval_interval: int) -> int:
    """How many steps fit in `seconds` when each costs `step_seconds` and every `eval_interval`-th
    is followed by a validation pass of `eval_seconds`, with one more pass at the end."""
    return max(0, math.floor((seconds - eval_seconds) / (step_seconds + eval_seconds / eval_interval)))


def _evals_since_best(history: list[dict[str, Any]]) -> int:
    losses = [h["val_nats_per_char"] for h in history]
    return len(losses) - 1 - losses.index(min(losses))


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
