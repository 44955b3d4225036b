"""adaptune compare: the grid, best-on-dev selection, multi-task report, ablation, resume, plots."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adaptune.experiments import compare as C
from adaptune.experiments.ablation import adapters_removed
from adaptune.cli.parser import main
from adaptune.training.train import TrainConfig

from conftest import tiny_batch, tiny_model, write_reviews_csv


def test_grid_has_every_strategy_lr_and_seed_once():
    cfg = C.CompareConfig(
        methods=("full", "top-k", "houlsby"),
        sizes=(8, 64),
        top_ks=(1, 2),
        lr_factors=(1.0, 3.0),
        seeds=(0, 1),
        init_stds=(1e-3, 1e-2),
    )
    grid = cfg.grid()
    main_grid = [p for p in grid if p.sweep == "main"]
    assert len(main_grid) == (1 + 2 + 2) * 2 * 2  # (full, top-1, top-2, houlsby-8, houlsby-64) x lrs x seeds
    assert len({p.folder for p in grid}) == len(grid)  # every run has its own folder
    # the init sweep reuses the main grid's houlsby-64 at init 1e-2, and adds 1e-3 for each seed
    init = [p for p in grid if p.sweep == "init"]
    assert sorted((p.init_std, p.seed) for p in init) == [(1e-3, 0), (1e-3, 1)]
    assert {p.label for p in main_grid} == {"full", "top-1", "top-2", "houlsby-8", "houlsby-64"}
    with pytest.raises(Exception, match="unknown method"):
        C.CompareConfig(methods=("lora",))


def _row(label, method, lr, seed, dev, test, trainable=10, task="t", sweep="main", size=None):
    return {
        "task": task,
        "label": label,
        "method": method,
        "size": size,
        "top_k": None,
        "init_std": 1e-2,
        "sweep": sweep,
        "lr": lr,
        "seed": seed,
        "metric": "accuracy",
        "dev": dev,
        "test": test,
        "trainable": trainable,
        "base": 1000,
        "percent": trainable / 10,
        "train_seconds": 1.0,
        "run": f"{label}-{lr}-{seed}",
    }


def test_best_configuration_is_chosen_on_dev_mean_over_seeds():
    rows = [
        _row("houlsby-8", "houlsby", 1e-3, 0, dev=0.80, test=0.70),
        _row("houlsby-8", "houlsby", 1e-3, 1, dev=0.90, test=0.72),  # mean dev 0.85
        _row("houlsby-8", "houlsby", 3e-3, 0, dev=0.88, test=0.99),
        _row("houlsby-8", "houlsby", 3e-3, 1, dev=0.80, test=0.99),  # mean dev 0.84: not chosen, whatever its test
        _row("houlsby-8", "houlsby", 1e-2, 0, dev=0.99, test=0.99, sweep="init"),  # sweeps never compete
    ]
    (best,) = C.select_best(rows)
    assert best["lr"] == 1e-3 and best["seeds"] == 2 and best["lrs_tried"] == 2
    assert best["dev"] == pytest.approx(0.85) and best["test"] == pytest.approx(0.71)


def test_total_parameter_multiplier_for_n_tasks():
    # the paper: 17 tasks, adapters 1.14 % -> 1.19x; top layers 52.9 % -> 9.9x; full -> 17x
    assert C.total_params_multiplier(1.14, 17, "houlsby") == pytest.approx(1.19, abs=0.01)
    assert C.total_params_multiplier(52.9, 17, "top-k") == pytest.approx(10.0, abs=0.1)
    assert C.total_params_multiplier(100.0, 17, "full") == 17
    summ = C.summary(
        C.select_best(
            [_row("full", "full", 1e-4, 0, 0.9, 0.9, trainable=1000, task=t) for t in "ab"]
            + [_row("houlsby-8", "houlsby", 1e-3, 0, 0.8, 0.85, trainable=20, task=t) for t in "ab"]
        ),
        2,
    )
    by = {r["label"]: r for r in summ}
    assert by["full"]["total_multiplier"] == 2 and by["houlsby-8"]["total_multiplier"] == pytest.approx(1.04)
    table = C.markdown_table(summ, "accuracy", 2, ["a", "b"])
    assert "| houlsby-8 | 20 | 2.00 % | 1.04× |" in table and "test: a" in table


def test_budget_shrinks_the_grid_then_the_data_and_says_so():
    cfg = C.CompareConfig(train=TrainConfig(epochs=3))
    timing = C.Timing(
        seconds_per_token=1e-3, lengths=tuple(range(20, 220)), sizes={"reviews": (3600, 400, 1000)}, num_layers=6
    )
    full = C.estimate_minutes(cfg, timing)
    # a third of the main grid; the init sweep and the ablation stay
    assert full / 3 < C.estimate_minutes(dataclasses.replace(cfg, lr_factors=(1.0,)), timing) < full / 2
    small, notes = C.fit_budget(cfg, full / 20, timing)
    assert C.estimate_minutes(small, timing) <= full / 20 or small.train.limit_train == 400
    assert small.lr_factors == (1.0,) and any("learning rate" in n for n in notes)
    assert small.train.limit_train is not None and any("limited to" in n and "per task" in n for n in notes)
    assert small.train.max_length == 64 and small.train.batch_size == 16 and small.train.epochs == 2
    unchanged, notes = C.fit_budget(cfg, full * 2, timing)
    assert unchanged == cfg and len(notes) == 1  # only the estimate is reported
    # a shorter max_length is estimated cheaper
    assert timing.full_step(32, 64) < timing.full_step(32, 128)


def test_adapters_removed_bypasses_exactly_those_layers():
    from adaptune import add_adapter

    model = tiny_model("bert")
    add_adapter(model, "t", "houlsby")
    for p in model.adaptune.parameters():
        torch.nn.init.normal_(p, std=0.3)
    b = tiny_batch()
    with torch.no_grad():
        full = model(**b).logits
        with adapters_removed(model, range(4)):
            none = model(**b).logits
            model.adaptune.skip_layers = frozenset()  # the context restores whatever it found
        with adapters_removed(model, [1]):
            one = model(**b).logits
        again = model(**b).logits
    assert not torch.allclose(full, none) and not torch.allclose(full, one) and not torch.allclose(one, none)
    assert torch.equal(full, again)


@pytest.fixture(scope="module")
def tiny_compare(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    a = write_reviews_csv(tmp / "coffee.csv", n=48, seed=1)
    b = write_reviews_csv(tmp / "tea.csv", n=48, seed=2)
    out = tmp / "out"
    args = [
        "compare",
        "--quiet",
        "-o",
        str(out),
        "--tasks",
        str(a),
        str(b),
        "--model",
        str(tiny_model_dir),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--methods",
        "full",
        "top-k",
        "head",
        "houlsby",
        "--sizes",
        "4",
        "8",
        "--top-ks",
        "1",
        "--lr-factors",
        "1",
        "--init-stds",
        "1e-3",
        "1e-2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    return out, args


def test_compare_writes_every_report_and_plot(tiny_compare, capsys):
    out, _ = tiny_compare
    for name in (
        "results.md",
        "results.csv",
        "summary.csv",
        "results.json",
        "quality_vs_params_coffee.png",
        "quality_vs_params_tea.png",
        "ablation_coffee.png",
        "ablation_tea.png",
        "robustness.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp*"))
    report = json.loads((out / "results.json").read_text())
    labels = {r["label"] for r in report["summary"]}
    assert labels == {"full", "top-1", "head", "houlsby-4", "houlsby-8"}
    assert len(report["runs"]) == 2 * (1 + 1 + 1 + 2 + 1)  # per task: 5 main points + 1 init point
    houlsby = next(r for r in report["summary"] if r["label"] == "houlsby-8")
    assert houlsby["total_multiplier"] == pytest.approx(1 + 2 * houlsby["percent"] / 100)
    assert set(houlsby["per_task"]) == {"coffee", "tea"}
    abl = report["ablation"]["coffee"]
    n = abl["layers"]
    assert (
        n == 2
        and abl["scores"][1][0] is None
        and all(abl["scores"][i][j] is not None for i in range(n) for j in range(i, n))
    )
    md = (out / "results.md").read_text()
    assert "| method |" in md and "![quality_vs_params_coffee](quality_vs_params_coffee.png)" in md


def test_an_interrupted_compare_resumes_without_retraining(tiny_compare, monkeypatch):
    out, args = tiny_compare
    runs = sorted(out.glob("*/*/metrics.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    # interrupt: one finished run loses its result and another is half-done (checkpoint only)
    victim = runs[0].parent
    (victim / "metrics.json").unlink()
    calls = []
    real_train = C.train

    def counting_train(cfg, run, **kw):
        if not (run / "metrics.json").is_file():
            calls.append(run)
        return real_train(cfg, run, **kw)

    monkeypatch.setattr(C, "train", counting_train)
    assert main(args) == 0
    assert calls == [victim]  # only the unfinished point trains again
    for p in runs[1:]:
        assert p.stat().st_mtime_ns == stamps[p]
