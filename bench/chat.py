"""A 10-turn chat through the official `openai` SDK against the real service (the Procfile's
gunicorn, one worker, a private Redis), as OpenAI clients talk: every turn re-sends the whole
conversation. With the prefix cache the state after every earlier message is in Redis, so a turn
reads only its new message; the baseline is the same server with PREFIX_CACHE=false, which reads
the whole history every turn. The conversation (~20,000 characters: user turns are passages of
the corpus, replies up to --reply-tokens) is the same in both runs, seeded, and the replies must
come out identical (the cache changes nothing but time).

    python -m bench.chat [--checkpoint DIR] [--repeats 3] [--turn-chars 1800] [--reply-tokens 200]

Prints each turn's time (median over the repeats) and last turn / first turn for both servers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import openai

from .common import DEFAULT_CHECKPOINT, ROOT, save, table
from servers import Gunicorn, RedisServer  # noqa: I001 - on sys.path via .common

TURNS = 10


def user_turns(turn_chars: int) -> list[str]:
    """Consecutive passages of the corpus, cut at line ends, about `turn_chars` each."""
    corpus = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    out, at = [], 200_000
    for _ in range(TURNS):
        end = corpus.index("\n", at + turn_chars)
        out.append(corpus[at:end].replace("\n\n", "\n"))  # a blank line would end the message early
        at = end + 1
    return out


def conversation(
    client: openai.OpenAI, model: str, turns: list[str], reply_tokens: int, scene: str
) -> list[dict[str, Any]]:
    """One conversation, turn by turn; each turn's wall time and usage. A new `scene` (the system
    message) makes a conversation nothing in the cache begins like."""
    history: list[Any] = [{"role": "system", "content": f"Scene {scene}: a room in the castle."}]
    out = []
    for i, text in enumerate(turns):
        history.append({"role": "user", "content": text})
        start = time.perf_counter()
        done = client.chat.completions.create(
            model=model, messages=history, max_tokens=reply_tokens, temperature=0.8, seed=i
        )
        seconds = time.perf_counter() - start
        reply = done.choices[0].message.content or ""
        history.append({"role": "assistant", "content": reply})
        usage = done.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        out.append(
            {
                "seconds": seconds,
                "history_chars": sum(len(m["content"]) for m in history),
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                "completion_tokens": usage.completion_tokens,
                "reply": reply,
            }
        )
    return out


def measure(
    env: dict[str, str], log: Path, turns: list[str], reply_tokens: int, repeats: int, run_id: str
) -> dict[str, Any]:
    server = Gunicorn(env, log)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        conversation(client, model, turns[:1], 5, "warm-up")  # first-call costs (oneDNN setup) out of turn 1
        runs = [conversation(client, model, turns, reply_tokens, f"{run_id}-{k}") for k in range(repeats)]
    finally:
        server.stop()
    per_turn = [statistics.median(r[t]["seconds"] for r in runs) for t in range(TURNS)]
    replies = [[t["reply"] for t in r] for r in runs]
    return {
        "turn_seconds": per_turn,
        "last_over_first": per_turn[-1] / per_turn[0],
        "turns": runs[0],
        "replies": replies,
    }


def run(checkpoint: Path, repeats: int, turn_chars: int, reply_tokens: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lstm-bench-chat-"))
    redis = RedisServer(tmp)
    turns = user_turns(turn_chars)
    env = {"MODEL_DIR": str(checkpoint), "REDIS_URL": redis.url, "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "1"}
    run_id = uuid.uuid4().hex[:8]  # both servers hold the same conversations; only the first caches them
    try:
        cached = measure(env, tmp / "cached.log", turns, reply_tokens, repeats, run_id)
        baseline = measure({**env, "PREFIX_CACHE": "false"}, tmp / "baseline.log", turns, reply_tokens, repeats, run_id)
    finally:
        redis.stop()
    same = cached["replies"] == baseline["replies"]
    return {
        "checkpoint": str(checkpoint),
        "repeats": repeats,
        "conversation_chars": cached["turns"][-1]["history_chars"],
        "cached": cached,
        "no_cache": baseline,
        "same_replies": same,
    }


def report(r: dict[str, Any]) -> str:
    c, b = r["cached"], r["no_cache"]
    rows = [
        [
            t + 1,
            c["turns"][t]["history_chars"],
            c["turns"][t]["prompt_tokens"],
            c["turns"][t]["cached_tokens"],
            c["turns"][t]["completion_tokens"],
            1000 * c["turn_seconds"][t],
            1000 * b["turn_seconds"][t],
        ]
        for t in range(TURNS)
    ]
    headers = ["turn", "history chars", "prompt tokens", "cached tokens", "reply tokens", "ms, cache", "ms, no cache"]
    return (
        table(headers, rows)
        + f"\n\nconversation: {r['conversation_chars']:,} characters; median of {r['repeats']} runs per turn\n"
        + f"last turn / first turn: {c['last_over_first']:.2f}x with the prefix cache (target <= 1.5x), "
        + f"{b['last_over_first']:.2f}x without; last turn {b['turn_seconds'][-1] / c['turn_seconds'][-1]:.1f}x "
        + "faster with it\n"
        + f"replies identical with and without the cache: {r['same_replies']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--repeats", type=int, default=3, help="conversations per server (each turn: the median)")
    p.add_argument("--turn-chars", type=int, default=1800, help="characters of each user turn")
    p.add_argument("--reply-tokens", type=int, default=200, help="max_tokens of each reply")
    args = p.parse_args()
    result = run(args.checkpoint, args.repeats, args.turn_chars, args.reply_tokens)
    print(report(result))
    print(f"saved {save('chat', result)}")


if __name__ == "__main__":
    main()
