"""PNG plots beside the numbers: confusion matrix, mIoU over frames, latency histogram.

matplotlib is imported lazily with the Agg backend, so plotting works on headless machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows = ground truth) with the point counts' shares."""
    plt = _pyplot()
    m = np.asarray(matrix, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(m / m.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.55 * len(names)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(len(names)):
        for j in range(len(names)):
            if norm[i, j] >= 0.005:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_series(series: Mapping[str, Sequence[float]], path: str | Path, *, ylabel: str = "mIoU (%)",
                xlabel: str = "frame", title: str = "") -> Path:
    """One line per named series (e.g. running mIoU per method)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.plot(np.arange(len(values)), values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(series) > 1 or title == "":
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(latency_ms: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Histogram of per-stage latencies (ms)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, values in latency_ms.items():
        if len(values):
            ax.hist(values, bins=30, alpha=0.5, label=stage)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("frames")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
