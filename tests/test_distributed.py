"""Data-parallel training under torchrun (gloo, 2 CPU processes) against a 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import KILL_DRIVER, save_tiny_bert, write_reviews_csv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT without dropout (so 1 and 2 processes can agree to float precision) and data:
    50 training examples in batches of 7, so 2 processes split each batch 4/3, and the last batch
    of each epoch (one example) leaves rank 1 an empty shard."""
    tmp = tmp_path_factory.mktemp("ddp")
    save_tiny_bert(tmp / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = write_reviews_csv(tmp / "d.csv", n=56)
    args = [
        "--model",
        str(tmp / "model"),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--epochs",
        "2",
        "--batch-size",
        "7",
        "--max-length",
        "24",
        "--checkpoint-every",
        "2",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--quiet",
    ]
    return tmp, args


def _run(cmd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _single(out, args):
    return _run([sys.executable, "-m", "adaptune", "train", "-o", str(out), *args])


def _torchrun(out, args, env_extra=None):
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *([KILL_DRIVER] if "KILL_AT_STEP" in (env_extra or {}) else ["-m", "adaptune"]),
            "train",
            "-o",
            str(out),
            *args,
        ],
        env_extra,
    )


def test_two_processes_match_one_and_resume_after_a_rank_is_killed(setup):
    tmp, args = setup
    one = _single(tmp / "one", args)
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp / "two", args)
    assert two.returncode == 0, two.stderr[-3000:]

    # rank 0 alone wrote the folder and printed the summary
    assert sorted(p.name for p in (tmp / "two").iterdir()) == [
        "adapter",
        "config.json",
        "log.jsonl",
        "metrics.json",
        "task.json",
        "tokenizer",
    ]
    assert two.stdout.count("adapters: dev macro_f1") == 1

    # same format, same numbers (to float summation order: gradients are averaged across ranks)
    m1 = json.loads((tmp / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp / "two" / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m1["dev"] == pytest.approx(m2["dev"], abs=1e-6) and m1["best_step"] == m2["best_step"]
    a1, a2 = (
        load_file(tmp / "one" / "adapter" / "adapter.safetensors"),
        load_file(tmp / "two" / "adapter" / "adapter.safetensors"),
    )
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-4, atol=1e-5, msg=k)
    cfg1 = json.loads((tmp / "one" / "adapter" / "adapter_config.json").read_text())
    cfg2 = json.loads((tmp / "two" / "adapter" / "adapter_config.json").read_text())
    assert cfg1["config"] == cfg2["config"] and cfg1["tensors"] == cfg2["tensors"]

    # kill rank 1 mid-run (step 5; last checkpoint at step 4), then --resume under torchrun
    killed = _torchrun(tmp / "killed", args, {"KILL_AT_STEP": "5", "KILL_RANK": "1"})
    assert killed.returncode != 0
    assert not (tmp / "killed" / "metrics.json").exists() and (tmp / "killed" / "checkpoint").is_dir()
    resumed = _torchrun(tmp / "killed", ["--resume", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a3 = load_file(tmp / "killed" / "adapter" / "adapter.safetensors")
    for k in a2:
        torch.testing.assert_close(a3[k], a2[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((tmp / "killed" / "metrics.json").read_text())["dev"] == m2["dev"]
