"""The reports of ``adaptune compare``: each strategy's best configuration on dev, the summary table
and the findings, CSV and JSON files."""

from __future__ import annotations
from adaptune.experiments.config import ADAPTER_PLACEMENTS

import json
import math
import statistics
from pathlib import Path
from typing import Any


def select_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and strategy label: the learning rate with the best mean dev score over seeds.

    Returns one row per (task, label) with the mean dev and test of that configuration, its seeds'
    runs, and the number of configurations it was chosen from.
    """
    main = [r for r in rows if r["sweep"] == "main"]
    best = []
    for task in _unique(r["task"] for r in main):
        for label in _unique(r["label"] for r in main if r["task"] == task):
            cands = [r for r in main if r["task"] == task and r["label"] == label]
            by_lr = {}
            for r in cands:
                by_lr.setdefault(r["lr"], []).append(r)
            lr, runs = max(by_lr.items(), key=lambda kv: (statistics.fmean(r["dev"] for r in kv[1]), -kv[0]))
            tests = [r["test"] for r in runs if r["test"] is not None]
            best.append(
                {
                    **{
                        k: runs[0][k]
                        for k in ("task", "label", "method", "size", "top_k", "metric", "trainable", "base", "percent")
                    },
                    "lr": lr,
                    "dev": statistics.fmean(r["dev"] for r in runs),
                    "test": statistics.fmean(tests) if tests else None,
                    "test_std": statistics.pstdev(tests) if len(tests) > 1 else 0.0,
                    "seeds": len(runs),
                    "lrs_tried": len(by_lr),
                    "runs": [r["run"] for r in runs],
                }
            )
    return best


def _unique(xs):
    seen = []
    for x in xs:
        if x not in seen:
            seen.append(x)
    return seen


def total_params_multiplier(percent_trained: float, num_tasks: int, method: str) -> float:
    """Parameters to serve N tasks, in units of one base model (the paper's "total params" column).

    Full fine-tuning keeps N copies; every other method keeps one base plus N small deltas.
    """
    return float(num_tasks) if method == "full" else 1.0 + num_tasks * percent_trained / 100.0


def summary(best: list[dict[str, Any]], num_tasks: int) -> list[dict[str, Any]]:
    """One row per strategy label, averaged over tasks, with the N-task parameter multiplier."""
    rows = []
    for label in _unique(r["label"] for r in best):
        rs = [r for r in best if r["label"] == label]
        pct = statistics.fmean(r["percent"] for r in rs)
        tests = [r["test"] for r in rs if r["test"] is not None]
        rows.append(
            {
                "label": label,
                "method": rs[0]["method"],
                "size": rs[0]["size"],
                "top_k": rs[0]["top_k"],
                "trainable": round(statistics.fmean(r["trainable"] for r in rs)),
                "percent": pct,
                "total_multiplier": total_params_multiplier(pct, num_tasks, rs[0]["method"]),
                "dev": statistics.fmean(r["dev"] for r in rs),
                "test": statistics.fmean(tests) if tests else None,
                "per_task": {r["task"]: r["test"] if r["test"] is not None else r["dev"] for r in rs},
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], metric: str, num_tasks: int, tasks: list[str]) -> str:
    per_task = len(tasks) > 1
    head = [
        "method",
        "trained params / task",
        "% trained / task",
        f"total params ({num_tasks} task{'s' * (num_tasks > 1)})",
        f"dev {metric}",
        f"test {metric}",
    ] + ([f"test: {t}" for t in tasks] if per_task else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [
            r["label"],
            f"{r['trainable']:,}",
            f"{r['percent']:.2f} %",
            f"{r['total_multiplier']:.2f}×",
            f"{r['dev']:.4f}",
            "—" if r["test"] is None else f"{r['test']:.4f}",
        ]
        if per_task:
            cells += [f"{r['per_task'].get(t, math.nan):.4f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    from adaptune.training.checkpoint import atomic_write_text

    atomic_write_text(path, buf.getvalue())


def write_json(obj: Any, path: Path) -> None:
    from adaptune.training.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _findings(summ: list[dict[str, Any]], metric: str) -> list[str]:
    """The paper's two claims, checked on these numbers (stated whatever the outcome)."""
    score = lambda r: r["test"] if r["test"] is not None else r["dev"]
    out = []
    full = next((r for r in summ if r["method"] == "full"), None)
    houlsby = [r for r in summ if r["method"] == "houlsby"]
    if full and houlsby:
        b = max(houlsby, key=lambda r: r["dev"])  # chosen on dev, like every other configuration
        gap = (score(b) - score(full)) * 100
        out.append(
            f"best Houlsby adapter on dev ({b['label']}, {b['percent']:.2f} % trained): {score(b):.4f} vs full "
            f"fine-tuning {score(full):.4f} ({gap:+.2f} points)"
        )
    topk = [r for r in summ if r["method"] == "top-k"]
    adapters = [r for r in summ if r["method"] in ADAPTER_PLACEMENTS]
    for t in sorted(topk, key=lambda r: r["trainable"]):
        cheaper = [a for a in adapters if a["trainable"] <= t["trainable"]]
        if cheaper:
            a = max(cheaper, key=lambda r: r["dev"])  # chosen on dev, reported on test
            verdict = "beats" if score(a) > score(t) else "does not beat"
            out.append(
                f"{a['label']} ({a['trainable']:,} params) {verdict} {t['label']} ({t['trainable']:,} params): "
                f"{score(a):.4f} vs {score(t):.4f}"
            )
    return out
