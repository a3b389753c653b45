"""``loss.png``: one curve per loss term from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["plot_losses", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(
    metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "radio train: loss terms"
) -> bool:
    """Plot every ``loss*`` key against ``step`` (log scale); returns False when there is nothing to plot."""
    records = read_metrics(metrics_path)
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and r[key] > 0]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return True
