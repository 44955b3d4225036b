"""Finished run folders: reading one back, the kind and width of its head, one prediction as a
dict, and naming several runs for serving. Shared by :mod:`adaptune.predict` and the server."""

from __future__ import annotations


import os
from pathlib import Path
from typing import Any

import numpy as np

from adaptune.core.inject import _NAME
from adaptune.core.io import read_adapter_config
from adaptune.errors import ConfigError
from adaptune.training.checkpoint import read_json
from adaptune.training.config import HEADS, TrainConfig


def read_run(run: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """A finished classification or regression run's training configuration and task description.

    Raises:
        ConfigError: not a finished run folder, or a language-model run.
    """
    for need in ("config.json", "task.json", "tokenizer"):
        if not (run / need).exists():
            raise ConfigError(f"{run} is not a finished run folder (no {need}); train one with 'adaptune train'")
    config = TrainConfig.from_dict(read_json(run / "config.json", "train"))
    task = read_json(run / "task.json")
    if not isinstance(task, dict):
        raise ConfigError(f"{run / 'task.json'} must hold a JSON object; the run folder is damaged: train it again")
    if task.get("task_type") == "causal-lm":
        raise ConfigError(
            f"{run} is a language-model run: generate with 'adaptune generate {run}' "
            "(or adaptune.lm.generate.Generator); 'adaptune eval' gives its perplexity"
        )
    if (run / "adapter").is_dir() and not read_adapter_config(run / "adapter")["config"].train_head:
        raise ConfigError(
            f"{run} was trained without a head of its own (--no-train-head): its predictions came "
            "from the base model's randomly initialised head, which was not saved; train it again with a head"
        )
    return config, task


def _head(task: dict[str, Any]) -> str:
    """The kind of head a task's model has: ``"token"`` (a tag per word), ``"choice"`` (a score per
    candidate answer) or ``"sequence"``."""
    return HEADS.get(task["task_type"], "sequence")


def _num_outputs(task: dict[str, Any]) -> int:
    """Width of the task's head: 1 for regression and multiple choice (a score per choice), 2 for
    extractive QA (start and end), else one output per label."""
    fixed = {"regression": 1, "multiple-choice": 1, "question-answering": 2}.get(task["task_type"])
    return fixed or len(task["label_names"])


def _row(task: dict[str, Any], text: str, out: np.ndarray) -> dict[str, Any]:
    """One prediction: a score for regression; for multi-label the labels whose probability reaches
    the threshold chosen on dev, and every label's probability; else the label and every class
    probability."""
    if task["task_type"] == "regression":
        return {"text": text, "score": float(out)}
    names = task["label_names"]
    if task["task_type"] == "multi-label":
        threshold = task.get("threshold", 0.5)
        return {
            "text": text,
            "labels": [n for n, x in zip(names, out) if x >= threshold],
            "probabilities": {n: round(float(x), 6) for n, x in zip(names, out)},
        }
    return {
        "text": text,
        "label": names[int(out.argmax())],
        "probabilities": {n: round(float(x), 6) for n, x in zip(names, out)},
    }


def name_runs(specs: list[str | os.PathLike]) -> dict[str, Path]:
    """Run folders -> {task name: folder}: each named after its folder, or ``"NAME=FOLDER"`` to name it.

    Raises:
        ConfigError: a name is not usable as an adapter name, or two runs would share one.
    """
    runs: dict[str, Path] = {}
    for spec in map(os.fspath, specs):
        name, sep, folder = spec.partition("=")
        given = bool(sep) and not Path(spec).exists()
        if not given:
            name, folder = Path(spec).resolve().name, spec
        if not _NAME.match(name):
            raise ConfigError(
                f"task name {name!r} ({'given' if given else 'the folder name of ' + spec}) is not usable: "
                "use letters, digits, '_' and '-', not starting with a digit; name it with NAME=FOLDER"
            )
        if name in runs:
            raise ConfigError(
                f"two runs would both be called {name!r}; name them apart with NAME=FOLDER "
                "(in Python: a dict {name: folder})"
            )
        runs[name] = Path(folder)
    return runs
