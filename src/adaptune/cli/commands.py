"""What each ``adaptune`` subcommand does, calling the same public functions a Python user calls."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from adaptune.cli.lm_commands import _eval_lm, _lm_line
from adaptune.cli.options import EVAL_DATA_OPTIONS, config_from, print_json, read_stdin
from adaptune.data.metrics import single_class_warning
from adaptune.errors import ConfigError, DataError


def train(args: argparse.Namespace) -> int:
    from adaptune.training.train import TrainConfig, train as run_train

    cfg = config_from(args, TrainConfig)
    result = run_train(cfg, args.output, resume=args.resume, quiet=args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        _summary(result, args.output)
    return 0


def fuse(args: argparse.Namespace) -> int:
    """``adaptune fuse --adapters RUN... ``: ``train`` with ``--fuse``."""
    return train(args)


def _summary(result: dict, where) -> None:
    p = result["params"]
    if "base" in result:  # a causal LM: perplexity before and after
        print(
            f"{result['strategy']}: {_lm_line(result)}; trained {p['trainable']:,} of {p['base']:,} parameters "
            f"({p['percent_trained']:.2f} %); run folder {where}"
        )
        return
    print(
        f"{result['strategy']}: "
        + "; ".join(
            f"{split} {metric_line(result[split], result['metric'])}" for split in ("dev", "test") if result.get(split)
        )
    )
    print(
        f"  trained {p['trainable']:,} of {p['base']:,} parameters ({p['percent_trained']:.2f} %); run folder {where}"
        + (f"; positive class {result['positive_label']!r}" if result.get("positive_label") else "")
    )
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")


def metric_line(metrics: dict, selected: str) -> str:
    """``macro_f1 0.7512 (accuracy 0.8300, mcc 0.6131, majority baseline 0.6450)``: the selection
    metric first, the others and the majority-class baseline beside it."""
    selected = selected if selected in metrics else next(iter(metrics))  # a run from an older version
    others = [
        k
        for k in (
            *("macro_f1", "accuracy", "mcc", "f1", "pearson", "spearman", "mse", "micro_f1", "subset_accuracy"),
            *("entity_f1", "entity_precision", "entity_recall", "exact_match"),
        )
        if k in metrics and k != selected
    ]
    beside = [f"{k} {metrics[k]:.4f}" for k in others]
    if "majority_baseline" in metrics:
        what = "most frequent label set's subset accuracy" if "subset_accuracy" in metrics else "majority baseline"
        beside.append(f"{what} {metrics['majority_baseline']:.4f}")
    if "threshold" in metrics:  # multi-label
        beside.append(f"threshold {metrics['threshold']:.2f}")
    return f"{selected} {metrics[selected]:.4f}" + (f" ({', '.join(beside)})" if beside else "")


def eval(args: argparse.Namespace) -> int:
    from adaptune.training.checkpoint import read_json
    from adaptune.predict import Predictor
    from adaptune.training.train import _load_data

    task_file = Path(args.run) / "task.json"
    if task_file.is_file() and (read_json(task_file) or {}).get("task_type") == "causal-lm":
        return _eval_lm(args)
    pred = Predictor(args.run, device=args.device)
    overrides = {k: getattr(args, k) for k in EVAL_DATA_OPTIONS if getattr(args, k) is not None}
    imported = (read_json(Path(args.run) / "config.json") or {}).get("imported_from")
    if imported and "data" not in overrides:
        raise DataError(f"{args.run} was converted from an {imported} and has no data of its own: pass --data FILE")
    if "data" in overrides and overrides["data"] != pred.config.data:
        # a new source: keep none of the old source's column and file options unless given again
        for k in ("text_column", "text_pair_column", "label_column", "dev_file", "test_file", "glue_task"):
            overrides.setdefault(k, None)
    cfg = dataclasses.replace(pred.config, **overrides)
    data = _load_data(cfg)
    split = data.dev if args.split == "dev" else data.test
    if split is None:
        raise DataError(f"{cfg.data} has no labelled {args.split} split; pass --{args.split}-file")
    metrics = pred.evaluate(split, data.label_names)
    if args.json:
        print_json({"split": args.split, "examples": len(split), **metrics})
    else:
        print(
            f"{args.split} ({len(split)} examples): "
            f"{metric_line(metrics, pred.task.get('metric') or next(iter(metrics)))}"
        )
        warning = single_class_warning(metrics)
        if warning:
            print(f"warning: {warning}")
    return 0


def predict(args: argparse.Namespace) -> int:
    from adaptune.predict import Predictor

    if args.texts:
        lines = list(args.texts)
    else:
        src = args.file or "-"
        try:
            lines = (read_stdin() if src == "-" else Path(src).read_text(encoding="utf-8")).splitlines()
        except FileNotFoundError:
            raise DataError(f"file {src} does not exist") from None
        except UnicodeDecodeError:
            raise DataError(f"{src} is not UTF-8 text; re-encode it as UTF-8") from None
        lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise DataError("no texts to predict: pass them as arguments, with --file, or on standard input")
    if args.also:
        return _predict_many(args, lines)
    pred = Predictor(args.run, device=args.device)
    pairs = None
    if pred.task["task_type"] == "multiple-choice":  # QUESTION<tab>CHOICE<tab>CHOICE...
        split = [ln.split(args.pair_sep) for ln in lines]
        if any(len(s) < 3 for s in split):
            raise DataError(
                "this task chooses between answers: write each line as the question and two or more choices, "
                "separated by tabs (or --pair-sep)"
            )
        lines, pairs = [s[0] for s in split], [s[1:] for s in split]
    elif pred.task["text_pair"]:
        split = [ln.split(args.pair_sep, 1) for ln in lines]
        if any(len(s) != 2 for s in split):
            raise DataError(
                "this task takes text pairs: separate the two texts of each line with a tab (or --pair-sep)"
            )
        lines, pairs = [s[0] for s in split], [s[1] for s in split]
    _print_predictions(pred.predict(lines, pairs), args.json)
    return 0


def _predict_many(args: argparse.Namespace, lines: list[str]) -> int:
    from adaptune.multitask import MultiTaskPredictor
    from adaptune.runs import name_runs

    pred = MultiTaskPredictor(name_runs([args.run, *args.also]), device=args.device)
    tasks, texts, pairs = [], [], []
    for n, line in enumerate(lines, 1):
        fields = line.split(args.pair_sep)
        task = pred.tasks.get(fields[0])
        choice = task is not None and task["task_type"] == "multiple-choice"
        if task is None or (len(fields) < 4 if choice else len(fields) != (3 if task["text_pair"] else 2)):
            sep = "<tab>" if args.pair_sep == "\t" else args.pair_sep
            raise DataError(
                f"line {n}: expected TASK{sep}TEXT (a pair or QA task: TASK{sep}TEXT{sep}PAIR; multiple choice: "
                f"TASK{sep}QUESTION{sep}CHOICE{sep}CHOICE...) with TASK one of {', '.join(pred.tasks)}; "
                f"got {line[:60]!r}"
            )
        tasks.append(fields[0])
        texts.append(fields[1])
        pairs.append(fields[2:] if choice else fields[2] if len(fields) == 3 else None)
    _print_predictions(pred.predict(texts, tasks, pairs), args.json)
    return 0


def _print_predictions(rows: list[dict], as_json: bool) -> None:
    for row in rows:
        task = f"{row['task']}\t" if "task" in row else ""
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
        elif "choices" in row:  # multiple choice: the chosen answer and its probability
            k = row["answer"]
            print(f"{task}{row['choices'][k]}\t{row['probabilities'][k]:.3f}\t{row['text']}")
        elif "answer" in row:  # extractive QA: the answer (or none) and its score
            found = row["answer"] if row["answer"] is not None else "(no answer)"
            print(f"{task}{found}\t{row.get('score', float('nan')):.3f}\t{row['text']}")
        elif "score" in row:
            print(f"{task}{row['score']:.4f}\t{row['text']}")
        elif "entities" in row:  # token classification with span tags: TYPE:text[start:end] ...
            found = " ".join(f"{e['type']}:{e['text']}[{e['start']}:{e['end']}]" for e in row["entities"])
            print(f"{task}{found or '(no entity)'}\t{row['text']}")
        elif "tokens" in row:  # token classification with a tag per token: word/TAG ...
            print(f"{task}{' '.join(t['text'] + '/' + t['tag'] for t in row['tokens'])}")
        elif "labels" in row:  # multi-label: each predicted label with its probability
            chosen = ",".join(f"{n}:{row['probabilities'][n]:.3f}" for n in row["labels"]) or "(none)"
            print(f"{task}{chosen}\t{row['text']}")
        else:
            print(f"{task}{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{row['text']}")


def demo(args: argparse.Namespace) -> int:
    from adaptune.training.train import TrainConfig, train as run_train

    out = Path(args.output)
    common = dict(limit_train=args.limit_train, epochs=args.epochs, max_length=args.max_length)
    print(
        f"Houlsby adapter (m=64) vs full fine-tuning: all-MiniLM-L6-v2 on the embedded fine-food reviews "
        f"(a subset of {args.limit_train} training reviews, at most {args.max_length} tokens each, {args.epochs} "
        "epochs), 2 runs",
        flush=True,
    )
    results = {}
    for strategy in ("adapters", "full"):
        cfg = TrainConfig(strategy=strategy, **common)
        run = out / strategy
        saved = run / "config.json"
        resume = saved.is_file()
        if resume and json.loads(saved.read_text(encoding="utf-8"))["train"] != cfg.to_dict():
            raise ConfigError(f"{run} holds a run with other settings; pass another --output")
        results[strategy] = run_train(cfg, run, resume=resume, quiet=args.quiet)
    metric = results["adapters"]["metric"]
    print()
    print(
        f"| strategy | trained parameters | % of model | dev {metric} | test {metric} | test MCC | test accuracy | "
        "train time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, r in results.items():
        p, t = r["params"], r["test"]
        print(
            f"| {'Houlsby adapter m=64' if strategy == 'adapters' else 'full fine-tuning'} | {p['trainable']:,} | "
            f"{p['percent_trained']:.2f} % | {r['dev'][metric]:.4f} | {t[metric]:.4f} | {t['mcc']:.4f} | "
            f"{t['accuracy']:.4f} | "
            f"{r['train_seconds']:.0f} s |"
        )
    test = results["adapters"]["test"]
    print(f"| majority-class baseline | 0 | 0.00 % | | | 0.0000 | {test['majority_baseline']:.4f} | |")
    gap = results["full"]["dev"][metric] - results["adapters"]["dev"][metric]
    print(
        f"\nadapter vs full on dev: {-gap:+.4f} {metric}, training "
        f"{results['adapters']['params']['percent_trained']:.2f} % "
        f"of the parameters; positive class {results['adapters'].get('positive_label')!r}. "
        f'Runs in {out}/ (predict with: adaptune predict {out}/adapters "Great coffee!")'
    )
    for warning in (w for r in results.values() for w in r.get("warnings", [])):
        print(f"warning: {warning}")
    for note in results["adapters"].get("notes", []):
        print(f"note: {note}")
    return 0


def compare(args: argparse.Namespace) -> int:
    from adaptune.experiments.compare import CompareConfig, compare as run_compare
    from adaptune.training.train import TrainConfig

    grid = {
        k: tuple(getattr(args, k))
        for k in ("methods", "sizes", "top_ks", "lr_factors", "seeds", "init_stds")
        if getattr(args, k) is not None
    }
    cfg = CompareConfig(
        tasks=tuple(args.tasks),
        ablation=args.ablation,
        budget_minutes=args.budget_minutes,
        train=config_from(args, TrainConfig),
        **grid,
    )
    report = run_compare(cfg, args.output, quiet=args.quiet, plots=args.plots, log=lambda m: print(m, flush=True))
    print()
    print(report["table"])
    print()
    for line in report["findings"] + report["notes"]:
        print(f"- {line}")
    print(
        f"\nreports in {args.output}/: results.md, results.csv, summary.csv, results.json"
        + (", " + ", ".join(Path(f).name for f in report["figures"]) if report["figures"] else "")
    )
    return 0


# ---------------------------------------------------------------------------------------- causal LMs
