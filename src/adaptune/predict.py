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
from typing import Any

import numpy as np
import torch

from adaptune.data.loading import Split
from adaptune.errors import ConfigError, DataError
from adaptune.core.io import load_adapter
from adaptune.models.loading import load_classifier, load_tokenizer
from adaptune.data.batching import encode_split
from adaptune.data.tagging import encode_tagged
from adaptune.training.qa import evaluate_qa
from adaptune.training.tagging import evaluate_tagged
from adaptune.training.train import evaluate, pick_device
from adaptune.answers import answer, eval_kw, to_split
from adaptune.multitask import MultiTaskPredictor
from adaptune.runs import _head, _num_outputs, name_runs, read_run

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
        return to_split(self.task, texts, pairs, labels)

    @torch.no_grad()
    def predict(self, texts: list[str], text_pairs: list | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
        """Label and class probabilities (or a score, for regression; the labels above the dev
        threshold, for multi-label) for each text. Token classification: each text's words with
        their tags and character offsets, and its entities (:func:`adaptune.training.tagging.tag_texts`).
        ``text_pairs``: the second texts of a pair task, a QA task's contexts, a multiple-choice
        task's candidate answers (a list per question) (:func:`adaptune.answers.answer`)."""
        kw = dict(batch_size=batch_size, device=self.device)
        return answer(self.model, self.tokenizer, self.task, texts, text_pairs, **kw)

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
        return eval_kw(self.task, self.tokenizer, self.device, batch_size)
