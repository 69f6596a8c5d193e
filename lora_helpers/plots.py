"""Shared plotting style and helpers: colour-blind-safe colours, readable fonts, saved figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .settings import images_dir
from .train import History

# Okabe & Ito's palette: distinguishable with every common form of colour blindness.
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def use_style() -> None:
    """Apply the collection's figure style (large fonts for projectors, light grid)."""
    plt.rcParams.update(
        {
            "figure.figsize": (8, 4.5),
            "figure.dpi": 100,
            "font.size": 12,
            "axes.titlesize": 14,
            "axes.titleweight": "bold",
            "axes.labelsize": 12,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": plt.cycler(color=COLORS),
            "legend.frameon": False,
            "savefig.bbox": "tight",
            "savefig.dpi": 150,
        }
    )


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Save ``fig`` as ``images/<name>.png`` and return the path."""
    path = images_dir() / f"{name}.png"
    fig.savefig(path)
    return path


def plot_losses(history: History, title: str, ax: plt.Axes | None = None) -> plt.Figure:
    """Training and validation loss against optimizer steps, with the best step marked."""
    if ax is None:
        _, ax = plt.subplots()
    ax.plot(history.steps, history.train_loss, label="training loss")
    ax.plot(history.steps, history.val_loss, label="validation loss")
    ax.scatter(
        [history.best_step],
        [history.best_val_loss],
        color=COLORS[3],
        zorder=3,
        label=f"best validation: {history.best_val_loss:.3f} (step {history.best_step})",
    )
    ax.set(title=title, xlabel="optimizer step", ylabel="cross-entropy loss (nats per token)")
    ax.legend()
    return ax.figure


def plot_classification_history(history: History, title: str, steps_per_epoch: int) -> plt.Figure:
    """Loss (left) and accuracy (right) per epoch, for training and validation data."""
    epochs = [step / steps_per_epoch for step in history.steps]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(epochs, history.train_loss, marker="o", label="training (mean over the epoch)")
    ax_loss.plot(epochs, history.val_loss, marker="o", label="validation")
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy loss")
    for key, label in (("train_acc", "training"), ("val_acc", "validation")):
        ax_acc.plot(epochs, [100 * m[key] for m in history.metrics], marker="o", label=label)
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.suptitle(title, fontweight="bold")
    return fig


def plot_confusion_matrix(matrix, labels: list[str], title: str) -> plt.Figure:
    """A confusion matrix with counts in the cells (rows: true class, columns: predicted)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(np.asarray(matrix)):
        color = "white" if count > np.asarray(matrix).max() / 2 else "black"
        ax.text(col, row, f"{count}", ha="center", va="center", color=color, fontsize=16)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="messages")
    return fig
