"""Figures: the leave-one-out weight matrix as a heatmap, and one target's weights as bars."""

from __future__ import annotations

import math
from pathlib import Path


def heatmap(matrix: dict[str, dict[str, float | None]], sources: list[str], path: str | Path, *,
            title: str = "ensembling weights") -> Path:
    """Rows targets, columns sources; a missing / None cell (the target's own module) stays blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = list(matrix)
    data = np.full((len(targets), len(sources)), np.nan)
    for i, t in enumerate(targets):
        for j, s in enumerate(sources):
            v = matrix[t].get(s)
            if v is not None and math.isfinite(v):
                data[i, j] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(sources), 1.0 + 0.6 * len(targets)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=max(1e-9, float(np.nanmax(data))
                                                                          if np.isfinite(data).any() else 1.0))
    ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right")
    ax.set_yticks(range(len(targets)), targets)
    ax.set_xlabel("source module")
    ax.set_ylabel("target task")
    for i in range(len(targets)):
        for j in range(len(sources)):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.5 * np.nanmax(data) else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long task names stay inside the image
    plt.close(fig)
    return path


def bar_chart(weights: dict[str, float], path: str | Path, *, title: str = "ensembling weights") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(names), 3.2))
    ax.bar(range(len(names)), [weights[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long task names stay inside the image
    plt.close(fig)
    return path
