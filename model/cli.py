"""`lstm-lm`: train, evaluate and sample from LSTM language models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, LanguageModel, load
from .data import CorpusError, read_texts, split_documents
from .distributed import DistContext, process_group
from .engine import Engine
from .generation import Decoder, Finished, GenerationParams, generate, start_decoders, step_decoders
from .options import add_options, flag, given
from .sampling import SamplingParams, new_seed
from .tokenizer import Tokenizer, TokenizerError
from .train import PRESETS, RESUMABLE_CHANGES, RESUME_DIR, TRAIN_CONFIG_FILE, TrainConfig, evaluate_documents, train


def _add_train(sub: argparse._SubParsersAction) -> None:
    presets = "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
    p = sub.add_parser(
        "train",
        help="train a model on UTF-8 text files",
        description="Train a character or SentencePiece LSTM language model. The checkpoint with the "
        "best validation loss is written to --out, with training_curve.png and history.json; "
        "resumable state goes to --out/resume. However the run stops (--max-steps, --max-minutes, early "
        "stopping, Ctrl-C or SIGTERM) it evaluates once more and leaves a loadable checkpoint of the best "
        f"weights. Presets (times on 2 CPU cores): {presets}. Launched by torchrun (e.g. `torchrun --standalone "
        "--nproc-per-node 2 --no-python lstm-lm train ...`) it trains data-parallel on the gloo backend: the "
        "--batch-size rows are shared among the processes, rank 0 validates and writes.",
    )
    p.add_argument("data", nargs="*", help="UTF-8 training files (each one a document); not needed with --resume")
    p.add_argument("--out", required=True, help="checkpoint directory to write (or resume from)")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="start from a preset's settings (flags given as well override it): " + presets,
    )
    p.add_argument("--resume", action="store_true", help="continue exactly where the run in --out stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    add_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    flags = given(args, TrainConfig)
    ctx = DistContext.from_environ(os.environ)  # the one place a torchrun launch is read
    if args.resume:
        if args.preset:
            print("error: --preset starts a run; --resume continues one with its own settings", file=sys.stderr)
            return 2
        path = out / RESUME_DIR / TRAIN_CONFIG_FILE
        if not path.is_file():
            print(f"error: nothing to resume in {out} (no {path})", file=sys.stderr)
            return 2
        changed = sorted(k for k in flags if k not in RESUMABLE_CHANGES)
        if changed:
            print(
                f"error: {', '.join(flag(k) for k in changed)} cannot change when resuming (the run would no longer "
                f"be the one it continues); only {', '.join(flag(k) for k in sorted(RESUMABLE_CHANGES))} can",
                file=sys.stderr,
            )
            return 2
        saved = TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        cfg = replace(saved, out_dir=str(out), **flags)  # --out wins: a copied run resumes where it is
        if ctx.is_main:  # extending a run stretches its schedule; replaced whole, as other ranks read it
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            os.replace(tmp, path)
    else:
        if not args.data:
            print("error: give at least one training file (or --resume)", file=sys.stderr)
            return 2
        if "fit_minutes" in flags and "max_steps" in flags:
            print("error: give --fit-minutes or --max-steps, not both (each sets the run's length)", file=sys.stderr)
            return 2
        preset = dict(PRESETS[args.preset].settings) if args.preset else {}
        if "max_steps" in flags:  # a length given outright replaces a preset's fitted one
            preset.pop("fit_minutes", None)
        cfg = TrainConfig(data=[str(p) for p in args.data], out_dir=str(out), **{**preset, **flags})
    with process_group(ctx):
        result = train(cfg, resume=args.resume, progress=not args.no_progress, dist=ctx)
    if not ctx.is_main:
        return 0
    best = result.best_val
    summary: dict[str, object] = {"steps": result.steps, "stopped": result.stopped, "checkpoint": str(out)}
    if best is not None:
        summary.update(val_nats_per_char=round(best.nats_per_char, 4), val_bits_per_char=round(best.bits_per_char, 4))
    print(json.dumps(summary))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="bits/nats per character and token perplexity of a text",
        description="Score text with a checkpoint, carrying the state across the whole text from <s>. "
        "By default scores the checkpoint's own validation split (the last --val-fraction of its training files).",
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument(
        "files", nargs="*", help="UTF-8 files to score (default: the validation split recorded in the checkpoint)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=None, help="score only the last fraction of the files' characters"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    lm = _load(args.checkpoint, args.threads)
    training = lm.meta.get("training", {})
    files = args.files or training.get("data", [])
    fraction = (
        args.val_fraction if args.val_fraction is not None else (None if args.files else training.get("val_fraction"))
    )
    if not files:
        print("error: no files given and the checkpoint records no training data", file=sys.stderr)
        return 2
    texts = read_texts([Path(f) for f in files])
    docs = split_documents(texts, fraction)[1] if fraction else texts
    result = evaluate_documents(lm.model, lm.tokenizer, docs)
    print(
        json.dumps(
            {"checkpoint": str(args.checkpoint), "files": files, "val_fraction": fraction, **result.to_dict()}, indent=2
        )
    )
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text, once or interactively",
        description="Continue a prompt. With --interactive, every line you type is appended to the same "
        "hidden state and continued, so the model sees the whole conversation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (escape sequences like \\n are understood)")
    p.add_argument("--length", type=int, default=300, help="tokens to generate per turn")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages tokens already in the context")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random, printed)")
    p.add_argument(
        "--rows",
        type=int,
        default=1,
        help="independent samples of the prompt, stepped together as one batch (row i seeded --seed + i) and "
        "printed one after another, each followed by a blank line: a corpus of a model's samples, e.g. for "
        "`lstm-lm train --extra-train`",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--rows > 1 shows one on stderr)")
    p.add_argument("--interactive", action="store_true", help="read lines from stdin, continuing one state")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    lm = _load(args.checkpoint, args.threads)
    engine = Engine(lm.model)
    params = GenerationParams(
        max_tokens=args.length,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty),
        stop=tuple(_unescape(s) for s in args.stop),
        seed=args.seed,
    )
    state = engine.start()

    def turn(prompt: str, seed: int | None) -> np.ndarray:
        ids = lm.tokenizer.encode(prompt)
        st = engine.prefill(ids, state)
        for item in generate(engine, lm.tokenizer, st, replace(params, seed=seed), ids):
            if isinstance(item, Finished):
                print(file=sys.stderr)
                return item.rows
            print(item.text, end="", flush=True)
        raise AssertionError("generation ended without finishing")

    if args.rows != 1:
        if args.interactive or args.rows < 1:
            print("error: --rows takes a positive count and does not combine with --interactive", file=sys.stderr)
            return 2
        return _sample_rows(
            engine, lm.tokenizer, params, _unescape(args.prompt), args.rows, args.seed, args.no_progress
        )
    if not args.interactive:
        seed = args.seed if args.seed is not None else new_seed()
        print(_unescape(args.prompt), end="")
        turn(_unescape(args.prompt), seed)
        print(f"[seed {seed}]", file=sys.stderr)
        return 0
    print("Type a line to continue the text (Ctrl-D to quit).", file=sys.stderr)
    for turns, line in enumerate(sys.stdin):
        state = turn(line, None if args.seed is None else args.seed + turns)
    return 0


def _sample_rows(
    engine: Engine,
    tokenizer: Tokenizer,
    params: GenerationParams,
    prompt: str,
    rows: int,
    seed: int | None,
    quiet: bool,
) -> int:
    """`rows` samples of one prompt decoded as one batch (each row's tokens are what it would get
    alone with its seed), printed in row order once all have finished."""
    first = seed if seed is not None else new_seed()
    ids = tokenizer.encode(prompt)
    start = engine.prefill(ids, engine.start())
    decoders = [Decoder(engine, tokenizer, start, replace(params, seed=first + i), ids) for i in range(rows)]
    start_decoders(engine, decoders)
    active, state = decoders, None
    with tqdm(total=params.max_tokens, unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        while active:
            state = step_decoders(engine, active, state)
            bar.update(1)
            going = [d for d in active if d.finished is None]
            if len(going) != len(active):  # the rows of those still going are gathered anew
                active, state = going, None
    for decoder in decoders:
        assert decoder.finished is not None
        print(prompt + decoder.finished.text, end="\n\n")
    print(f"[seeds {first}..{first + rows - 1}]", file=sys.stderr)
    return 0


def _unescape(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("unicode_escape") if "\\" in text else text


def _load(path: str, threads: int) -> LanguageModel:
    if threads:
        torch.set_num_threads(threads)
    return load(path)


def _add_card(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card",
        help="write a checkpoint's model card (README.md)",
        description="Evaluate the checkpoint (float32 and int8) on its validation split, time decoding, draw a "
        "seeded sample, and write README.md next to the weights; a NOTES.md in the checkpoint directory is "
        "appended as its last section. Run from the directory training ran in.",
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument(
        "--prompt", default="ROMEO:\n", help="prompt of the sample (escape sequences like \\n are understood)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the sample")
    p.set_defaults(func=cmd_card)


def cmd_card(args: argparse.Namespace) -> int:
    from .card import write_card

    print(write_card(_load(args.checkpoint, 2), prompt=_unescape(args.prompt), seed=args.seed))
    return 0


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "average",
        help="average snapshots of one run into a checkpoint (SWA)",
        description="Average the weights of several snapshots of one training run (the files a run given "
        "--snapshots-from keeps in <out>/snapshots/, resume files <out>/resume/tensors-<step>.safetensors, or "
        "checkpoint directories), score the "
        "mean on the run's validation split, and write it as a checkpoint. Run from the directory training ran in.",
    )
    p.add_argument("checkpoint", help="the run's checkpoint directory (config, tokenizer and training record)")
    p.add_argument("snapshots", nargs="+", type=Path, help="snapshot files or checkpoint directories to average")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_average)


def cmd_average(args: argparse.Namespace) -> int:
    from .average import average_checkpoint

    result, fingerprint = average_checkpoint(_load(args.checkpoint, args.threads), args.snapshots, args.out)
    print(
        json.dumps(
            {"out": str(args.out), "fingerprint": fingerprint, "averaged": len(args.snapshots), **result.to_dict()}
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_sample(sub)
    _add_card(sub)
    _add_average(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CorpusError, TokenizerError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
