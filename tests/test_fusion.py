"""AdapterFusion: attention over frozen task adapters, trained, saved and reloaded exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_batch, tiny_model, write_reviews_csv

from adaptune import (
    AdapterConfig,
    AdapterFileError,
    ConfigError,
    add_adapter,
    load_adapter,
    remove_adapter,
    save_adapter,
    set_active,
    train_strategy,
)
from adaptune.core.fusion import fusion_regularization
from adaptune.core.inject import add_fusion
from adaptune.training.config import TrainConfig
from adaptune.training.train import train


def _hidden(model):
    with torch.no_grad():
        return model(**tiny_batch(), output_hidden_states=True).hidden_states[-1]


def _three(preset, **kw):
    model = tiny_model("bert")
    a = add_adapter(model, "a", AdapterConfig.preset(preset, size=4, init_std=0.2, **kw))
    for n in ("b", "c"):
        add_adapter(model, n, AdapterConfig.preset(preset, size=4, init_std=0.2, **kw))
    return model, a


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer"])
def test_a_fusion_of_identical_adapters_is_that_adapter(preset):
    """The attention weights sum to 1 and V starts as the identity: fusing three copies of one
    adapter gives that adapter's output, whatever the query and key weights."""
    model, a = _three(preset, train_layer_norms=False, train_head=False, train_pooler=False)
    for n in ("b", "c"):
        model.adaptune.sets[n].load_state_dict(a.state_dict())
    set_active(model, "a")
    alone = _hidden(model)
    plain = AdapterConfig(train_layer_norms=False, train_head=False, train_pooler=False)
    f = add_fusion(model, "f", ["a", "b", "c"], plain)
    with torch.no_grad():
        for layer in f.fusion_layers():
            layer.query.weight.normal_(0, 0.5)
            layer.key.weight.normal_(0, 0.5)
    torch.testing.assert_close(_hidden(model), alone, rtol=0, atol=1e-5)


def test_only_the_fusion_and_its_head_train():
    model, _ = _three("pfeiffer")
    f = add_fusion(model, "f", ["a", "b", "c"])
    train_strategy(model, "adapters")
    assert all(not p.requires_grad for n in "abc" for p in model.adaptune.sets[n].parameters())
    assert fusion_regularization(model).item() == 0.0  # V starts at the identity
    model(**tiny_batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert all(p.grad is None for n in "abc" for p in model.adaptune.sets[n].parameters())
    assert f.fusion_layers()[0].query.weight.grad is not None and f.head.classifier.weight.grad is not None
    with torch.no_grad():
        f.fusion_layers()[0].value.weight.add_(0.1)
    assert fusion_regularization(model).item() > 0


def test_a_fusion_reloads_exactly_and_carries_its_adapters(tmp_path):
    model, _ = _three("houlsby")
    f = add_fusion(model, "f", ["a", "b", "c"])
    with torch.no_grad():
        for p in f.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = _hidden(model)
    save_adapter(model, "f", tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f" / "fused").iterdir()) == ["a", "b", "c"]
    fresh = tiny_model("bert")
    assert load_adapter(fresh, tmp_path / "f") == "f"
    assert set(fresh.adaptune.sets) == {"a", "b", "c", "f"}
    assert torch.equal(_hidden(fresh), before)
    # without the embedded adapters, and without them on the model: refused, nothing left behind
    import shutil

    shutil.rmtree(tmp_path / "f" / "fused" / "c")
    bare = tiny_model("bert")
    with pytest.raises(AdapterFileError, match="references adapter 'c'"):
        load_adapter(bare, tmp_path / "f")
    assert not getattr(bare, "adaptune", None) or not len(bare.adaptune.sets)


def test_fusion_refusals():
    model, _ = _three("houlsby")
    with pytest.raises(ConfigError, match=r"no such adapters on this model.*\['z'\]|\['z'\]"):
        add_fusion(model, "f", ["a", "z"])
    add_fusion(model, "f", ["a", "b"])
    with pytest.raises(ConfigError, match="fused by"):
        remove_adapter(model, "a")
    with pytest.raises(ConfigError, match="per-row routing"):
        set_active(model, ["f", "c", "f"])
    with pytest.raises(ConfigError, match="at least two"):
        AdapterConfig(fuse=("a",))
    add_adapter(model, "p", AdapterConfig.preset("parallel", size=4))
    with pytest.raises(ConfigError, match="only sequential adapters fuse"):
        add_adapter(model, "g", AdapterConfig.preset("houlsby", size=4, fuse=("a", "p")))
    from adaptune import Stack, save_adapterhub

    with pytest.raises(ConfigError, match="is a fusion"):
        set_active(model, Stack("a", "f"))
    with pytest.raises(AdapterFileError, match="is an AdapterFusion"):
        save_adapterhub(model, "f", "never-written")
    add_adapter(model, "one", AdapterConfig.preset("houlsby-ffn", size=4))
    with pytest.raises(ConfigError, match="other sub-layers"):
        add_fusion(model, "h", ["a", "one"])


def _tiny(model_dir) -> dict:
    """TrainConfig fields of a one-epoch run of the tiny BERT on a reviews CSV."""
    return dict(
        model=str(model_dir),
        text_column="review",
        label_column="score",
        epochs=1,
        batch_size=8,
        max_length=24,
        lr=3e-3,
        device="cpu",
    )


def test_fuse_command_trains_and_eval_reproduces_the_dev_metric(tiny_model_dir, tmp_path):
    """Two adapter runs, a fusion of them on a third task; a reload (``adaptune eval``) gives the
    run's own dev metric exactly (AdapterHub users report gaps after reloading a fusion)."""
    runs = []
    for seed in (0, 1):
        data = write_reviews_csv(tmp_path / f"d{seed}.csv", n=40, seed=seed)
        train(TrainConfig(data=str(data), seed=seed, **_tiny(tiny_model_dir)), tmp_path / f"r{seed}", quiet=True)
        runs.append(tmp_path / f"r{seed}")
    data = write_reviews_csv(tmp_path / "target.csv", n=48, seed=7, classes=3)
    common = [
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "24",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--quiet",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "fuse", "--adapters", *runs, "-o", tmp_path / "f", *map(str, common)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert (tmp_path / "f" / "adapter" / "fused" / "r0").is_dir()
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "eval", tmp_path / "f", "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    metric = metrics["metric"]
    assert again[metric] == metrics["dev"][metric]
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "predict", tmp_path / "f", "tasty and fresh", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[0])["label"] in ("good", "bad", "meh")
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "predict", tmp_path / "f", "--also", runs[0]],
        input="f\ttasty\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr  # served beside one of the adapters it fuses
    assert done.stdout.startswith("f\t") and done.stdout.split("\t")[1] in ("good", "bad", "meh")


def test_head_on_trains_a_new_head_on_a_frozen_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_reviews_csv(tmp_path / "d.csv", n=40)
    common = _tiny(tiny_model_dir)
    train(TrainConfig(data=str(data), **common), tmp_path / "src", quiet=True)
    target = write_reviews_csv(tmp_path / "t.csv", n=48, seed=3, classes=3)
    result = train(TrainConfig(data=str(target), head_on=str(tmp_path / "src"), **common), tmp_path / "h", quiet=True)
    src, new = (load_file(str(tmp_path / r / "adapter" / "adapter.safetensors")) for r in ("src", "h"))
    frozen = [k for k in src if k.startswith(("adapters.", "norms."))]
    assert frozen and all(torch.equal(src[k], new[k]) for k in frozen)
    assert new["head.classifier.weight"].shape[0] == 3 and src["head.classifier.weight"].shape[0] == 2
    assert result["params"]["trainable"] == sum(
        v.numel() for k, v in new.items() if k.startswith(("head.", "pooler."))
    )
    with pytest.raises(ConfigError, match="head_on"):
        TrainConfig(head_on="x", fuse=("a", "b"))
