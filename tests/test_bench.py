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


def test_readme_tables_are_replaced_between_markers(tmp_path: Path) -> None:
    from bench.run import END, START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Performance\n\n{START}\nold\n{END}\n\n## Next\n")
    update_readme(readme, "# Benchmarks: m\n\nintro\n\n## Decode\n\n| a |")
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{END}\n\n## Next\n")
    assert f"{START}\nModel: m\n\nintro\n\n### Decode\n\n| a |\n{END}" in text


def test_summary_renders_from_the_committed_results() -> None:
    """bench.run --report-only: every report reads what its benchmark saved (no drift between them)."""
    from bench.run import _load_results, render

    text = render(_load_results(with_replicas=True), "shakespeare-char")
    for section in ("Targets", "Decode", "onnxruntime", "Prefill", "Service", "Costly inputs", "Replicas"):
        assert f"## {section}" in text or section in text, section


def test_side_by_side_runs_against_a_real_worker(char_lm_dir: Path) -> None:
    """Every contender is timed in every round, the HTTP one through gunicorn and Redis."""
    from bench import side_by_side

    result = side_by_side.run(char_lm_dir, tokens=20, rounds=2)
    rates = result["tokens_per_second"]
    assert {"http", "engine [1]", "engine [2]", "bound [2]"} <= set(rates)
    assert all(len(v) == 2 and min(v) > 0 for v in rates.values())
    assert side_by_side.median_ratio(result, "http", "engine [2]") > 0
    assert "rounds of 20 tokens" in side_by_side.report(result)


def test_onnx_peer_decodes_the_same_tokens_as_the_engine(char_lm_dir: Path, tmp_path: Path) -> None:
    """The side-by-side report says whether onnxruntime and the engine agree; both must start from
    the state after <s> (from zeros, the peer diverged on the shipped 3 x 512 model)."""
    import onnxruntime as ort  # the bench extra, part of dev: a skip here would hide its absence

    from bench import onnx_peer
    from model import load
    from model.engine import Engine, greedy_steps

    lm = load(char_lm_dir)
    onnx_peer.export(lm, tmp_path / "step.onnx")
    session = onnx_peer.session(ort, tmp_path / "step.onnx", threads=1)
    assert onnx_peer.onnx_loop(session, lm, 40) == greedy_steps(Engine(lm.model), 40)
