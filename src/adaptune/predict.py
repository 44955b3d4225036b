"""Use finished runs: predictions for new texts, and metrics on a dataset split.

A run folder is self-contained (``config.json``, ``task.json``, ``tokenizer/``, and ``adapter/``
or ``model/``), so this needs nothing but its path and the base model it names.
:class:`Predictor` serves one run; :class:`MultiTaskPredictor` serves several adapter runs on one
shared base, each text naming its task, rows of different tasks in the same forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptune.data.loading import Split, bucket_batches, collate, encode
from adaptune.training.checkpoint import read_json
from adaptune.errors import ConfigError, DataError
from adaptune.core.inject import _NAME, remove_adapter, set_active
from adaptune.core.io import load_adapter, read_adapter_config
from adaptune.models.loading import load_classifier, load_tokenizer
from adaptune.training.train import TrainConfig, evaluate, pick_device


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


def _num_outputs(task: dict[str, Any]) -> int:
    """Width of the task's head: 1 for regression, else one output per label."""
    return 1 if task["task_type"] == "regression" else len(task["label_names"])


def _row(task: dict[str, Any], text: str, out: np.ndarray) -> dict[str, Any]:
    """One prediction: a score for regression, else the label and every class probability."""
    if task["task_type"] == "regression":
        return {"text": text, "score": float(out)}
    names = task["label_names"]
    return {
        "text": text,
        "label": names[int(out.argmax())],
        "probabilities": {n: round(float(x), 6) for n, x in zip(names, out)},
    }


class Predictor:
    """A trained task, loaded from its run folder.

    Args:
        run_dir: folder written by :func:`adaptune.training.train.train`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.

    Raises:
        ConfigError: the folder is not a finished run.
        AdapterFileError: its adapter does not fit the base model it names.

    Example:
        >>> p = Predictor("runs/reviews")
        >>> p.predict(["Tasty and fresh."])[0]["label"]
        'great'
    """

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto") -> None:
        run = Path(run_dir)
        self.config, self.task = read_run(run)
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(str(run / "tokenizer"))
        num_labels = _num_outputs(self.task)
        if (run / "adapter").is_dir():
            self.model = load_classifier(self.config.model, num_labels)
            load_adapter(self.model, run / "adapter")
        elif (run / "model").is_dir():
            self.model = load_classifier(str(run / "model"), num_labels)
        else:
            raise ConfigError(f"{run} has neither adapter/ nor model/; the run did not finish")
        self.model.to(self.device).eval()

    @property
    def label_names(self) -> list[str] | None:
        return self.task["label_names"]

    def _split(self, texts: list[str], pairs: list[str] | None, labels: list | None = None) -> Split:
        if self.task["text_pair"] and pairs is None:
            raise DataError("this task takes text pairs: give a second text for each input")
        return Split(
            texts=list(texts), text_pairs=None if pairs is None else list(pairs), labels=labels or [0] * len(texts)
        )

    @torch.no_grad()
    def predict(
        self, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Label and class probabilities (or a score, for regression) for each text."""
        enc = encode(self._split(texts, text_pairs), self.tokenizer, self.task["max_length"])
        _, outs = evaluate(self.model, enc, **self._eval_kw(batch_size))
        if self.task["task_type"] == "regression":
            outs = np.atleast_1d(outs)
        return [_row(self.task, t, o) for t, o in zip(texts, outs)]

    def evaluate(self, split: Split, label_names: list[str] | None, batch_size: int = 64) -> dict[str, float]:
        """Metrics on ``split``, whose class ids refer to ``label_names`` (remapped to this task's)."""
        labels = split.labels
        if self.task["task_type"] == "classification":
            mine = {n: i for i, n in enumerate(self.label_names)}
            unknown = sorted({str(label_names[i]) for i in labels if label_names[i] not in mine})
            if unknown:
                raise DataError(
                    f"labels {unknown} were not seen in training (known: {self.label_names}); check the label column"
                )
            labels = [mine[label_names[i]] for i in labels]
        enc = encode(Split(split.texts, split.text_pairs, labels), self.tokenizer, self.task["max_length"])
        if not enc:
            raise DataError("the split to evaluate is empty")
        return evaluate(self.model, enc, **self._eval_kw(batch_size))[0]

    def _eval_kw(self, batch_size: int) -> dict[str, Any]:
        positive = self.task.get("positive_label")  # runs from before it was recorded: class 1
        return dict(
            task_type=self.task["task_type"],
            num_labels=_num_outputs(self.task),
            batch_size=batch_size,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            positive=self.label_names.index(positive) if positive in (self.label_names or []) else 1,
        )


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


class MultiTaskPredictor:
    """Several adapter runs on one shared base model: each text names its task.

    The base is loaded once; every run adds its adapter, layer-norm and head copies (heads may
    have different numbers of labels). A batch whose rows belong to different tasks runs in one
    forward pass (:func:`adaptune.set_active` with one name per row); each row's result equals
    that of its own run's :class:`Predictor` up to float rounding.

    Args:
        runs: task name -> run folder, or a list of folders (see :func:`name_runs`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
        base: the base model to load instead of the one the first run names (e.g. a local copy);
            every adapter is checked against it by its weight fingerprint.

    Raises:
        ConfigError: a folder is not a finished adapter run (with a head of its own), or two
            tasks share a name.
        AdapterFileError: an adapter does not fit the base model (runs trained on another base
            are refused by its weight fingerprint).

    Example:
        >>> p = MultiTaskPredictor({"sentiment": "runs/reviews", "topic": "runs/topics"})
        >>> [r["label"] for r in p.predict(["Tasty!", "Stock prices fell"], ["sentiment", "topic"])]
        ['great', 'business']
    """

    def __init__(
        self,
        runs: dict[str, str | os.PathLike] | list[str | os.PathLike],
        device: str = "auto",
        base: str | None = None,
    ) -> None:
        if not isinstance(runs, dict):
            runs = name_runs(runs)
        if not runs:
            raise ConfigError("no runs given: pass at least one run folder")
        self.tasks: dict[str, dict[str, Any]] = {}
        configs = {}
        for name, folder in runs.items():
            folder = Path(folder)
            configs[name], self.tasks[name] = read_run(folder)
            if not (folder / "adapter").is_dir():
                raise ConfigError(
                    f"{folder} is not an adapter run (no adapter/); serve it alone with 'adaptune predict {folder}'"
                )
        first = next(iter(runs))
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(str(Path(runs[first]) / "tokenizer"))
        self.base = base or configs[first].model  # another copy of the base (checked by fingerprint)
        self.model = load_classifier(self.base, _num_outputs(self.tasks[first]))
        for name, folder in runs.items():
            load_adapter(self.model, Path(folder) / "adapter", name=name, activate=False)
        self.model.to(self.device).eval()

    def add_run(self, name: str, folder: str | os.PathLike) -> None:
        """Serve one more run as task ``name``, checked as strictly as at start (a finished adapter
        run with a head of its own, whose adapter fits this base); nothing changes if it fails.

        Raises:
            ConfigError: the name is taken or unusable, or the folder is not a finished adapter run.
            AdapterFileError: the adapter does not fit the base (another base, a damaged file).
        """
        folder = Path(folder)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"task name {name!r} is not usable: use letters, digits, '_' and '-'")
        if name in self.tasks:
            raise ConfigError(f"a task named {name!r} is already served; unload it first or pick another name")
        _, task = read_run(folder)
        if not (folder / "adapter").is_dir():
            raise ConfigError(f"{folder} is not an adapter run (no adapter/)")
        load_adapter(self.model, folder / "adapter", name=name, activate=False)
        self.model.to(self.device)
        self.tasks[name] = task

    def remove_task(self, name: str) -> None:
        """Stop serving task ``name`` (its adapter, norm and head copies leave the model)."""
        if name not in self.tasks:
            raise ConfigError(f"no task named {name!r}; served: {', '.join(self.tasks) or 'none'}")
        remove_adapter(self.model, name)
        del self.tasks[name]

    @torch.no_grad()
    def predict(
        self, texts: list[str], tasks: list[str], text_pairs: list[str | None] | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Like :meth:`Predictor.predict`, with each row's task; every result also names it."""
        if len(tasks) != len(texts) or (text_pairs is not None and len(text_pairs) != len(texts)):
            raise DataError(f"{len(texts)} texts need as many task names (and pairs, if given); got {len(tasks)}")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise DataError(f"unknown task {unknown[0]!r}; this predictor serves {', '.join(self.tasks)}")
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        encoded: list[dict | None] = [None] * len(texts)
        for name, task in self.tasks.items():  # each task's own max_length and pairing
            idx = [i for i, t in enumerate(tasks) if t == name]
            if not idx:
                continue
            if task["text_pair"] and any(pairs[i] is None for i in idx):
                raise DataError(f"task {name!r} takes text pairs: give a second text for each of its inputs")
            split = Split(
                [texts[i] for i in idx], [pairs[i] for i in idx] if task["text_pair"] else None, [0] * len(idx)
            )
            for i, feature in zip(idx, encode(split, self.tokenizer, task["max_length"])):
                encoded[i] = feature
        results: list[dict[str, Any] | None] = [None] * len(texts)
        try:
            for batch_idx in bucket_batches([len(e["input_ids"]) for e in encoded], batch_size, shuffle=False):
                batch = collate([encoded[i] for i in batch_idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                set_active(self.model, [tasks[i] for i in batch_idx])
                logits = self.model(**batch).logits.float().cpu()  # (B, widest head), NaN past a row's own width
                for row, i in enumerate(batch_idx):
                    task = self.tasks[tasks[i]]
                    own = logits[row, : _num_outputs(task)]
                    out = own.squeeze(-1) if task["task_type"] == "regression" else own.softmax(-1)
                    results[i] = {"task": tasks[i], **_row(task, texts[i], out.numpy())}
        finally:
            set_active(self.model, None)
        return results
