"""Use finished runs: predictions for new texts, and metrics on a dataset split.

A run folder is self-contained (``config.json``, ``task.json``, ``tokenizer/``, and ``adapter/``
or ``model/``), so this needs nothing but its path and the base model it names.
:class:`Predictor` serves one run; :class:`MultiTaskPredictor` serves several adapter runs on one
shared base, each text naming its task, rows of different tasks in the same forward pass.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from adaptune.data.loading import Split, bucket_batches, collate, encode
from adaptune.errors import ConfigError, DataError
from adaptune.core.architectures import backbone
from adaptune.core.inject import _NAME, remove_adapter, set_active, using_adapters
from adaptune.core.io import load_adapter
from adaptune.models.loading import load_classifier, load_tokenizer
from adaptune.data.batching import encode_choices, encode_split
from adaptune.data.tagging import encode_tagged
from adaptune.training.steps import scores
from adaptune.training.qa import answer_questions, evaluate_qa
from adaptune.training.tagging import evaluate_tagged, tag_texts
from adaptune.training.train import evaluate, pick_device
from adaptune.runs import _check_servable, _head, _num_outputs, _row, name_runs, read_run

__all__ = ["MultiTaskPredictor", "Predictor", "name_runs", "read_run"]


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
        head = _head(self.task)
        if (run / "adapter").is_dir():
            self.model = load_classifier(self.config.model, num_labels, head=head)
            load_adapter(self.model, run / "adapter")
        elif (run / "model").is_dir():
            self.model = load_classifier(str(run / "model"), num_labels, head=head)
        else:
            raise ConfigError(f"{run} has neither adapter/ nor model/; the run did not finish")
        self.model.to(self.device).eval()

    @property
    def label_names(self) -> list[str] | None:
        return self.task["label_names"]

    def _split(self, texts: list[str], pairs: list[str] | None, labels: list | None = None) -> Split:
        if self.task["text_pair"] and pairs is None:
            raise DataError("this task takes text pairs: give a second text for each input")
        if labels is None:  # placeholders: evaluate scores them, predict reads only the outputs
            width = len(self.label_names) if self.task["task_type"] == "multi-label" else 0
            labels = [np.zeros(width, dtype=np.uint8) if width else 0 for _ in texts]
        return Split(texts=list(texts), text_pairs=None if pairs is None else list(pairs), labels=labels)

    @torch.no_grad()
    def predict(
        self, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Label and class probabilities (or a score, for regression; the labels above the dev
        threshold, for multi-label) for each text. Token classification: each text's words with
        their tags and character offsets, and its entities (:func:`adaptune.training.tagging.tag_texts`)."""
        if _head(self.task) == "choice":
            return self._choose(texts, text_pairs, batch_size)
        if _head(self.task) == "qa":  # text_pairs: the contexts
            if text_pairs is None or len(text_pairs) != len(texts):
                raise DataError("a question-answering task needs a context for each question")
            kw = self._eval_kw(batch_size)
            common = dict(batch_size=batch_size, pad_id=kw["pad_id"], device=self.device)
            return answer_questions(
                self.model,
                self.tokenizer,
                list(texts),
                list(text_pairs),
                self.task,
                autocast_ctx=contextlib.nullcontext,
                **common,
            )
        if _head(self.task) == "token":
            kw = self._eval_kw(batch_size)
            return tag_texts(
                self.model,
                self.tokenizer,
                list(texts),
                self.task,
                batch_size=batch_size,
                pad_id=kw["pad_id"],
                device=self.device,
                autocast_ctx=contextlib.nullcontext,
            )
        enc = encode(self._split(texts, text_pairs), self.tokenizer, self.task["max_length"])
        _, outs = evaluate(self.model, enc, **self._eval_kw(batch_size))
        if self.task["task_type"] == "regression":
            outs = np.atleast_1d(outs)
        return [_row(self.task, t, o) for t, o in zip(texts, outs)]

    def evaluate(self, split: Split, label_names: list[str] | None, batch_size: int = 64) -> dict[str, float]:
        """Metrics on ``split``, whose class ids refer to ``label_names`` (remapped to this task's)."""
        labels = split.labels
        if _head(self.task) == "token":
            return self._evaluate_tagged(split, label_names, batch_size)
        if _head(self.task) == "qa":
            task = self.task
            enc = encode_split(
                split, task["task_type"], self.tokenizer, task["max_length"], task.get("doc_stride", 128)
            )
            kw = dict(batch_size=batch_size, pad_id=self.tokenizer.pad_token_id, device=self.device)
            threshold, with_null = task.get("null_threshold"), task.get("with_null", False)
            return evaluate_qa(
                self.model,
                enc,
                split.text_pairs,
                split.labels,
                threshold=threshold,
                with_null=with_null,
                autocast_ctx=contextlib.nullcontext,
                **kw,
            )[0]
        if self.task["task_type"] == "multi-label":
            labels = self._remap_label_sets(labels, label_names)
        elif self.task["task_type"] == "classification":
            mine = self._own_ids({label_names[i] for i in labels}, "labels", "check the label column")
            labels = [mine[label_names[i]] for i in labels]
        split = Split(split.texts, split.text_pairs, labels, split.choices)
        enc = encode_split(split, self.task["task_type"], self.tokenizer, self.task["max_length"])
        if not enc:
            raise DataError("the split to evaluate is empty")
        return evaluate(self.model, enc, **self._eval_kw(batch_size))[0]

    def _choose(self, questions: list[str], choices, batch_size: int) -> list[dict[str, Any]]:
        """Multiple choice: ``choices`` holds each question's candidate answers."""
        if choices is None or len(choices) != len(questions) or any(len(c) < 2 for c in choices):
            raise DataError("a multiple-choice task needs two or more choices for each question")
        split = Split(list(questions), None, [0] * len(questions), [list(c) for c in choices])
        enc = encode_choices(split, self.tokenizer, self.task["max_length"])
        _, outs = evaluate(self.model, enc, **self._eval_kw(batch_size))
        rows = []
        for q, options, probs in zip(questions, choices, outs):
            probs = [round(float(x), 6) for x in probs[: len(options)]]
            rows.append({"text": q, "choices": list(options), "answer": int(np.argmax(probs)), "probabilities": probs})
        return rows

    def _evaluate_tagged(self, split: Split, label_names: list[str], batch_size: int) -> dict[str, float]:
        mine = self._own_ids(label_names, "tags", "check the file")
        tags = [[mine[label_names[i]] for i in row] for row in split.labels]
        enc = encode_tagged(split.texts, tags, self.tokenizer, self.task["max_length"])
        return evaluate_tagged(
            self.model,
            enc,
            self.label_names,
            self.task.get("span_tags", True),
            batch_size=batch_size,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            autocast_ctx=contextlib.nullcontext,
        )[0]

    def _own_ids(self, names, what: str, hint: str) -> dict[str, int]:
        """This task's id of each of its labels, after refusing any of ``names`` training never saw
        (the head has no output for it)."""
        mine = {n: i for i, n in enumerate(self.label_names)}
        unknown = sorted({str(n) for n in names if n not in mine})
        if unknown:
            known = ", ".join(self.label_names[:10]) + (", ..." if len(self.label_names) > 10 else "")
            raise DataError(f"{what} {unknown[:5]} were not seen in training (known: {known}); {hint}")
        return mine

    def _remap_label_sets(self, labels: list[np.ndarray], label_names: list[str]) -> list[np.ndarray]:
        """0/1 rows over ``label_names`` -> rows over this task's labels."""
        mine = self._own_ids(label_names, "labels", "check the label column and --label-delimiter")
        cols = np.array([mine[n] for n in label_names], dtype=np.int64)
        out = np.zeros((len(labels), len(mine)), dtype=np.uint8)
        if labels:
            out[:, cols] = np.stack(labels)
        return list(out)

    def _eval_kw(self, batch_size: int) -> dict[str, Any]:
        positive = self.task.get("positive_label")  # runs from before it was recorded: class 1
        return dict(
            threshold=self.task.get("threshold", 0.5),
            task_type=self.task["task_type"],
            num_labels=_num_outputs(self.task),
            batch_size=batch_size,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            positive=self.label_names.index(positive) if positive in (self.label_names or []) else 1,
        )


class _TokenView(torch.nn.Module):
    """The shared model seen as one token-classification task's model: the backbone through that
    task's adapter (and norm copies), then its token head copy at every position (dropout off)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name
        self.training = model.training  # evaluation restores the mode it found: the model's, not a default

    def forward(self, **batch):
        with using_adapters(self.model, self.name):
            hidden = backbone(self.model)(**batch)[0]  # (B, T, d)
            logits = self.model.adaptune.sets[self.name].head["classifier"](hidden)
        return SimpleNamespace(logits=logits)


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
            _check_servable(self.tasks[name], folder)
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
        _check_servable(task, folder)
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
            if not idx or _head(task) == "token":
                continue
            if task["text_pair"] and any(pairs[i] is None for i in idx):
                raise DataError(f"task {name!r} takes text pairs: give a second text for each of its inputs")
            split = Split(
                [texts[i] for i in idx], [pairs[i] for i in idx] if task["text_pair"] else None, [0] * len(idx)
            )
            for i, feature in zip(idx, encode(split, self.tokenizer, task["max_length"])):
                encoded[i] = feature
        results: list[dict[str, Any] | None] = [None] * len(texts)
        for name in dict.fromkeys(t for t in tasks if _head(self.tasks[t]) == "token"):  # each tagging task alone
            idx = [i for i, t in enumerate(tasks) if t == name]
            rows = tag_texts(
                _TokenView(self.model, name),
                self.tokenizer,
                [texts[i] for i in idx],
                self.tasks[name],
                batch_size=batch_size,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
                autocast_ctx=contextlib.nullcontext,
            )
            for i, row in zip(idx, rows):
                results[i] = {"task": name, **row}
        seq = [i for i in range(len(texts)) if results[i] is None]  # one mixed batch for the sequence heads
        try:
            for part in bucket_batches([len(encoded[i]["input_ids"]) for i in seq], batch_size, shuffle=False):
                batch_idx = [seq[j] for j in part]
                batch = collate([encoded[i] for i in batch_idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                set_active(self.model, [tasks[i] for i in batch_idx])
                logits = self.model(**batch).logits.float().cpu()  # (B, widest head), NaN past a row's own width
                for row, i in enumerate(batch_idx):
                    task = self.tasks[tasks[i]]
                    out = scores(task["task_type"], logits[row, : _num_outputs(task)])
                    results[i] = {"task": tasks[i], **_row(task, texts[i], out.numpy())}
        finally:
            set_active(self.model, None)
        return results
