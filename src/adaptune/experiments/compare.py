"""``adaptune compare``: the paper's experiments on your own tasks (Houlsby et al. 2019, §3).

A grid of strategies — full fine-tuning, top-k layers, layer norms only, head only, and adapters
(houlsby / pfeiffer / parallel) of several sizes — each over a small learning-rate grid and one
or more seeds. As in the paper, each strategy's configuration is chosen on dev and reported on
test. Two robustness sweeps (initialisation scale and adapter size, §3.6) and the layer
ablation of Figure 6 come with it.

Every grid point is an ordinary run folder of :func:`adaptune.training.train.train` under
``OUTPUT/TASK/POINT``; a finished point has its ``metrics.json`` and is never trained again, an
unfinished one is resumed. So an interrupted compare picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from adaptune.errors import ConfigError
from adaptune.training.train import DEFAULT_LR, TrainConfig, train

# the parts, importable from here as before
from adaptune.experiments.budget import Timing, calibrate, estimate_minutes, fit_budget
from adaptune.experiments.config import ADAPTER_PLACEMENTS, BASELINES, CompareConfig, GridPoint, _round_lr, task_name
from adaptune.experiments.report import (
    markdown_table,
    select_best,
    summary,
    total_params_multiplier,
    write_csv,
    write_json,
    _findings,
)


def run_grid(cfg: CompareConfig, output: str | os.PathLike, *, quiet: bool = False, log=print) -> list[dict[str, Any]]:
    """Train every grid point of every task that has no finished run yet; return one row per run."""
    out = Path(output)
    points = cfg.grid()
    todo = [(t, p) for t in cfg.tasks for p in points]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    trained = 0
    for n, (task, point) in enumerate(todo, 1):
        run = out / task_name(task) / point.folder
        tcfg = point.train_config(dataclasses.replace(cfg.train, data=task))
        finished = (run / "metrics.json").is_file()
        if not finished:
            elapsed = time.perf_counter() - started
            eta = "" if not trained else f", about {_minutes(elapsed / trained * (len(todo) - n + 1))} left"
            log(
                f"[{n}/{len(todo)}] {task_name(task)}: {point.label} lr {point.lr:g} seed {point.seed}"
                f"{' init ' + format(point.init_std, 'g') if point.sweep == 'init' else ''}{eta}"
            )
        result = train(tcfg, run, resume=(run / "config.json").is_file(), quiet=quiet)
        if not finished:
            trained += 1
        rows.append(_row(task, point, result, run))
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _row(task: str, point: GridPoint, result: dict, run: Path) -> dict[str, Any]:
    metric = result["metric"]
    return {
        "task": task_name(task),
        "label": point.label,
        "method": point.method,
        "size": point.size,
        "top_k": point.top_k,
        "init_std": point.init_std,
        "sweep": point.sweep,
        "lr": point.lr,
        "seed": point.seed,
        "metric": metric,
        "dev": result["dev"][metric],
        "test": result["test"][metric] if result.get("test") else None,
        "trainable": result["params"]["trainable"],
        "base": result["params"]["base"],
        "percent": result["params"]["percent_trained"],
        "train_seconds": result["train_seconds"],
        "run": str(run),
    }


# ---- the time budget ---------------------------------------------------------------------------


def compare(
    cfg: CompareConfig, output: str | os.PathLike, *, quiet: bool = False, plots: bool = True, log=print
) -> dict[str, Any]:
    """Run the whole comparison and write ``results.md``, ``results.csv``, ``results.json`` and plots.

    Args:
        cfg: grid, tasks and shared training settings.
        output: folder for every run and the reports (re-running continues an interrupted compare).
        quiet: no per-run progress bars.
        plots: write the PNG figures (needs matplotlib).
        log: where progress lines go.

    Returns:
        ``{"summary": rows per strategy, "best": per task, "runs": every run, "ablation": ..., "notes": [...]}``.
    """
    for task in cfg.tasks:
        if dataclasses.replace(cfg.train, data=task).causal:
            raise ConfigError(
                f"compare runs classification and regression tasks; {task!r} is chat data for a causal LM: "
                "train it with 'adaptune train' (base vs adapted perplexity is reported there)"
            )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg, notes = _plan(cfg, out, log)
    for note in notes:
        log(note)
    rows = run_grid(cfg, out, quiet=quiet, log=log)
    best = select_best(rows)
    summ = summary(best, len(cfg.tasks))
    tasks = [task_name(t) for t in cfg.tasks]
    metric = rows[0]["metric"]
    ablations = {}
    if cfg.ablation:
        for task in cfg.tasks:
            ablations[task_name(task)] = _ablation(cfg, task, best, out, log)
    table = markdown_table(summ, metric, len(cfg.tasks), tasks)
    findings = _findings(summ, metric)
    report = {
        "summary": summ,
        "best": best,
        "runs": rows,
        "ablation": ablations,
        "notes": notes,
        "findings": findings,
        "config": _config_to_dict(cfg),
    }
    write_json(report, out / "results.json")
    write_csv(rows, out / "results.csv")
    write_csv(summ, out / "summary.csv")
    figures = _figures(cfg, tasks, rows, best, ablations, out) if plots else []
    md = [
        f"# adaptune compare: {', '.join(tasks)}",
        "",
        table,
        "",
        *[f"- {f}" for f in findings],
        *[f"- {n}" for n in notes],
    ]
    md += ["", *[f"![{p.stem}]({p.name})" for p in figures]]
    from adaptune.training.checkpoint import atomic_write_text

    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    report["table"] = table
    report["figures"] = [str(p) for p in figures]
    return report


def _plan(cfg: CompareConfig, out: Path, log) -> tuple[CompareConfig, list[str]]:
    """The grid to run and the notes on it: the saved plan of an interrupted compare (whatever the
    machine's speed now), else ``cfg`` fitted to its budget, saved as the plan."""
    plan = out / "plan.json"
    if plan.is_file():
        saved = json.loads(plan.read_text(encoding="utf-8"))
        log(f"continuing the compare in {out}")
        return _config_from_dict(saved["config"]), saved["notes"]
    notes: list[str] = []
    if cfg.budget_minutes is not None:
        log("timing one training step to fit the budget ...")
        cfg, notes = fit_budget(cfg, cfg.budget_minutes, calibrate(cfg))
    write_json({"config": _config_to_dict(cfg), "notes": notes}, plan)
    return cfg, notes


def _figures(cfg: CompareConfig, tasks: list[str], rows: list[dict], best: list[dict], ablations: dict, out: Path):
    """The PNG figures: quality vs trained parameters and the ablation per task, and robustness."""
    from adaptune.experiments import plots as P

    figures = []
    model = Path(cfg.train.model).name if cfg.train.model != "minilm" else "all-MiniLM-L6-v2"
    for task in tasks:
        tb = [r for r in best if r["task"] == task]
        suffix = "" if len(tasks) == 1 else f"_{task}"
        figures.append(
            P.quality_vs_params(tb, out / f"quality_vs_params{suffix}.png", f"Quality vs trained parameters: {task}")
        )
        if ablations.get(task):
            figures.append(
                P.ablation_heatmap(
                    ablations[task],
                    out / f"ablation{suffix}.png",
                    f"Adapters removed from layers [first..last]: {task}",
                )
            )
    if "houlsby" in cfg.methods:
        figures.append(
            P.robustness(
                rows,
                out / "robustness.png",
                f"Robustness of Houlsby adapters: {', '.join(tasks)} — {model}",
                cfg.init_size,
                _round_lr(DEFAULT_LR["adapters"]),
            )
        )
    return figures


def _ablation(cfg: CompareConfig, task: str, best: list[dict[str, Any]], out: Path, log) -> dict[str, Any] | None:
    cands = [r for r in best if r["task"] == task_name(task) and r["method"] == "houlsby"]
    if not cands:
        return None
    chosen = max(cands, key=lambda r: r["dev"])
    cache = out / task_name(task) / f"ablation_{Path(chosen['runs'][0]).name}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    from adaptune.experiments.ablation import span_ablation
    from adaptune.training.train import TrainConfig, _load_data

    run = Path(chosen["runs"][0])
    tcfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text(encoding="utf-8"))["train"])
    data = _load_data(tcfg)
    log(f"ablation of {chosen['label']} on {task_name(task)}: removing the adapters of every layer span ...")
    result = span_ablation(run, data.dev, data.label_names, device=cfg.train.device)
    result["adapter"] = chosen["label"]
    write_json(result, cache)
    return result


def _config_to_dict(cfg: CompareConfig) -> dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "train"}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    d["train"] = cfg.train.to_dict()
    return d


def _config_from_dict(d: dict[str, Any]) -> CompareConfig:
    d = dict(d)
    d["train"] = TrainConfig.from_dict(d["train"])
    return CompareConfig(**d)


__all__ = [
    "ADAPTER_PLACEMENTS",
    "BASELINES",
    "CompareConfig",
    "GridPoint",
    "Timing",
    "calibrate",
    "compare",
    "estimate_minutes",
    "fit_budget",
    "markdown_table",
    "run_grid",
    "select_best",
    "summary",
    "task_name",
    "total_params_multiplier",
    "write_csv",
    "write_json",
]
