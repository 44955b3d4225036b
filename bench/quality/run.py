"""The real-task quality suite: adapters against full fine-tuning and the other baselines, at defaults.

Every column trains through ``adaptune.training.train.train`` with the library's defaults (only the strategy
and placement change), on the same seeded training subset, with the same epochs; AdapterHub's
Houlsby adapter runs on the same files in its own venv (``adapterhub_worker.py``). One JSON file per
run under ``OUT/results/``: an interrupted suite resumes run by run (a half-finished run resumes
from its checkpoint), so the full mode can be completed over several sittings or on a GPU. The
results are kept in the repository (``bench/quality/results/``, a few KB each) so that a later
sitting continues where the last one stopped; data and run folders stay under ``runs/quality``.

    .venv/bin/python bench/quality/run.py --mode fast            # ~45 min on 2 CPU cores
    .venv/bin/python bench/quality/run.py --mode full --tasks speeches trec
    .venv/bin/python bench/quality/report.py                     # docs/quality.md + docs/quality.png

Modes:
- fast: one seed (0), training subsets of at most 1,000 examples, the main columns.
- full: three seeds (0, 1, 2), training subsets of at most 4,000 examples, every column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from task_data import TASKS, prepare  # noqa: E402

# column -> TrainConfig fields (beyond the defaults); "adapterhub" is run by the worker.
COLUMNS = {
    "houlsby": {"strategy": "adapters", "adapter": "houlsby"},
    "houlsby-balanced": {"strategy": "adapters", "adapter": "houlsby", "class_weights": "balanced"},
    "houlsby-frozen-pooler": {"strategy": "adapters", "adapter": "houlsby", "train_pooler": False},
    "houlsby-bucketed": {"strategy": "adapters", "adapter": "houlsby", "bucket": True},
    # the defaults before the quality fix: the pooler frozen, training batches sorted by length
    "houlsby-before": {"strategy": "adapters", "adapter": "houlsby", "train_pooler": False, "bucket": True},
    "pfeiffer": {"strategy": "adapters", "adapter": "pfeiffer"},
    "parallel": {"strategy": "adapters", "adapter": "parallel"},
    "full": {"strategy": "full"},
    "top-1": {"strategy": "top-k", "top_k": 1},
    "head": {"strategy": "head"},
    "adapterhub": None,
}
MODES = {
    "fast": {"seeds": (0,), "limit_train": 1000, "columns": ("houlsby", "full", "adapterhub", "houlsby-before")},
    "full": {
        "seeds": (0, 1, 2),
        "limit_train": 4000,
        "columns": ("houlsby", "houlsby-balanced", "pfeiffer", "parallel", "full", "top-1", "head", "adapterhub"),
    },
}
EPOCHS = {"speeches": 20}  # 114 training speeches: 3 epochs would be 12 steps; every column gets the same
DEFAULT_EPOCHS = 3
HUB_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"


def _lines(path: Path) -> list[str]:
    """The JSON Lines of a file (split at "\n" only: texts may hold U+2028, which splitlines cuts at)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _subset(task_dir: Path, limit: int, seed: int) -> Path:
    """The seeded training subset both libraries read (the whole train split when it is smaller)."""
    rows = _lines(task_dir / "train.jsonl")
    if len(rows) <= limit:
        return task_dir / "train.jsonl"
    out = task_dir / f"train-{limit}-s{seed}.jsonl"
    if not out.is_file():
        keep = sorted(np.random.default_rng([seed, 1]).choice(len(rows), size=limit, replace=False).tolist())
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(rows[i] + "\n" for i in keep), encoding="utf-8")
        tmp.replace(out)
    return out


def _pair_columns(task_dir: Path) -> dict:
    first = json.loads(_lines(task_dir / "dev.jsonl")[0])
    return {"text_pair_column": "text_pair"} if "text_pair" in first else {}


def run_adaptune(task: str, column: str, seed: int, train_file: Path, task_dir: Path, run_dir: Path) -> dict:
    from adaptune.training.train import TrainConfig, train

    cfg = TrainConfig(
        model="minilm",
        data=str(train_file),
        dev_file=str(task_dir / "dev.jsonl"),
        test_file=str(task_dir / "test.jsonl"),
        text_column="text",
        label_column="label",
        epochs=EPOCHS.get(task, DEFAULT_EPOCHS),
        seed=seed,
        **_pair_columns(task_dir),
        **COLUMNS[column],
    )
    resume = (run_dir / "config.json").is_file()
    r = train(cfg, run_dir, resume=resume, quiet=True)
    return {
        "dev": r["dev"],
        "test": r["test"],
        "trainable": r["params"]["trainable"],
        "percent": r["params"]["percent_trained"],
        "train_seconds": r["train_seconds"],
        "metric": r["metric"],
        "positive_label": r.get("positive_label"),
        "warnings": r.get("warnings", []),
        "curve": [round(h[r["metric"]], 4) for h in r["history"]],
    }


def run_adapterhub(task: str, seed: int, train_file: Path, task_dir: Path) -> dict:
    from adaptune.data.metrics import compute_metrics, default_positive, single_class_warning
    from adaptune.models.loading import resolve_model_path

    if not HUB_PYTHON.exists():
        raise SystemExit(
            f"{HUB_PYTHON} is missing: run `make quality-adapterhub` (python3 -m venv .venv-adapterhub; "
            ".venv-adapterhub/bin/pip install torch==2.13.0 adapters==1.3.0)"
        )
    cmd = [
        str(HUB_PYTHON),
        str(HERE / "adapterhub_worker.py"),
        resolve_model_path("minilm"),
        str(task_dir),
        str(train_file),
        str(EPOCHS.get(task, DEFAULT_EPOCHS)),
        str(seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise SystemExit(f"AdapterHub worker failed on {task}: {proc.stderr.strip().splitlines()[-1:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    names = out["label_names"]
    ids = {n: i for i, n in enumerate(names)}
    train_labels = [ids[json.loads(line)["label"]] for line in _lines(train_file)]
    positive = default_positive(train_labels, 2) if len(names) == 2 else 1
    scored = {}
    for split in ("dev", "test"):
        labels = [ids[json.loads(line)["label"]] for line in _lines(task_dir / f"{split}.jsonl")]
        scored[split] = compute_metrics("classification", out[f"{split}_pred"], labels, len(names), positive)
    warnings = [f"{s}: {w}" for s, m in scored.items() if (w := single_class_warning(m))]
    return {
        **scored,
        "trainable": out["trainable"],
        "percent": 100 * out["trainable"] / out["base"],
        "train_seconds": out["train_seconds"],
        "metric": "macro_f1",
        "warnings": warnings,
        "positive_label": names[positive] if len(names) == 2 else None,
        "library": f"adapters {out['adapters_version']}",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="fast")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--columns", nargs="+", choices=COLUMNS, help="override the mode's columns")
    p.add_argument("--seeds", nargs="+", type=int, help="override the mode's seeds")
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "quality"), help="data and run folders (default: runs/quality)"
    )
    p.add_argument(
        "--results", default=str(HERE / "results"), help="one JSON per finished run (default: bench/quality/results)"
    )
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plan = [
        (t, c, s) for s in (args.seeds or mode["seeds"]) for t in args.tasks for c in (args.columns or mode["columns"])
    ]
    for i, (task, column, seed) in enumerate(plan, 1):
        result_file = results / f"{task}__{column}__n{mode['limit_train']}__s{seed}.json"
        if result_file.is_file():
            continue
        task_dir = prepare(task, out / "data")
        train_file = _subset(task_dir, mode["limit_train"], seed)
        print(f"[{i}/{len(plan)}] {task} {column} seed {seed} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        if column == "adapterhub":
            r = run_adapterhub(task, seed, train_file, task_dir)
        else:
            r = run_adaptune(task, column, seed, train_file, task_dir, out / "runs" / result_file.stem)
        r.update(
            task=task,
            column=column,
            seed=seed,
            mode=args.mode,
            limit_train=mode["limit_train"],
            train_examples=sum(1 for _ in train_file.open(encoding="utf-8")),
            classes=len({json.loads(line)["label"] for line in _lines(train_file)}),
            epochs=EPOCHS.get(task, DEFAULT_EPOCHS),
            wall_seconds=round(time.perf_counter() - t0, 1),
        )
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        tmp.replace(result_file)
        print(
            f"test macro-F1 {r['test']['macro_f1']:.4f} (majority {r['test']['majority_baseline']:.3f}) "
            f"in {r['wall_seconds']:.0f} s" + "".join(f"\n  warning: {w}" for w in r["warnings"]),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
