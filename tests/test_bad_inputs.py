"""Bad input through the command line's entry point, in-process: data files, arguments, adapter
folders and checkpoints. Every case must end in one line that says what is wrong (no traceback),
a non-zero exit, and nothing written or changed on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import kill_tiny_run, train_argv, write_reviews_csv
from safetensors.torch import load_file, save_file

from adaptune.cli.parser import main


def _tree(root: Path) -> dict:
    """Every path under root with its size and content hash (folders: None)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _fails_cleanly(argv: list[str], root: Path, capsys, *words: str, code: int = 2) -> str:
    """Run the CLI; assert the exit code, one error line holding ``words``, and ``root`` untouched."""
    capsys.readouterr()
    before = _tree(root)
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("adaptune: error: ") and "Traceback" not in line, line
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert _tree(root) == before, "the failed command wrote or changed files"
    return line


# ---- data files -------------------------------------------------------------------------------------------


def _csv(text: str):
    return _file("data.csv", text)


def _file(name: str, content: bytes | str):
    def make(d: Path) -> Path:
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return p

    return make


def _reviews(d: Path) -> Path:
    return write_reviews_csv(d / "data.csv", n=24)


def _folder(d: Path) -> Path:
    (d / "folder").mkdir()
    (d / "folder" / "notes.txt").write_text("nothing to train on")
    return d / "folder"


GOOD = "review,score\n" + "".join(f"coffee number {i},{'ab'[i % 2]}\n" for i in range(24))

DATA_CASES = {
    "missing-file": (lambda d: d / "nope.csv", [], ["nope.csv", "does not exist"]),
    "unknown-extension": (_file("data.xlsx", "a,b\n"), [], ["extension", ".xlsx"]),
    "empty-csv": (_file("data.csv", ""), [], ["empty"]),
    "header-only": (_csv("review,score\n"), [], ["no examples"]),
    "latin1": (_file("data.csv", "review,score\ncaf\xe9 ok,a\n".encode("latin-1")), [], ["UTF-8"]),
    "missing-text-column": (_reviews, ["--text-column", "body"], ["body", "review"]),
    "missing-label-column": (_reviews, ["--label-column", "stars"], ["stars", "score"]),
    "missing-pair-column": (_reviews, ["--text-pair-column", "other"], ["other"]),
    "one-class": (_csv("review,score\n" + "".join(f"coffee {i},good\n" for i in range(20))), [], ["single label"]),
    "bad-jsonl-line": (
        _file("data.jsonl", '{"review": "a", "score": "x"}\n{"review": "b", \n'),
        [],
        ["line 2", "JSON"],
    ),
    "jsonl-not-objects": (_file("data.jsonl", "[1, 2]\n[3, 4]\n"), [], ["not objects"]),
    "empty-jsonl": (_file("data.jsonl", "\n\n"), [], ["empty"]),
    "bad-json-array": (_file("data.json", '[{"review": "a", "score": "x"},'), [], ["not valid JSON"]),
    "folder-without-data": (_folder, [], ["folder"]),
    "hf-offline": (lambda d: "hf:no_such_dataset_anywhere", [], ["no_such_dataset_anywhere"]),
    "regression-with-words": (_reviews, ["--task-type", "regression"], ["regression"]),
    "unknown-task-type": (_reviews, ["--task-type", "ranking"], ["ranking"]),
    "missing-dev-file": (_reviews, ["--dev-file", "nodev.csv"], ["nodev.csv"]),
    "missing-test-file": (_reviews, ["--test-file", "notest.csv"], ["notest.csv"]),
    "unknown-dev-label": (_reviews, ["--dev-file", "dev.csv"], ["excellent"]),
    "dev-missing-column": (_reviews, ["--dev-file", "devcols.csv"], ["review"]),
    "empty-texts": (_csv("review,score\n" + "".join(f",{'ab'[i % 2]}\n" for i in range(20))), [], ["miss text"]),
    "empty-labels": (_csv("review,score\n" + "".join(f"coffee {i},\n" for i in range(20))), [], ["label"]),
    "tsv-missing-columns": (_file("data.tsv", "a\tb\n1\t2\n"), [], ["review"]),
    "chat-data-on-encoder": (
        _file("data.jsonl", "".join(f'{{"prompt": "hi {i}", "response": "hello {i}"}}\n' for i in range(200))),
        [],
        ["bidirectional encoder"],
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(case, tiny_model_dir, tmp_path, capsys):
    make, extra, words = DATA_CASES[case]
    data = make(tmp_path)
    (tmp_path / "dev.csv").write_text("review,score\nnice,good\nweird,excellent\n")
    (tmp_path / "devcols.csv").write_text("body,score\nnice,good\n")
    extra = [str(tmp_path / e) if e.endswith(".csv") else e for e in extra]
    argv = train_argv(tiny_model_dir, data, tmp_path / "run", *extra)
    _fails_cleanly(argv, tmp_path, capsys, *words)
    assert not (tmp_path / "run").exists()


# ---- arguments --------------------------------------------------------------------------------------------

ARG_CASES = {
    "epochs-0": (["--epochs", "0"], ["epochs"]),
    "epochs-negative": (["--epochs", "-2"], ["epochs"]),
    "batch-size-0": (["--batch-size", "0"], ["batch_size"]),
    "lr-0": (["--lr", "0"], ["learning rate"]),
    "lr-negative": (["--lr=-1e-3"], ["learning rate"]),
    "lr-nan": (["--lr", "nan"], ["learning rate"]),
    "adapter-size-0": (["--adapter-size", "0"], ["size"]),
    "unknown-placement": (["--adapter", "sideways"], ["sideways"]),
    "unknown-strategy": (["--strategy", "everything"], ["everything"]),
    "device-tpu": (["--device", "tpu9"], ["tpu9", "not a device"]),
    "device-cuda-absent": (["--device", "cuda"], ["cuda", "cpu"]),
    "model-missing": (["--model", "MISSING"], ["no model folder"]),
    "model-not-a-model": (["--model", "NOTMODEL"], ["not-a-model"]),
    "dev-fraction-above-1": (["--dev-fraction", "1.5"], ["dev_fraction"]),
    "max-length-0": (["--max-length", "0"], ["max_length"]),
    "warmup-2": (["--warmup", "2"], ["warmup"]),
    "top-k-0": (["--strategy", "top-k", "--top-k", "0"], ["top-k", "got 0"]),
    "top-k-too-many": (["--strategy", "top-k", "--top-k", "9"], ["layer count", "got 9"]),
    "adapter-layer-out-of-range": (["--adapter-layers", "7"], ["7"]),
    "class-weights-unknown": (["--class-weights", "heavy"], ["heavy"]),
    "metric-unknown": (["--metric", "auc"], ["auc"]),
    "metric-f1-on-3-classes": (["--metric", "f1", "--data", "THREE"], ["f1"]),
    "positive-label-unknown": (["--positive-label", "great"], ["great"]),
    "precision-fp8": (["--precision", "fp8"], ["fp8"]),
    "compile-unknown": (["--compile", "fastest"], ["fastest"]),
    "limit-train-negative": (["--limit-train", "-5"], ["limit_train"]),
    "init-std-negative": (["--init-std", "-1"], ["init_std"]),
    "eval-every-negative": (["--eval-every", "-1"], ["eval_every"]),
    "checkpoint-every-0": (["--checkpoint-every", "0"], ["checkpoint_every"]),
    "cache-without-frozen-dropout-off": (["--cache-frozen-layers"], ["frozen"]),
    "head-strategy-on-causal-lm": (["--strategy", "head", "--model", "LM", "--data", "CHAT"], ["head"]),
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_argument(case, tiny_model_dir, tiny_lm_dir, tmp_path, capsys):
    extra, words = ARG_CASES[case]
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    three = write_reviews_csv(tmp_path / "three.csv", n=24, classes=3)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "chat.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n' * 20)
    swap = {
        "MISSING": str(tmp_path / "no" / "model"),
        "NOTMODEL": str(tmp_path / "not-a-model"),
        "THREE": str(three),
        "LM": str(tiny_lm_dir),
        "CHAT": str(tmp_path / "chat.jsonl"),
    }
    argv = train_argv(tiny_model_dir, data, tmp_path / "run", *[swap.get(e, e) for e in extra])
    _fails_cleanly(argv, tmp_path, capsys, *words)
    assert not (tmp_path / "run").exists()


def test_output_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    (tmp_path / "run").write_text("my notes")
    argv = [
        "train",
        "--quiet",
        "-o",
        str(tmp_path / "run"),
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "score",
    ]
    _fails_cleanly(argv, tmp_path, capsys, "not a folder")


def test_output_folder_with_other_files(tiny_model_dir, tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=24)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    argv = [
        "train",
        "--quiet",
        "-o",
        str(tmp_path / "run"),
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "score",
    ]
    _fails_cleanly(argv, tmp_path, capsys, "already exists")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from conftest import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), "llama")


# ---- adapter and run folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    data = write_reviews_csv(tmp / "d.csv", n=24)
    assert main(train_argv(tiny_model_dir, data, tmp / "run")) == 0
    return tmp / "run"


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _nan_first(tensors):
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))


ADAPTER_CASES = {
    # (damage to the copied run folder, command, words)
    "info-missing-path": (lambda r: shutil.rmtree(r), "info", ["not an adapter folder"]),
    "info-no-config": (
        lambda r: (r / "adapter" / "adapter_config.json").unlink(),
        "info",
        ["missing", "adapter_config.json"],
    ),
    "info-no-weights": (
        lambda r: (r / "adapter" / "adapter.safetensors").unlink(),
        "info",
        ["missing", "adapter.safetensors"],
    ),
    "info-config-not-json": (
        lambda r: (r / "adapter" / "adapter_config.json").write_text("{oops"),
        "info",
        ["not valid JSON"],
    ),
    "info-config-a-list": (
        lambda r: (r / "adapter" / "adapter_config.json").write_text("[1]"),
        "info",
        ["JSON object"],
    ),
    "info-unknown-field": (
        lambda r: _edit_json(r / "adapter" / "adapter_config.json", lambda m: m.update(colour="red")),
        "info",
        ["unknown field", "colour"],
    ),
    "info-future-format": (
        lambda r: _edit_json(r / "adapter" / "adapter_config.json", lambda m: m.update(format=99)),
        "info",
        ["format 99"],
    ),
    "info-bad-config-value": (
        lambda r: _edit_json(r / "adapter" / "adapter_config.json", lambda m: m["config"].update(size=-3)),
        "info",
        ["size"],
    ),
    "info-truncated-weights": (
        lambda r: (r / "adapter" / "adapter.safetensors").write_bytes(b"\x10\x00"),
        "info",
        ["adapter.safetensors", "damaged"],
    ),
    "info-size-edited": (
        lambda r: _edit_json(r / "adapter" / "adapter_config.json", lambda m: m["config"].update(size=9)),
        "info",
        ["shape", "edited"],
    ),
    "predict-checksum": (
        lambda r: _edit_tensors(
            r / "adapter" / "adapter.safetensors", lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]] + 1)
        ),
        "predict",
        ["checksum"],
    ),
    "predict-nan-values": (
        lambda r: (
            _edit_tensors(r / "adapter" / "adapter.safetensors", _nan_first),
            _edit_json(r / "adapter" / "adapter_config.json", lambda m: m.pop("sha256")),
        ),
        "predict",
        ["NaN"],
    ),
    "predict-missing-tensor": (
        lambda r: (
            _edit_tensors(r / "adapter" / "adapter.safetensors", lambda t: t.pop(sorted(t)[0])),
            _edit_json(r / "adapter" / "adapter_config.json", lambda m: m.pop("sha256")),
        ),
        "predict",
        ["missing"],
    ),
    "predict-no-adapter-folder": (lambda r: shutil.rmtree(r / "adapter"), "predict", ["adapter"]),
    "predict-no-task-json": (lambda r: (r / "task.json").unlink(), "predict", ["task.json"]),
    "predict-task-json-damaged": (lambda r: (r / "task.json").write_text("{"), "predict", ["task.json"]),
    "predict-config-damaged": (lambda r: (r / "config.json").write_text("nope"), "predict", ["config.json"]),
    "predict-not-a-run": (
        lambda r: [
            (r / n).unlink() if (r / n).is_file() else shutil.rmtree(r / n)
            for n in ("metrics.json", "task.json", "adapter", "tokenizer")
        ],
        "predict",
        ["not a finished run"],
    ),
    "eval-not-a-run": (
        lambda r: [
            (r / n).unlink() if (r / n).is_file() else shutil.rmtree(r / n)
            for n in ("metrics.json", "task.json", "adapter", "tokenizer")
        ],
        "eval",
        ["not a finished run"],
    ),
    "eval-no-test-split": (lambda r: None, "eval-test", ["test"]),
    "eval-other-data-missing": (lambda r: None, "eval-missing-data", ["does not exist"]),
    "predict-empty-file": (lambda r: (r.parent / "empty.txt").write_text(""), "predict-file", ["no texts"]),
    "predict-missing-file": (lambda r: None, "predict-missing-file", ["nope.txt"]),
    "predict-also-missing": (lambda r: None, "predict-also", ["other-run"]),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_bad_adapter_or_run_folder(case, finished_run, tmp_path, capsys):
    damage, command, words = ADAPTER_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    argv = {
        "info": ["info", str(run)],
        "predict": ["predict", str(run), "great coffee"],
        "eval": ["eval", str(run)],
        "eval-test": ["eval", str(run), "--split", "test"],
        "eval-missing-data": ["eval", str(run), "--data", str(tmp_path / "gone.csv")],
        "predict-file": ["predict", str(run), "--file", str(tmp_path / "empty.txt")],
        "predict-missing-file": ["predict", str(run), "--file", str(tmp_path / "nope.txt")],
        "predict-also": ["predict", str(run), "--also", str(tmp_path / "other-run"), "run\tgreat coffee"],
    }[command]
    _fails_cleanly(argv, tmp_path, capsys, *words)


# ---- checkpoints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tiny_model_dir, tmp_path_factory):
    """A run killed at step 5 (its checkpoint holds step 4)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    data = write_reviews_csv(tmp / "d.csv", n=40)
    kill_tiny_run(tmp / "run", tiny_model_dir, data, at_step=5)
    assert (tmp / "run" / "checkpoint" / "state.safetensors").is_file()
    return tmp / "run"


def _state(r: Path) -> Path:
    return r / "checkpoint" / "state.safetensors"


def _first_param(tensors) -> str:
    return sorted(k for k in tensors if k.startswith("param."))[0]


CHECKPOINT_CASES = {
    "no-config": (lambda r: (r / "config.json").unlink(), ["nothing to resume"]),
    "config-not-json": (lambda r: (r / "config.json").write_text("{"), ["config.json"]),
    "config-unknown-option": (
        lambda r: _edit_json(r / "config.json", lambda m: m["train"].update(turbo=True)),
        ["turbo"],
    ),
    "state-truncated": (lambda r: _state(r).write_bytes(_state(r).read_bytes()[:100]), ["damaged"]),
    "state-json-damaged": (lambda r: (r / "checkpoint" / "state.json").write_text("{"), ["damaged"]),
    "param-missing": (
        lambda r: _edit_tensors(_state(r), lambda t: t.pop(_first_param(t))),
        ["lacks trained parameter"],
    ),
    "param-mis-shaped": (
        lambda r: _edit_tensors(_state(r), lambda t: t.__setitem__(_first_param(t), torch.zeros(1))),
        ["shape"],
    ),
    "param-unknown": (
        lambda r: _edit_tensors(_state(r), lambda t: t.__setitem__("param.not.trained", torch.zeros(1))),
        ["does not train"],
    ),
    "data-gone": (lambda r: (r.parent / "d.csv").unlink(), ["d.csv"]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(case, interrupted_run, tmp_path, capsys):
    damage, words = CHECKPOINT_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    shutil.copy(interrupted_run.parent / "d.csv", tmp_path / "d.csv")
    _edit_json(run / "config.json", lambda m: m["train"].update(data=str(tmp_path / "d.csv")))
    damage(run)
    _fails_cleanly(["train", "-o", str(run), "--resume", "--quiet"], tmp_path, capsys, *words)
