"""The benchmark scripts run and report (their numbers are not asserted: speed lives in bench/)."""

from __future__ import annotations

from pathlib import Path

from bench import decode, prefill


def test_decode_benchmark_runs(char_lm_dir: Path) -> None:
    result = decode.run(char_lm_dir, tokens=20, threads=1, int8=False)
    assert set(result["tokens_per_second"]) >= {"naive nn.LSTM per token", "engine (fused numpy step)"}
    assert result["bound_tokens_per_second"] > 0 and result["weight_bytes_per_token"] > 0
    assert "engine =" in decode.report(result)


def test_weight_bytes_counts_what_a_step_reads(char_lm_dir: Path) -> None:
    from model import load

    lm = load(char_lm_dir)  # 2 layers of 32, embedding 16, vocabulary V
    v = lm.config.vocab_size
    assert decode.weight_bytes_per_token(lm) == 4 * (4 * 32 * 32 + 4 * 32 * 64 + 32 * v)


def test_prefill_benchmark_runs(char_lm_dir: Path) -> None:
    result = prefill.run(char_lm_dir, threads=1, lengths=(20,))
    assert result["prefill"][0]["tokens"] == 20
    assert "ratio" in prefill.report(result)
