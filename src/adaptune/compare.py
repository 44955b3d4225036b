"""``adaptune compare``: the paper's experiments on your own tasks (Houlsby et al. 2019, §3).

A grid of strategies — full fine-tuning, top-k layers, layer norms only, head only, and adapters
(houlsby / pfeiffer / parallel) of several sizes — each over a small learning-rate grid and one
or more seeds. As in the paper, each strategy's configuration is chosen on dev and reported on
test. Two robustness sweeps (initialisation scale and adapter size, §3.6) and the layer
ablation of Figure 6 come with it.

Every grid point is an ordinary run folder of :func:`adaptune.train.train` under
``OUTPUT/TASK/POINT``; a finished point has its ``metrics.json`` and is never trained again, an
unfinished one is resumed. So an interrupted compare picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.errors import ConfigError
from adaptune.train import DEFAULT_LR, TrainConfig, train

ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
BASELINES = ("full", "top-k", "layernorm", "head")


@dataclass(frozen=True)
class GridPoint:
    """One training run of the grid."""

    method: str  # "full", "top-k", "layernorm", "head", or an adapter placement
    lr: float
    seed: int
    size: int | None = None  # adapters
    top_k: int | None = None  # top-k
    init_std: float = 1e-2  # adapters
    sweep: str = "main"  # "main", or the robustness sweep it belongs to: "init", "size"

    @property
    def label(self) -> str:
        """The strategy as reported: ``houlsby-64``, ``top-2``, ``full``."""
        if self.method in ADAPTER_PLACEMENTS:
            return f"{self.method}-{self.size}"
        return f"top-{self.top_k}" if self.method == "top-k" else self.method

    @property
    def folder(self) -> str:
        init = f"_init{self.init_std:g}" if self.method in ADAPTER_PLACEMENTS and self.init_std != 1e-2 else ""
        return f"{self.label}{init}_lr{self.lr:g}_seed{self.seed}"

    def train_config(self, base: TrainConfig) -> TrainConfig:
        if self.method in ADAPTER_PLACEMENTS:
            return dataclasses.replace(
                base,
                strategy="adapters",
                adapter=self.method,
                adapter_size=self.size,
                init_std=self.init_std,
                lr=self.lr,
                seed=self.seed,
            )
        return dataclasses.replace(base, strategy=self.method, top_k=self.top_k, lr=self.lr, seed=self.seed)


@dataclass(frozen=True)
class CompareConfig:
    """What ``adaptune compare`` runs.

    Args:
        tasks: data sources, one adapter per task on the one base model (``"reviews"`` = embedded).
        methods: strategies and adapter placements to compare.
        sizes: adapter sizes m (of every placement unless ``other_sizes`` is given).
        other_sizes: sizes of the pfeiffer and parallel placements, when they differ from ``sizes``.
        top_ks: k values of top-k fine-tuning.
        lr_factors: learning rates tried, as factors of each strategy's default rate.
        seeds: seeds; a configuration's score is the mean over them.
        init_stds: the initialisation sweep (houlsby, size 64 or the nearest size in the grid).
        ablation: compute the layer-span ablation of the best Houlsby adapter.
        budget_minutes: shrink the grid and data to fit (estimated from a timed calibration).
        train: the shared training settings (model, epochs, batch, max_length, limits, ...).
    """

    tasks: tuple[str, ...] = ("reviews",)
    methods: tuple[str, ...] = BASELINES + ADAPTER_PLACEMENTS
    sizes: tuple[int, ...] = (8, 64, 256)
    other_sizes: tuple[int, ...] | None = None
    top_ks: tuple[int, ...] = (1, 2, 3)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    seeds: tuple[int, ...] = (0,)
    init_stds: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    ablation: bool = True
    budget_minutes: float | None = None
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if self.other_sizes is not None:
            object.__setattr__(self, "other_sizes", tuple(self.other_sizes))
        for f in ("tasks", "methods", "sizes", "top_ks", "lr_factors", "seeds", "init_stds"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
            if not getattr(self, f) and f not in ("init_stds",):
                raise ConfigError(f"compare needs at least one value in {f}")
        unknown = [m for m in self.methods if m not in BASELINES + ADAPTER_PLACEMENTS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(BASELINES + ADAPTER_PLACEMENTS)}")
        if len({Path(t).stem if t != "reviews" else t for t in self.tasks}) != len(self.tasks):
            raise ConfigError("two tasks have the same name; give each task its own file or folder name")

    @property
    def init_size(self) -> int:
        """Adapter size of the init sweep: the grid's size nearest the paper's usual 64."""
        return min(self.sizes, key=lambda m: abs(m - 64))

    def grid(self) -> list[GridPoint]:
        """Every run: the main grid, then the robustness sweeps (points shared with the main grid once)."""
        points: list[GridPoint] = []
        for method in self.methods:
            for factor in self.lr_factors:
                for seed in self.seeds:
                    lr = _round_lr(DEFAULT_LR["adapters" if method in ADAPTER_PLACEMENTS else method] * factor)
                    if method in ADAPTER_PLACEMENTS:
                        sizes = self.sizes if method == "houlsby" or self.other_sizes is None else self.other_sizes
                        points += [GridPoint(method, lr, seed, size=m) for m in sizes]
                    elif method == "top-k":
                        points += [GridPoint(method, lr, seed, top_k=k) for k in self.top_ks]
                    else:
                        points.append(GridPoint(method, lr, seed))
        if "houlsby" in self.methods:
            size = self.init_size
            lr = _round_lr(DEFAULT_LR["adapters"])
            for std in self.init_stds:
                for seed in self.seeds:
                    p = GridPoint("houlsby", lr, seed, size=size, init_std=std, sweep="init")
                    if dataclasses.replace(p, sweep="main") not in points:
                        points.append(p)
        return points


def _round_lr(lr: float) -> float:
    return float(f"{lr:.2g}")


def task_name(source: str) -> str:
    return source if source == "reviews" else Path(source.rstrip("/")).stem or "task"


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
    from adaptune.checkpoint import atomic_write_text

    atomic_write_text(path, buf.getvalue())


def write_json(obj: Any, path: Path) -> None:
    from adaptune.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---- the time budget ---------------------------------------------------------------------------

# Cost of one training step relative to full fine-tuning, from the FLOP count: with frozen base
# weights the backward pass needs activation gradients but no weight gradients (about 2/3 of a full
# step); head-only training needs no backward through the encoder at all.
_RELATIVE_STEP = {"full": 1.0, "layernorm": 0.72, "head": 0.4, "adapters": 0.8}


def _step_cost(point: GridPoint, num_layers: int) -> float:
    if point.method == "top-k":
        return 0.4 + 0.6 * point.top_k / num_layers
    return _RELATIVE_STEP["adapters" if point.method in ADAPTER_PLACEMENTS else point.method]


@dataclass(frozen=True)
class Timing:
    """What the budget needs to know: measured seconds per padded token of a full fine-tuning
    step, the untruncated token lengths of the first task's training texts, and sizes per task."""

    seconds_per_token: float
    lengths: tuple[int, ...]
    sizes: dict[str, tuple[int, int, int]]  # task -> (train, dev, test)
    num_layers: int

    def full_step(self, batch_size: int, max_length: int, bucketed: bool = False) -> float:
        truncated = [min(n, max_length) for n in self.lengths]
        if bucketed:  # bucketing keeps padding low: about 10 % over the mean truncated length
            return self.seconds_per_token * batch_size * statistics.fmean(truncated) * 1.1
        # random batches pad to their longest example: its expected length, from seeded draws
        rng = random.Random(0)
        longest = statistics.fmean(max(rng.choices(truncated, k=batch_size)) for _ in range(200))
        return self.seconds_per_token * batch_size * longest


def estimate_minutes(cfg: CompareConfig, timing: Timing) -> float:
    """Predicted wall time of the grid.

    Evaluation (dev after every epoch, test once at the end) is a forward pass: about a third of a
    full step per batch; the ablation is one dev pass per span of layers.
    """
    t = cfg.train
    step = timing.full_step(t.batch_size, t.max_length, t.bucketed)
    total = 0.0
    for task in cfg.tasks:
        n_train, n_dev, n_test = timing.sizes[task]
        n = min(n_train, t.limit_train or n_train)
        n_dev, n_test = (min(x, t.limit_eval or x) for x in (n_dev, n_test))
        steps = math.ceil(n / t.batch_size) * t.epochs
        eval_batches = (n_dev * t.epochs + n_test) / t.batch_size
        for point in cfg.grid():
            total += step * (steps * _step_cost(point, timing.num_layers) + eval_batches / 3)
        if cfg.ablation:
            spans = timing.num_layers * (timing.num_layers + 1) / 2
            total += spans * n_dev / t.batch_size * step / 3
    return total / 60.0


def fit_budget(cfg: CompareConfig, minutes: float, timing: Timing) -> tuple[CompareConfig, list[str]]:
    """Shrink the grid, then the data, until the estimate fits ``minutes``; say what was cut."""
    notes: list[str] = []
    shrinks = [
        ("one seed", lambda c: dataclasses.replace(c, seeds=c.seeds[:1])),
        ("pfeiffer and parallel adapters at size 64 only", lambda c: dataclasses.replace(c, other_sizes=(64,))),
        (
            "init sweep 1e-3, 1e-2, 1e-1",
            lambda c: dataclasses.replace(c, init_stds=tuple(s for s in c.init_stds if s >= 1e-3)),
        ),
        (
            "top-k for k in 1 and half the layers",
            lambda c: dataclasses.replace(c, top_ks=tuple(sorted({1, max(1, timing.num_layers // 2)}))),
        ),
        (
            "the default learning rate of each strategy only (no lr grid)",
            lambda c: dataclasses.replace(c, lr_factors=(1.0,)),
        ),
        # Short runs learn from updates, not from examples: halve the batch before cutting data.
        (
            "batches of 16 (twice the updates for the same compute)",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, batch_size=min(16, c.train.batch_size))
            ),
        ),
        (
            "texts cut to 64 tokens",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, max_length=min(64, c.train.max_length))
            ),
        ),
        (
            "dev and test limited to 500 examples",
            lambda c: dataclasses.replace(
                c, train=dataclasses.replace(c.train, limit_eval=min(500, c.train.limit_eval or 500))
            ),
        ),
        (
            "2 epochs",
            lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=min(2, c.train.epochs))),
        ),
    ]
    for what, shrink in shrinks:
        if estimate_minutes(cfg, timing) <= minutes:
            break
        smaller = shrink(cfg)
        if smaller != cfg:
            cfg = smaller
            notes.append(f"budget: {what}")
    largest = max(timing.sizes[t][0] for t in cfg.tasks)
    limit = cfg.train.limit_train or largest
    while estimate_minutes(cfg, timing) > minutes and limit > 400:
        limit = max(400, limit * 4 // 5)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, limit_train=limit))
    if cfg.train.limit_train and cfg.train.limit_train < largest:
        notes.append(f"budget: training data limited to {cfg.train.limit_train} examples per task")
    est = estimate_minutes(cfg, timing)
    step = timing.full_step(cfg.train.batch_size, cfg.train.max_length, cfg.train.bucketed)
    notes.append(
        f"budget: {minutes:g} min; estimated {est:.0f} min for {len(cfg.grid()) * len(cfg.tasks)} runs "
        f"(from a measured full fine-tuning step of {step:.2f} s)"
    )
    return cfg, notes


def calibrate(cfg: CompareConfig) -> Timing:
    """Time a few full fine-tuning steps on real batches of the first task (the first one warms up)."""
    from adaptune.architectures import layer_list, spec_for
    from adaptune.data import bucket_batches, collate, encode
    from adaptune.models import load_tokenizer
    from adaptune.train import _load_data, build_model, make_optimizer, training_step

    sizes = {}
    for task in cfg.tasks:
        data = _load_data(dataclasses.replace(cfg.train, data=task, limit_train=None, limit_eval=None))
        sizes[task] = (len(data.train), len(data.dev), len(data.test) if data.test is not None else 0)
        if task == cfg.tasks[0]:
            first = data
    tcfg = dataclasses.replace(cfg.train, data=cfg.tasks[0], strategy="full")
    tok = load_tokenizer(tcfg.model)
    raw_lengths = tuple(len(e["input_ids"]) for e in encode(first.train, tok, 100_000))
    enc = encode(first.train, tok, tcfg.max_length)
    num_labels = 1 if first.task_type == "regression" else len(first.label_names)
    model, _ = build_model(tcfg, num_labels)
    model.train()
    lengths = [len(e["input_ids"]) for e in enc]
    batches = bucket_batches(lengths, tcfg.batch_size, shuffle=True, seed=0)
    optimizer, scheduler = make_optimizer(model, tcfg, 100)
    seconds, tokens = 0.0, 0
    for i, idx in enumerate(batches[:6]):
        t0 = time.perf_counter()
        training_step(
            model,
            collate([enc[j] for j in idx], tok.pad_token_id),
            optimizer,
            scheduler,
            task_type=first.task_type,
            max_grad_norm=tcfg.max_grad_norm,
        )
        if i:
            seconds += time.perf_counter() - t0
            tokens += max(lengths[j] for j in idx) * len(idx)  # padded tokens: what a batch really costs
    return Timing(seconds / tokens, raw_lengths, sizes, len(layer_list(model, spec_for(model))))


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
    from adaptune.checkpoint import atomic_write_text

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
    from adaptune import plots as P

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
    from adaptune.ablation import span_ablation
    from adaptune.train import TrainConfig, _load_data

    run = Path(chosen["runs"][0])
    tcfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text(encoding="utf-8"))["train"])
    data = _load_data(tcfg)
    log(f"ablation of {chosen['label']} on {task_name(task)}: removing the adapters of every layer span ...")
    result = span_ablation(run, data.dev, data.label_names, device=cfg.train.device)
    result["adapter"] = chosen["label"]
    write_json(result, cache)
    return result


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


def _config_to_dict(cfg: CompareConfig) -> dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "train"}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    d["train"] = cfg.train.to_dict()
    return d


def _config_from_dict(d: dict[str, Any]) -> CompareConfig:
    d = dict(d)
    d["train"] = TrainConfig.from_dict(d["train"])
    return CompareConfig(**d)
