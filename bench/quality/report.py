"""Tables and plots from the quality suite's results, written into docs/quality.md (between its
``<!-- results -->`` markers) and docs/quality-<mode>.png.

    .venv/bin/python bench/quality/report.py [--results bench/quality/results] [--docs docs]

Reads every ``*.json`` that ``run.py`` wrote into the results folder. Per task and column it shows test
macro-F1, MCC and accuracy beside the majority-class baseline; per task the verdict lines compare
adaptune's Houlsby adapter with full fine-tuning and with AdapterHub's Houlsby adapter (with three
seeds: the mean and the range of the paired differences, seed by seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from run import COLUMNS, MODES  # noqa: E402
from task_data import TASKS, describe  # noqa: E402

START, END = "<!-- results -->", "<!-- /results -->"
LABELS = {
    "houlsby": "adaptune Houlsby",
    "houlsby-balanced": "Houlsby, balanced weights",
    "houlsby-frozen-pooler": "Houlsby, frozen pooler",
    "houlsby-before": "Houlsby, previous defaults",
    "houlsby-bucketed": "Houlsby, length-sorted batches",
    "pfeiffer": "Pfeiffer",
    "parallel": "parallel",
    "full": "full fine-tuning",
    "top-1": "top-1 layer",
    "head": "head only",
    "adapterhub": "AdapterHub Houlsby",
}


def load(results: Path) -> dict:
    """{(mode, task, column): [result per seed, in seed order]}"""
    runs = defaultdict(list)
    for f in sorted(results.glob("*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        runs[(r["mode"], r["task"], r["column"])].append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["seed"])
    return runs


def _majority(runs: dict, mode: str, task: str, data_dir: Path) -> tuple[float, float]:
    """Test macro-F1 and accuracy of always predicting the most frequent class (×100)."""
    first = next(v for k, v in runs.items() if k[0] == mode and k[1] == task)[0]
    acc = first["test"]["majority_baseline"]
    classes = first.get("classes") or len(describe(data_dir / task)["train"]["labels"])
    return 100 * (2 * acc / (1 + acc)) / classes, 100 * acc  # the majority class's F1; 0 for the others


def _present(runs: dict, mode: str) -> tuple[list[str], list[str]]:
    """The columns and tasks with results in ``mode``, in the suite's order."""
    return (
        [c for c in COLUMNS if any(k[0] == mode and k[2] == c for k in runs)],
        [t for t in TASKS if any(k[0] == mode and k[1] == t for k in runs)],
    )


def _mean(rs, split, key):
    return statistics.fmean(r[split][key] for r in rs)


def _paired(a: list, b: list) -> tuple[float, float, float, int]:
    """Mean, min and max of a − b over the seeds both have (test macro-F1, in points)."""
    bs = {r["seed"]: r for r in b}
    d = [100 * (r["test"]["macro_f1"] - bs[r["seed"]]["test"]["macro_f1"]) for r in a if r["seed"] in bs]
    return (statistics.fmean(d), min(d), max(d), len(d)) if d else (float("nan"),) * 3 + (0,)


def tables(runs: dict, mode: str, data_dir: Path) -> list[str]:
    columns, tasks = _present(runs, mode)
    if not tasks:
        return []
    seeds = sorted({r["seed"] for k, v in runs.items() if k[0] == mode for r in v})
    lines = [
        f"### {mode} mode: seeds {', '.join(map(str, seeds))}, at most {MODES[mode]['limit_train']:,} training "
        "examples",
        "",
        "Test macro-F1 (×100; with several seeds, their mean). Majority = the macro-F1 and accuracy of always "
        "predicting the most frequent class.",
        "",
        "| task | majority macro-F1 / acc | " + " | ".join(LABELS[c] for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for t in tasks:
        maj_f1, maj_acc = _majority(runs, mode, t, data_dir)
        cells = []
        for c in columns:
            rs = runs.get((mode, t, c))
            if not rs:
                cells.append("—")
                continue
            flag = " ⚠" if any(r["warnings"] for r in rs) else ""
            n = f" (n={len(rs)})" if len(rs) != len(seeds) else ""
            cells.append(f"{100 * _mean(rs, 'test', 'macro_f1'):.1f}{flag}{n}")
        lines.append(f"| {t} | {maj_f1:.1f} / {maj_acc:.1f} | " + " | ".join(cells) + " |")
    collapsed = any(r["warnings"] for k, v in runs.items() if k[0] == mode for r in v)
    lines += [
        "",
        "⚠: predicted a single class on dev or test (a collapse onto the majority class)."
        if collapsed
        else "No run predicted a single class on dev or test.",
        "",
        "| task | column | macro-F1 | MCC | accuracy | F1 of positive class | trained parameters | % | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tasks:
        for c in columns:
            rs = runs.get((mode, t, c))
            if not rs:
                continue
            pos = (
                f"{100 * _mean(rs, 'test', 'f1'):.1f} ({rs[0]['positive_label']})"
                if rs[0].get("positive_label")
                else "—"
            )
            lines.append(
                f"| {t} | {LABELS[c]} | {100 * _mean(rs, 'test', 'macro_f1'):.1f} | "
                f"{100 * _mean(rs, 'test', 'mcc'):.1f} | "
                f"{100 * _mean(rs, 'test', 'accuracy'):.1f} | {pos} | {rs[0]['trainable']:,} | {rs[0]['percent']:.2f} "
                "| "
                f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} |"
            )
    lines += [
        "",
        "Houlsby adapter (adaptune, defaults) minus the others, test macro-F1 points "
        "(several seeds: mean [min, max] of the seed-by-seed differences):",
        "",
        "| task | − full fine-tuning | − AdapterHub Houlsby |",
        "|---|---:|---:|",
    ]
    for t in tasks:
        h = runs.get((mode, t, "houlsby"), [])
        cells = []
        for other in ("full", "adapterhub"):
            mean, lo, hi, n = _paired(h, runs.get((mode, t, other), []))
            cells.append("—" if n == 0 else f"{mean:+.1f}" + (f" [{lo:+.1f}, {hi:+.1f}]" if n > 1 else ""))
        lines.append(f"| {t} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def plot(runs: dict, mode: str, data_dir: Path, path: Path) -> None:
    """Left: test macro-F1 per task and column, the majority-class predictor dashed. Right: the Houlsby
    adapter minus full fine-tuning and minus AdapterHub, in points, with the ±1 point band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, tasks = _present(runs, mode)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(tasks), 4.6), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(columns)
    colours = plt.get_cmap("tab10")
    for j, c in enumerate(columns):
        xs, ys, errs = [], [], []
        for i, t in enumerate(tasks):
            rs = runs.get((mode, t, c))
            if rs:
                vals = [100 * r["test"]["macro_f1"] for r in rs]
                xs.append(i + (j - (len(columns) - 1) / 2) * width)
                ys.append(statistics.fmean(vals))
                errs.append((max(vals) - min(vals)) / 2)
        ax.bar(xs, ys, width, label=LABELS[c], color=colours(j), yerr=errs if any(errs) else None, capsize=2)
    for i, t in enumerate(tasks):
        ax.hlines(
            _majority(runs, mode, t, data_dir)[0],
            i - 0.45,
            i + 0.45,
            colors="black",
            linestyles="dashed",
            linewidth=1,
            label="majority-class predictor" if i == 0 else None,
        )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test macro-F1 (×100)")
    ax.set_ylim(0, 100)
    ax.set_title(
        "test macro-F1" + (" (bars: seed range)" if len({r["seed"] for v in runs.values() for r in v}) > 1 else "")
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    for j, other in enumerate(("full", "adapterhub")):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            mean, a, b, n = _paired(runs.get((mode, t, "houlsby"), []), runs.get((mode, t, other), []))
            if n:
                xs.append(i + (j - 0.5) * 0.3)
                ys.append(mean)
                lo.append(mean - a)
                hi.append(b - mean)
        dx.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=f"Houlsby − {LABELS[other]}")
    dx.axhspan(-1, 1, color="grey", alpha=0.2, label="±1 point")
    dx.axhline(0, color="black", linewidth=0.8)
    dx.set_xticks(range(len(tasks)), tasks, rotation=30)
    dx.set_xlim(-0.5, len(tasks) - 0.5)
    dx.set_ylabel("macro-F1 difference (points)")
    dx.set_title("adapter minus reference")
    dx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.suptitle(f"adaptune quality suite, {mode} mode: all-MiniLM-L6-v2, library defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="the suite's data folder's parent")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    out, docs = Path(args.out), Path(args.docs)
    runs = load(Path(args.results))
    if not runs:
        raise SystemExit(f"no results in {args.results}; run bench/quality/run.py first")
    lines = [START, "<!-- written by bench/quality/report.py from bench/quality/results; do not edit by hand -->", ""]
    for mode in MODES:
        lines += tables(runs, mode, out / "data")
        if any(k[0] == mode for k in runs):
            plot(runs, mode, out / "data", docs / f"quality-{mode}.png")
            lines += [f"![{mode} mode](quality-{mode}.png)", ""]
    page = docs / "quality.md"
    text = page.read_text(encoding="utf-8") if page.is_file() else f"# Quality on real tasks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise SystemExit(f"{page} lacks the markers {START} ... {END}; put them where the results go")
    head, rest = text.split(START, 1)
    page.write_text(head + "\n".join(lines) + END + rest.split(END, 1)[1], encoding="utf-8")
    print(f"wrote the results into {page} and the plots beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
