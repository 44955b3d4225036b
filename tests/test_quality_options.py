"""Honest metrics and the options for imbalanced data: positive class, selection metric, class
weights, and the single-class warning, through the real training loop on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from adaptune import AdapterConfig, add_adapter, load_adapter, save_adapter
from adaptune.cli.commands import _summary
from adaptune.errors import ConfigError
from adaptune.core.io import CONFIG
from adaptune.training.train import TrainConfig, balanced_class_weights, train

from conftest import tiny_model, write_reviews_csv


def _cfg(model_dir, data, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=str(data),
        text_column="review",
        label_column="score",
        epochs=1,
        batch_size=8,
        max_length=16,
        lr=3e-3,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _imbalanced_csv(path, n_good=48, n_bad=16):
    rows = [("this coffee is great tasty", "good")] * n_good + [("this coffee is awful stale", "bad")] * n_bad
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        w.writerows(rows)
    return path


def test_positive_class_defaults_to_the_minority_and_can_be_named(tiny_model_dir, tmp_path):
    data = _imbalanced_csv(tmp_path / "d.csv")  # labels sort as ["bad", "good"]; "bad" is the minority
    r = train(_cfg(tiny_model_dir, data), tmp_path / "a", quiet=True)
    assert r["positive_label"] == "bad"
    assert json.loads((tmp_path / "a" / "task.json").read_text())["positive_label"] == "bad"
    assert r["metric"] == "macro_f1" and {"macro_f1", "mcc", "accuracy", "f1", "majority_baseline"} <= set(
        r["test"] or r["dev"]
    )
    r = train(_cfg(tiny_model_dir, data, positive_label="good"), tmp_path / "b", quiet=True)
    assert r["positive_label"] == "good"


def test_positive_label_and_metric_errors_name_the_choices(tiny_model_dir, tmp_path):
    data = _imbalanced_csv(tmp_path / "d.csv")
    with pytest.raises(ConfigError, match="not a label of this task; its labels are bad, good"):
        train(_cfg(tiny_model_dir, data, positive_label="meh"), tmp_path / "a", quiet=True)
    multi = write_reviews_csv(tmp_path / "m.csv", n=30, classes=3)
    with pytest.raises(ConfigError, match="two-class tasks; this one has 3"):
        train(_cfg(tiny_model_dir, multi, positive_label="good"), tmp_path / "b", quiet=True)
    with pytest.raises(
        ConfigError, match="does not apply to this classification task; choose one of macro_f1, accuracy, mcc$"
    ):
        train(_cfg(tiny_model_dir, multi, metric="f1"), tmp_path / "c", quiet=True)
    with pytest.raises(ConfigError, match="does not apply"):
        train(_cfg(tiny_model_dir, multi, metric="spearman"), tmp_path / "d", quiet=True)
    with pytest.raises(ConfigError, match="unknown selection metric 'auc'"):
        _cfg(tiny_model_dir, multi, metric="auc")
    with pytest.raises(ConfigError, match="class_weights must be one of none, balanced"):
        _cfg(tiny_model_dir, multi, class_weights="inverse")
    assert not any((tmp_path / x).exists() for x in "abcd")  # nothing written for a bad option


def test_selection_metric_decides_the_kept_checkpoint(tiny_model_dir, tmp_path):
    data = write_reviews_csv(tmp_path / "d.csv", n=64)
    r = train(_cfg(tiny_model_dir, data, epochs=3, metric="accuracy"), tmp_path / "acc", quiet=True)
    assert r["metric"] == "accuracy"
    best = max(h["accuracy"] for h in r["history"])
    assert r["dev"]["accuracy"] == best  # the kept weights are the best epoch by the chosen metric


def test_balanced_class_weights():
    w = balanced_class_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    w = balanced_class_weights([0, 2, 2, 2], 3)  # class 1 absent: weight 0, the others share n / (2 · count)
    torch.testing.assert_close(w, torch.tensor([4 / 2, 0.0, 4 / 6]))


def test_class_weights_change_training(tiny_model_dir, tmp_path):
    data = _imbalanced_csv(tmp_path / "d.csv")
    train(_cfg(tiny_model_dir, data), tmp_path / "plain", quiet=True)
    train(_cfg(tiny_model_dir, data, class_weights="balanced"), tmp_path / "weighted", quiet=True)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "weighted" / "adapter" / "adapter.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_model_that_predicts_one_class_is_flagged(tiny_model_dir, tmp_path, capsys):
    """Every text the same: no model can do better than one class, and the run must say so."""
    path = tmp_path / "same.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        w.writerows([("the same words", "good" if i % 3 else "bad") for i in range(48)])
    r = train(_cfg(tiny_model_dir, path), tmp_path / "run", quiet=True)
    assert r["dev"]["predicted_classes"] == 1.0
    assert r["warnings"] and r["warnings"][0].startswith("dev: the model predicts a single class")
    _summary(r, tmp_path / "run")
    out = capsys.readouterr().out
    assert "macro_f1" in out and "majority baseline" in out and "positive class 'bad'" in out
    assert "warning: dev: the model predicts a single class" in out


def test_adapter_files_from_before_the_pooler_field_still_load(tmp_path):
    model = tiny_model("bert")
    aset = add_adapter(model, "t", AdapterConfig(size=8, train_pooler=False))
    torch.nn.init.normal_(aset.adapters["0"]["attn"].up.weight)
    save_adapter(model, "t", tmp_path / "old")
    meta = json.loads((tmp_path / "old" / CONFIG).read_text())
    del meta["config"]["train_pooler"]  # as written by earlier versions
    (tmp_path / "old" / CONFIG).write_text(json.dumps(meta))
    twin = tiny_model("bert")
    load_adapter(twin, tmp_path / "old")
    assert twin.adaptune.sets["t"].config.train_pooler is False
    assert len(twin.adaptune.sets["t"].pooler) == 0


def test_weighted_loss_divides_by_the_count_not_the_weight():
    """torch's weighted mean would cancel the weight of a batch holding one class; ours keeps it."""
    import torch.nn.functional as F

    from adaptune.training.train import _loss

    logits, labels = torch.randn(4, 2), torch.tensor([1, 1, 1, 1])
    w = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(_loss(logits, labels, "classification", w), 3.0 * F.cross_entropy(logits, labels))
    mixed = torch.tensor([0, 1, 1, 1])
    by_hand = (0.5 * F.cross_entropy(logits[:1], mixed[:1]) + 3.0 * 3 * F.cross_entropy(logits[1:], mixed[1:])) / 4
    torch.testing.assert_close(_loss(logits, mixed, "classification", w), by_hand)
    torch.testing.assert_close(_loss(logits, mixed, "classification"), F.cross_entropy(logits, mixed))


def test_classifiers_train_on_random_batches_unless_bucketing_is_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    """Length-sorted batches group a class whose texts are longer; classification and regression
    default to random batches, causal LMs (no classes) to bucketing."""
    import adaptune.training.loop as L  # the training loop's batches

    calls = []
    real = L.bucket_batches
    monkeypatch.setattr(L, "bucket_batches", lambda *a, **k: calls.append(k.get("shuffle")) or real(*a, **k))
    data = _imbalanced_csv(tmp_path / "d.csv")
    assert _cfg(tiny_model_dir, data).bucketed is False
    train(_cfg(tiny_model_dir, data), tmp_path / "random", quiet=True)
    assert True not in calls  # evaluation sorts (shuffle=False); training did not bucket
    calls.clear()
    train(_cfg(tiny_model_dir, data, bucket=True), tmp_path / "bucketed", quiet=True)
    assert True in calls
    assert TrainConfig(data="chatterbot").bucketed is True
    assert TrainConfig(data="chatterbot", bucket=False).bucketed is False
