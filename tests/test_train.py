from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.data import BatchStream, CorpusError, encode_documents, split_documents
from model.train import TRAIN_CONFIG_FILE, Schedule, TrainConfig, Trainer, steps_for_budget, train

from conftest import TINY


def _cfg(corpus: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(data=[str(corpus)], out_dir=str(out), **{**TINY, "max_steps": 30, "eval_interval": 10, **kw})  # type: ignore[arg-type]


def test_resume_matches_uninterrupted_run(tiny_corpus: Path, tmp_path: Path) -> None:
    full = train(_cfg(tiny_corpus, tmp_path / "full"), progress=False)
    # the same run, stopped after a few steps and resumed twice
    train(_cfg(tiny_corpus, tmp_path / "split", max_steps=30, max_minutes=1e-9), progress=False)
    cfg = _cfg(tiny_corpus, tmp_path / "split")
    first = train(replace(cfg, max_minutes=1e-9), resume=True, progress=False)
    assert 0 < first.steps < 30
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.steps == full.steps == 30
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in full.history]
    assert strip == [{k: v for k, v in h.items() if k != "elapsed"} for h in resumed.history]


def test_pytorch_init_draws_what_a_plain_pytorch_model_draws_from_the_seed(tiny_corpus: Path, tmp_path: Path) -> None:
    """--init pytorch gives the weights that nn.Embedding, a multi-layer nn.LSTM and nn.Linear
    built in that order from the same seed get (the reference script's model)."""
    cfg = _cfg(tiny_corpus, tmp_path / "run", init="pytorch", seed=3)
    ours = Trainer(cfg, progress=False).model
    vocab, (e, h, layers) = ours.config.vocab_size, (cfg.embed_dim, cfg.hidden_size, cfg.num_layers)
    torch.manual_seed(3)
    emb, rnn, out = torch.nn.Embedding(vocab, e), torch.nn.LSTM(e, h, layers), torch.nn.Linear(h, vocab)
    assert torch.equal(ours.embedding.weight, emb.weight)
    for i in range(layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            assert torch.equal(getattr(ours.layers[i], f"{name}_l0"), getattr(rnn, f"{name}_l{i}"))
    assert torch.equal(ours.decoder.weight, out.weight) and torch.equal(ours.decoder.bias, out.bias)


def test_steps_for_budget_counts_the_evaluations() -> None:
    # 95 s after the final pass; each step costs 0.1 s plus a tenth of a 5 s pass
    assert steps_for_budget(100, 0.1, 5.0, 10) == 158
    assert steps_for_budget(4.0, 0.1, 5.0, 10) == 0


def test_fit_minutes_sizes_the_run_and_it_equals_the_fixed_length_run(tiny_corpus: Path, tmp_path: Path) -> None:
    """--fit-minutes times throwaway copies, sets max_steps and records it: the run is then the
    same as one given that --max-steps outright (weights bit for bit), and resumes as such."""
    fitted = train(_cfg(tiny_corpus, tmp_path / "fit", fit_minutes=0.1, eval_interval=100), progress=False)
    record = json.loads((tmp_path / "fit" / "resume" / TRAIN_CONFIG_FILE).read_text())
    assert record["fit_minutes"] is None and record["max_steps"] == fitted.steps > 20
    checkpoint = json.loads((tmp_path / "fit" / "config.json").read_text())["training"]
    assert checkpoint["max_steps"] == fitted.steps and fitted.stopped == "max_steps"
    fixed = train(_cfg(tiny_corpus, tmp_path / "fixed", max_steps=fitted.steps, eval_interval=100), progress=False)
    a = load_file(str(tmp_path / "fit" / "model.safetensors"))
    b = load_file(str(tmp_path / "fixed" / "model.safetensors"))
    assert fixed.steps == fitted.steps and all(torch.equal(a[k], b[k]) for k in a)
    saved = TrainConfig.from_dict(record)
    again = train(replace(saved, max_steps=fitted.steps + 3), resume=True, progress=False)
    assert again.steps == fitted.steps + 3  # no second fitting


def test_fit_minutes_too_short_says_what_to_do(tiny_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too short on this machine.*--max-steps"):
        Trainer(_cfg(tiny_corpus, tmp_path / "short", fit_minutes=1e-4), progress=False)


def test_training_learns_and_writes_artifacts(char_lm_dir: Path) -> None:
    history = json.loads((char_lm_dir / "history.json").read_text())
    assert history[-1]["val_nats_per_char"] < history[0]["val_nats_per_char"]
    png = (char_lm_dir / "training_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (char_lm_dir / "resume" / "state.json").is_file()


def test_seed_makes_training_deterministic(tiny_corpus: Path, tmp_path: Path) -> None:
    a = train(_cfg(tiny_corpus, tmp_path / "a", max_steps=10), progress=False)
    b = train(_cfg(tiny_corpus, tmp_path / "b", max_steps=10), progress=False)
    c = train(_cfg(tiny_corpus, tmp_path / "c", max_steps=10, seed=7), progress=False)
    assert a.history == [dict(h, elapsed=a.history[i]["elapsed"]) for i, h in enumerate(b.history)]
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_early_stopping(tiny_corpus: Path, tmp_path: Path) -> None:
    # a learning rate this small cannot improve validation loss by much; with patience 1 the
    # run must stop as soon as one evaluation is not the best
    result = train(
        _cfg(
            tiny_corpus, tmp_path / "es", max_steps=200, eval_interval=5, lr=1e-9, warmup_steps=0, early_stop_patience=1
        ),
        progress=False,
    )
    assert result.stopped == "early_stop"
    assert result.steps < 200


def test_split_is_by_characters() -> None:
    train_docs, val_docs = split_documents(["a" * 50, "b" * 50], 0.1)
    assert train_docs == ["a" * 50, "b" * 40] and val_docs == ["b" * 10]
    train_docs, val_docs = split_documents(["x" * 1_115_394], 0.1)
    assert len(val_docs[0]) == 111_540  # nanoGPT's validation split of Tiny Shakespeare


def test_batches_walk_contiguous_rows() -> None:
    stream = torch.arange(25)
    batches = BatchStream.from_stream(stream, batch_size=3, bptt=3)
    x0, y0 = batches.window(0)
    x1, _ = batches.window(1)
    assert x0.tolist() == [[0, 1, 2], [8, 9, 10], [16, 17, 18]]
    assert y0.tolist() == [[1, 2, 3], [9, 10, 11], [17, 18, 19]]
    assert x1[:, 0].tolist() == [3, 11, 19]
    assert batches.windows_per_epoch == 2


def test_schedule_shapes() -> None:
    cfg = TrainConfig(data=[], out_dir="", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    s = Schedule(cfg)
    assert s.lr(0) == 0.1 and s.lr(9) == 1.0
    assert abs(s.lr(60) - 0.55) < 1e-9 and abs(s.lr(110) - 0.1) < 1e-9
    plateau = Schedule(TrainConfig(data=[], out_dir="", lr=1.0, warmup_steps=0, schedule="plateau", plateau_patience=2))
    for loss in (1.0, 1.1, 1.2):
        plateau.observe(loss)
    assert plateau.lr(50) == 0.5


def test_epoch_offsets_recut_the_rows_reproducibly() -> None:
    stream = torch.arange(40)
    batches = BatchStream.from_stream(stream, batch_size=3, bptt=3, max_offset=4)
    assert batches.row_length == 12 and batches.windows_per_epoch == 3  # the same for every offset
    x, y = batches.window(0, offset=2)
    assert x.tolist() == [[2, 3, 4], [14, 15, 16], [26, 27, 28]]
    assert y.tolist() == [[3, 4, 5], [15, 16, 17], [27, 28, 29]]
    offsets = [batches.epoch_offset(seed=1, epoch=e) for e in range(20)]
    assert offsets == [batches.epoch_offset(seed=1, epoch=e) for e in range(20)]  # recomputable on resume
    assert len(set(offsets)) > 1 and all(0 <= o <= 4 for o in offsets)
    assert BatchStream.from_stream(stream, 3, 3).epoch_offset(seed=1, epoch=5) == 0


def test_every_way_a_run_stops_leaves_a_loadable_checkpoint(tiny_corpus: Path, tmp_path: Path) -> None:
    """Max steps, a time budget before the first scheduled evaluation, early stopping: each run
    ends with the best weights it saw as a checkpoint that loads and generates."""
    from model import load

    cases = {
        "max_steps": _cfg(tiny_corpus, tmp_path / "a", max_steps=7, eval_interval=1000),
        "time_budget": _cfg(tiny_corpus, tmp_path / "b", max_steps=10_000, eval_interval=1000, max_minutes=1e-9),
        "early_stop": _cfg(
            tiny_corpus, tmp_path / "c", max_steps=200, eval_interval=5, lr=1e-9, warmup_steps=0, early_stop_patience=1
        ),
    }
    for reason, cfg in cases.items():
        result = train(cfg, progress=False)
        assert result.stopped == reason and result.best_val is not None
        lm = load(cfg.out_dir)
        assert lm.meta["metrics"]["validation"]["nats_per_char"] == result.best_val.nats_per_char
        assert lm.tokenizer.decode(lm.tokenizer.encode("To be")) == "To be"


def test_extra_train_text_is_trained_on_but_never_validated_on_nor_in_the_vocabulary(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    """--extra-train (e.g. a teacher model's samples) joins the training stream ahead of the
    data's training part; the validation text and the vocabulary stay those of the data alone."""
    extra = tmp_path / "teacher-samples.txt"
    extra.write_text("ROMEO:\nA plague o' both your houses \u20ac\n" * 50, encoding="utf-8")
    plain = Trainer(_cfg(tiny_corpus, tmp_path / "plain"), progress=False)
    mixed = Trainer(_cfg(tiny_corpus, tmp_path / "mixed", extra_train=str(extra)), progress=False)
    assert mixed.val_docs == plain.val_docs
    assert list(mixed.tokenizer.texts) == list(plain.tokenizer.texts)  # the euro sign is not in the vocabulary
    extra_ids = encode_documents(mixed.tokenizer, [extra.read_text(encoding="utf-8")])
    assert torch.equal(mixed.batches.stream[: len(extra_ids)], extra_ids)
    assert torch.equal(mixed.batches.stream[len(extra_ids) :], plain.batches.stream)
    with pytest.raises(CorpusError, match="does not exist"):
        Trainer(_cfg(tiny_corpus, tmp_path / "missing", extra_train=str(tmp_path / "nope.txt")), progress=False)
