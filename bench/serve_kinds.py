"""Every kind of task on one shared base, on real runs: each served row against its own run's
Predictor, and the parameters held in memory (one base) against one model per run.

Runs (all adapters on the shipped all-MiniLM-L6-v2): a fine-food reviews classifier
(``bench/serve_load.py`` trains it), CoNLL-2003 NER, HellaSwag multiple choice, SQuAD 1.1 extractive
QA, the cooking multi-label task (``make tasks``: docs/task-types.md) and the reviews AdapterFusion
run (``make fusion``: docs/composition.md). The inputs are the first ``--rows`` dev examples of each
run's own data, all tasks interleaved in one call.

    .venv/bin/python bench/serve_kinds.py              # bench/results/serve_kinds.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "reviews": "runs/serve-bench/reviews_a",
    "ner": "runs/tasks/conll2003__adapters",
    "hellaswag": "runs/tasks/hellaswag__adapters",
    "squad": "runs/tasks/squad__adapters",
    "cooking": "runs/tasks/cooking__adapters",
    "fusion": "runs/fusion/target/fusion",
}
MAKES = {"reviews": "bench/serve_load.py", "fusion": "make fusion"}


def inputs(run: Path, n: int) -> tuple[list[str], list | None]:
    """The first ``n`` dev examples of the run's own data: texts, and pairs / contexts / choices."""
    from adaptune.predict import read_run
    from adaptune.training.prepared import _load_data

    config, task = read_run(run)
    dev = _load_data(config).dev
    texts = [t if isinstance(t, str) else " ".join(t) for t in dev.texts[:n]]  # tagging data: its words
    if task["task_type"] == "multiple-choice":
        return texts, [list(c) for c in dev.choices[:n]]
    return texts, None if dev.text_pairs is None else list(dev.text_pairs[:n])


def differences(served, alone) -> tuple[bool, float]:
    """Whether two answers agree (labels, tags, spans, choices) and their largest number gap."""
    if isinstance(served, dict):
        results = [differences(served[k], alone.get(k)) for k in served if k != "task"]
        return all(r[0] for r in results), max((r[1] for r in results), default=0.0)
    if isinstance(served, list):
        results = [differences(a, b) for a, b in zip(served, alone)]
        return len(served) == len(alone) and all(r[0] for r in results), max((r[1] for r in results), default=0.0)
    if isinstance(served, float):
        return True, abs(served - alone)
    return served == alone, 0.0


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=24, help="dev examples per task")
    ap.add_argument("--json", default=str(ROOT / "bench/results/serve_kinds.json"))
    args = ap.parse_args()
    from adaptune.multitask import MultiTaskPredictor
    from adaptune.predict import Predictor

    runs = {name: ROOT / path for name, path in RUNS.items()}
    missing = [f"{p} ({MAKES.get(n, 'make tasks')})" for n, p in runs.items() if not (p / "task.json").is_file()]
    if missing:
        print(f"missing runs: {', '.join(missing)}; create them first", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    data = {name: inputs(run, args.rows) for name, run in runs.items()}
    order = [(name, k) for k in range(args.rows) for name in runs if k < len(data[name][0])]  # interleaved
    start = time.perf_counter()
    served = MultiTaskPredictor(runs, device="cpu")
    load_s = time.perf_counter() - start
    pairs = [None if data[n][1] is None else data[n][1][k] for n, k in order]
    got = served.predict([data[n][0][k] for n, k in order], [n for n, _ in order], pairs, batch_size=32)
    report = {"rows_per_task": args.rows, "load_s": round(load_s, 1), "tasks": {}}
    held_alone = 0
    for name, run in runs.items():
        alone_model = Predictor(run, device="cpu")
        held_alone += params(alone_model.model)
        texts, pairs = data[name]
        alone = alone_model.predict(texts, pairs, batch_size=32)
        mine = [g for g, (n, _) in zip(got, order) if n == name]
        checks = [differences(g, a) for g, a in zip(mine, alone)]
        report["tasks"][name] = {
            "task_type": served.tasks[name]["task_type"],
            "rows": len(mine),
            "answers_equal": sum(c[0] for c in checks),
            "max_abs_difference": max(c[1] for c in checks if math.isfinite(c[1])),
            "own_batch": name in served.views,
        }
        del alone_model
    held = params(served.model) + sum(
        params(v.inner) - params(v.inner.base_model) for v in served.views.values() if v.inner is not served.model
    )
    report["parameters"] = {"served_together": held, "one_model_per_run": held_alone}
    print(f"{'task':10} {'type':22} rows  equal  max |diff|  own batch")
    for name, r in report["tasks"].items():
        print(
            f"{name:10} {r['task_type']:22} {r['rows']:4} {r['answers_equal']:6}  {r['max_abs_difference']:.1e}"
            f"    {'yes' if r['own_batch'] else 'mixed'}"
        )
    print(f"parameters in memory: {held:,} served together vs {held_alone:,} as one model per run")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
