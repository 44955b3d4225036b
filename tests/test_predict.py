"""Serving finished runs: several adapter tasks on one base, mixed in one batch (src/adaptune/predict.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import train_argv, write_reviews_csv

from adaptune import ConfigError, DataError
from adaptune.cli.parser import main
from adaptune.predict import MultiTaskPredictor, Predictor


def _train(model_dir, data, out, *extra):
    """A short tiny-model run (``extra`` wins over :func:`conftest.train_argv`'s settings)."""
    assert main(train_argv(model_dir, data, out, *extra)) == 0
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two adapter runs on one tiny base: 2 labels / max 16 tokens, and 3 labels / max 8 tokens."""
    tmp = tmp_path_factory.mktemp("serve")
    two = _train(tiny_model_dir, write_reviews_csv(tmp / "two.csv", n=40), tmp / "two", "--max-length", "16")
    three = _train(
        tiny_model_dir,
        write_reviews_csv(tmp / "three.csv", n=60, classes=3),
        tmp / "three",
        "--max-length",
        "8",
        "--adapter",
        "pfeiffer",
    )
    full = _train(tiny_model_dir, tmp / "two.csv", tmp / "full", "--max-length", "16", "--strategy", "full")
    nohead = _train(tiny_model_dir, tmp / "two.csv", tmp / "nohead", "--max-length", "16", "--no-train-head")
    return {"two": two, "three": three, "full": full, "nohead": nohead}


TEXTS = [
    "this coffee is great and tasty",
    "stale bland and soggy, a long review that runs past eight tokens for sure",
    "okay average",
    "lovely",
    "plain fine okay okay",
]
TASKS = ["two", "three", "three", "two", "three"]


def test_mixed_rows_equal_each_run_served_alone(runs):
    multi = MultiTaskPredictor({"two": runs["two"], "three": runs["three"]}, device="cpu")
    rows = multi.predict(TEXTS, TASKS, batch_size=4)  # batches mix the two tasks
    alone = {name: Predictor(runs[name], device="cpu") for name in ("two", "three")}
    for text, task, row in zip(TEXTS, TASKS, rows):
        ref = alone[task].predict([text])[0]
        assert row["task"] == task and row["text"] == text and row["label"] == ref["label"]
        assert set(row["probabilities"]) == set(ref["probabilities"])  # each task its own labels (2 or 3)
        for label, p in ref["probabilities"].items():
            assert row["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert {len(r["probabilities"]) for r in rows} == {2, 3}


def test_runs_named_after_their_folders_and_bad_input(runs):
    multi = MultiTaskPredictor([runs["two"], runs["three"]], device="cpu")
    assert list(multi.tasks) == ["two", "three"]
    with pytest.raises(DataError, match="unknown task 'four'"):
        multi.predict(["x"], ["four"])
    with pytest.raises(DataError, match="as many task names"):
        multi.predict(["x", "y"], ["two"])
    with pytest.raises(ConfigError, match="not an adapter run"):
        MultiTaskPredictor([runs["two"], runs["full"]], device="cpu")
    with pytest.raises(ConfigError, match="both be called 'two'.*dict"):
        MultiTaskPredictor([runs["two"], runs["two"]], device="cpu")


def test_cli_serves_several_runs(runs, capsys, monkeypatch):
    lines = "".join(f"{task}\t{text}\n" for task, text in zip(TASKS, TEXTS))
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["predict", str(runs["two"]), "--also", f"three={runs['three']}", "--json", "--device", "cpu"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert [r["task"] for r in rows] == TASKS and [r["text"] for r in rows] == TEXTS
    assert (
        main(["predict", str(runs["two"]), "--also", f"three={runs['three']}", "two\tgreat", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out.strip().split("\t")
    assert out[0] == "two" and out[1] in ("good", "bad") and out[-1] == "great"


def test_cli_rejects_a_line_without_a_known_task(runs, capsys):
    assert main(["predict", str(runs["two"]), "--also", str(runs["three"]), "just a text", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1: expected TASK<tab>TEXT" in err[0] and "two, three" in err[0]


def test_a_run_without_its_own_head_is_refused(runs, capsys):
    """Its predictions came from a random base head that was not saved: serving it would be wrong."""
    for load in (
        lambda: Predictor(runs["nohead"], device="cpu"),
        lambda: MultiTaskPredictor([runs["two"], runs["nohead"]], device="cpu"),
    ):
        with pytest.raises(ConfigError, match="without a head of its own"):
            load()
    assert main(["predict", str(runs["nohead"]), "tasty", "--device", "cpu"]) == 2
    assert "without a head of its own" in capsys.readouterr().err


def test_cli_stray_words_and_unusable_names(runs, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("two\tgreat\n")
    # words after --file would silently replace the file's lines: still an error
    with pytest.raises(SystemExit):
        main(["predict", str(runs["two"]), "--also", str(runs["three"]), "-f", str(texts), "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert main(["predict", str(runs["two"]), "--also", f"1st={runs['three']}", "two\tgreat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task name '1st' (given) is not usable" in err[0]


def test_name_runs_names_folders_or_takes_given_names(tmp_path):
    from adaptune.predict import name_runs

    (tmp_path / "reviews").mkdir()
    assert name_runs([tmp_path / "reviews", f"topic={tmp_path / 'news'}"]) == {
        "reviews": tmp_path / "reviews",
        "topic": tmp_path / "news",
    }
    with pytest.raises(ConfigError, match="both be called 'reviews'"):
        name_runs([tmp_path / "reviews", f"reviews={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="'2nd' \\(given\\) is not usable"):
        name_runs([f"2nd={tmp_path / 'news'}"])
    (tmp_path / "9lives").mkdir()
    with pytest.raises(ConfigError, match="folder name of .*9lives"):
        name_runs([tmp_path / "9lives"])
