"""The figures of ``adaptune compare``, as PNG files (matplotlib, headless).

- ``quality_vs_params.png``: score against trained parameters per task (log scale) for adapters
  and top-k fine-tuning, full fine-tuning as a reference line (the paper's Figures 3-4).
- ``ablation.png``: score with the adapters of layers [first..last] removed (Figure 6).
- ``robustness.png``: score against the adapter's initialisation scale and its size (§3.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptune.errors import ConfigError

_COLORS = {
    "houlsby": "tab:blue",
    "pfeiffer": "tab:green",
    "parallel": "tab:purple",
    "top-k": "tab:orange",
    "layernorm": "tab:brown",
    "head": "tab:gray",
    "full": "tab:red",
}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    finally:
        _plt().close(fig)  # pyplot keeps every figure it made until closed
    tmp.replace(path)  # never a half-written PNG
    return path


def quality_vs_params(best: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One marker per strategy (its best configuration on dev), test score vs trained params."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = best[0]["metric"]
    score = lambda r: r["test"] if r["test"] is not None else r["dev"]
    which = "test" if all(r["test"] is not None for r in best) else "dev"
    for method in ("houlsby", "pfeiffer", "parallel", "top-k"):
        rs = sorted((r for r in best if r["method"] == method), key=lambda r: r["trainable"])
        if rs:
            ax.plot(
                [r["trainable"] for r in rs],
                [score(r) for r in rs],
                marker="o",
                color=_COLORS[method],
                label="top-k fine-tuning" if method == "top-k" else f"{method} adapters",
            )
            for r in rs:
                ax.annotate(
                    r["label"].split("-")[-1] if method != "top-k" else r["label"],
                    (r["trainable"], score(r)),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=_COLORS[method],
                )
    for method in ("layernorm", "head"):
        for r in (r for r in best if r["method"] == method):
            ax.scatter(
                [r["trainable"]], [score(r)], marker="s", color=_COLORS[method], label=f"{method} only", zorder=3
            )
    for r in (r for r in best if r["method"] == "full"):
        ax.axhline(
            score(r), color=_COLORS["full"], linestyle="--", label=f"full fine-tuning ({r['trainable']:,} params)"
        )
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters per task (log scale)")
    ax.set_ylabel(f"{which} {metric}")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def ablation_heatmap(ablation: dict[str, Any], path: Path, title: str) -> Path:
    plt = _plt()
    import numpy as np

    n = ablation["layers"]
    grid = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            grid[j, i] = ablation["scores"][i][j]  # rows: last layer removed, columns: first
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(grid, origin="lower", cmap="viridis")
    for i in range(n):
        for j in range(i, n):
            ax.text(
                i,
                j,
                f"{grid[j, i]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if grid[j, i] < np.nanmean(grid) else "black",
            )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("first layer with adapters removed")
    ax.set_ylabel("last layer with adapters removed")
    ax.set_title(f"{title}\n(all adapters kept: {ablation['full']:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"dev {ablation['metric']}")
    return _save(fig, path)


def robustness(rows: list[dict[str, Any]], path: Path, title: str, init_size: int, init_lr: float) -> Path:
    """Left: dev score vs init_std (Houlsby, size ``init_size``, lr ``init_lr``). Right: vs adapter size."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    metric = rows[0]["metric"]
    init = [r for r in rows if r["method"] == "houlsby" and r["size"] == init_size and r["lr"] == init_lr]
    for task in sorted({r["task"] for r in init}):
        rs = sorted((r for r in init if r["task"] == task), key=lambda r: r["init_std"])
        left.plot([r["init_std"] for r in rs], [r["dev"] for r in rs], marker="o", label=task)
    left.set_xscale("log")
    left.set_xlabel(f"adapter init std (Houlsby, m={init_size})")
    left.set_ylabel(f"dev {metric}")
    left.set_title("initialisation scale")
    left.grid(True, alpha=0.3)
    all_sizes: set[int] = set()
    for method in ("houlsby", "pfeiffer", "parallel"):
        rs = [r for r in rows if r["method"] == method and r["sweep"] == "main"]
        sizes = sorted({r["size"] for r in rs})
        if not sizes:
            continue
        all_sizes |= set(sizes)
        tasks = sorted({r["task"] for r in rs})
        # per size: the best learning rate of each task, averaged over tasks
        best = [
            sum(max(r["dev"] for r in rs if r["size"] == s and r["task"] == t) for t in tasks) / len(tasks)
            for s in sizes
        ]
        right.plot(sizes, best, marker="o", color=_COLORS[method], label=f"{method} (best lr)")
        for r in rs:
            right.scatter([r["size"]], [r["dev"]], color=_COLORS[method], alpha=0.3, s=12)
    right.set_xscale("log", base=2)
    right.set_xticks(sorted(all_sizes), [str(m) for m in sorted(all_sizes)])
    right.set_xlabel("adapter size m (faint: every learning rate)")
    right.set_ylabel(f"dev {metric}")
    right.set_title("adapter size")
    right.grid(True, alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
