"""Training curves for steps: the history as a CSV for ``dvc plots`` and the book's loss plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from llmpipe.io import atomic_path  # noqa: E402


def write_history_csv(path: str | os.PathLike, history: Sequence[dict[str, float]]) -> None:
    """One row per evaluation (step, epoch, tokens_seen, train_*, val_*): ``dvc plots`` reads it."""
    if not history:
        raise ValueError(f"no evaluations to write to {path}")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_history(
    path: str | os.PathLike, history: Sequence[dict[str, float]], steps_per_epoch: int, metric: str = "loss"
) -> None:
    """The book's ``plot_losses``: train and val ``metric`` against epochs, tokens seen on top."""
    epochs_seen = [entry["step"] / steps_per_epoch for entry in history]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, [entry[f"train_{metric}"] for entry in history], label=f"Training {metric}")
    if f"val_{metric}" in history[0]:
        ax1.plot(
            epochs_seen, [entry[f"val_{metric}"] for entry in history], linestyle="-.", label=f"Validation {metric}"
        )
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(metric.capitalize())
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same curve against tokens seen, drawn invisibly to align the top axis
    ax2.plot([entry["tokens_seen"] for entry in history], [entry[f"train_{metric}"] for entry in history], alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
