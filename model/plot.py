"""Training curves as PNG: a picture of train and validation loss against step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Write train loss (per token) and validation loss (per character) against step."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, [h["train_loss"] for h in history], label="train (nats/token, with dropout)")
    ax.plot(steps, [h["val_nats_per_char"] for h in history], label="validation (nats/char)")
    best = min(history, key=lambda h: h["val_nats_per_char"])
    ax.scatter(
        [best["step"]],
        [best["val_nats_per_char"]],
        color="black",
        zorder=3,
        label=f"best {best['val_nats_per_char']:.4f} at step {best['step']}",
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
