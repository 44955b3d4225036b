"""Use a finished run: predictions for new texts, and metrics on a dataset split.

A run folder is self-contained (``config.json``, ``task.json``, ``tokenizer/``, and ``adapter/``
or ``model/``), so this needs nothing but its path and the base model it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptune.data import Split, encode
from adaptune.errors import ConfigError, DataError
from adaptune.io import load_adapter
from adaptune.models import load_classifier, load_tokenizer
from adaptune.train import TrainConfig, evaluate, pick_device


class Predictor:
    """A trained task, loaded from its run folder.

    Args:
        run_dir: folder written by :func:`adaptune.train.train`.
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
        for need in ("config.json", "task.json", "tokenizer"):
            if not (run / need).exists():
                raise ConfigError(f"{run} is not a finished run folder (no {need}); train one with 'adaptune train'")
        self.config = TrainConfig.from_dict(json.loads((run / "config.json").read_text(encoding="utf-8"))["train"])
        self.task = json.loads((run / "task.json").read_text(encoding="utf-8"))
        if self.task.get("task_type") == "causal-lm":
            raise ConfigError(f"{run} is a language-model run: generate with 'adaptune generate {run}' "
                              "(or adaptune.generate.Generator); 'adaptune eval' gives its perplexity")
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(str(run / "tokenizer"))
        labels = self.task["label_names"]
        num_labels = 1 if self.task["task_type"] == "regression" else len(labels)
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
        return Split(texts=list(texts), text_pairs=None if pairs is None else list(pairs), labels=labels or [0] * len(texts))

    @torch.no_grad()
    def predict(self, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
        """Label and class probabilities (or a score, for regression) for each text."""
        enc = encode(self._split(texts, text_pairs), self.tokenizer, self.task["max_length"])
        _, outs = evaluate(self.model, enc, **self._eval_kw(batch_size))
        if self.task["task_type"] == "regression":
            return [{"text": t, "score": float(s)} for t, s in zip(texts, np.atleast_1d(outs))]
        names = self.label_names
        return [
            {"text": t, "label": names[int(p.argmax())], "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}
            for t, p in zip(texts, outs)
        ]

    def evaluate(self, split: Split, label_names: list[str] | None, batch_size: int = 64) -> dict[str, float]:
        """Metrics on ``split``, whose class ids refer to ``label_names`` (remapped to this task's)."""
        labels = split.labels
        if self.task["task_type"] == "classification":
            mine = {n: i for i, n in enumerate(self.label_names)}
            unknown = sorted({str(label_names[i]) for i in labels if label_names[i] not in mine})
            if unknown:
                raise DataError(f"labels {unknown} were not seen in training (known: {self.label_names}); check the label column")
            labels = [mine[label_names[i]] for i in labels]
        enc = encode(Split(split.texts, split.text_pairs, labels), self.tokenizer, self.task["max_length"])
        if not enc:
            raise DataError("the split to evaluate is empty")
        return evaluate(self.model, enc, **self._eval_kw(batch_size))[0]

    def _eval_kw(self, batch_size: int) -> dict[str, Any]:
        num = 1 if self.task["task_type"] == "regression" else len(self.label_names)
        return dict(task_type=self.task["task_type"], num_labels=num, batch_size=batch_size, pad_id=self.tokenizer.pad_token_id, device=self.device)
