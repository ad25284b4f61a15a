"""bench/chat.py runs end to end on the tiny model (its timings are not asserted)."""

from __future__ import annotations

from pathlib import Path

from bench import chat


def test_chat_benchmark_runs(char_lm_dir: Path) -> None:
    result = chat.run(char_lm_dir, repeats=1, turn_chars=150, reply_tokens=8)
    turns = result["cached"]["turns"]
    assert [t["cached_tokens"] for t in turns][0] == 0
    assert all(b["cached_tokens"] > a["cached_tokens"] for a, b in zip(turns, turns[1:]))
    assert all(t["cached_tokens"] == 0 for t in result["no_cache"]["turns"])
    assert result["same_replies"]  # the cache changes nothing but time
    assert "last turn / first turn" in chat.report(result)
