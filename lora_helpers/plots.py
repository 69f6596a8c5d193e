"""Shared plotting style and helpers: colour-blind-safe colours, readable fonts, saved figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

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
