"""A task model's answers for new inputs, for every kind of task the library trains: the label and
class probabilities (classification), a score (regression), the labels over the threshold
(multi-label), tags and entities (token classification), the chosen answer (multiple choice), the
answer span (extractive QA). Shared by :class:`adaptune.predict.Predictor` (a run's own model) and
:class:`adaptune.multitask.MultiTaskPredictor` (a view of the shared base)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from adaptune.data.batching import encode_choices
from adaptune.data.loading import Split, encode
from adaptune.errors import DataError
from adaptune.runs import _head, _num_outputs, _row
from adaptune.training.qa import answer_questions
from adaptune.training.tagging import tag_texts
from adaptune.training.train import evaluate


def eval_kw(task: dict[str, Any], tokenizer, device: torch.device, batch_size: int) -> dict[str, Any]:
    """The keyword arguments of :func:`adaptune.training.train.evaluate` for this task."""
    names = task.get("label_names") or []
    positive = task.get("positive_label")  # runs from before it was recorded: class 1
    return dict(
        threshold=task.get("threshold", 0.5),
        task_type=task["task_type"],
        num_labels=_num_outputs(task),
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        device=device,
        positive=names.index(positive) if positive in names else 1,
    )


def to_split(task: dict[str, Any], texts: list[str], pairs: list[str] | None, labels: list | None = None) -> Split:
    """Texts (and their pairs) as a split; placeholder labels when none are given (predictions
    read only the outputs)."""
    if task["text_pair"] and pairs is None:
        raise DataError("this task takes text pairs: give a second text for each input")
    if labels is None:
        width = len(task["label_names"]) if task["task_type"] == "multi-label" else 0
        labels = [np.zeros(width, dtype=np.uint8) if width else 0 for _ in texts]
    return Split(texts=list(texts), text_pairs=None if pairs is None else list(pairs), labels=labels)


@torch.no_grad()
def answer(model, tokenizer, task: dict[str, Any], texts: list[str], pairs: list | None, *, batch_size: int, device):
    """One answer dict per input. ``pairs``: the second texts of a pair task, a QA task's contexts,
    or a multiple-choice task's candidate answers (a list per question)."""
    head = _head(task)
    common = dict(batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device)
    if head == "choice":
        return _choose(model, tokenizer, task, texts, pairs, batch_size, device)
    if head == "qa":
        if pairs is None or len(pairs) != len(texts) or any(not isinstance(c, str) for c in pairs):
            raise DataError("a question-answering task needs a context for each question")
        return answer_questions(
            model, tokenizer, list(texts), list(pairs), task, autocast_ctx=contextlib.nullcontext, **common
        )
    if head == "token":
        return tag_texts(model, tokenizer, list(texts), task, autocast_ctx=contextlib.nullcontext, **common)
    enc = encode(to_split(task, texts, pairs), tokenizer, task["max_length"])
    _, outs = evaluate(model, enc, **eval_kw(task, tokenizer, device, batch_size))
    if task["task_type"] == "regression":
        outs = np.atleast_1d(outs)
    return [_row(task, t, o) for t, o in zip(texts, outs)]


def _choose(model, tokenizer, task, questions: list[str], choices, batch_size: int, device) -> list[dict[str, Any]]:
    """Multiple choice: ``choices`` holds each question's candidate answers."""
    if (
        choices is None
        or len(choices) != len(questions)
        or any(
            not isinstance(c, (list, tuple)) or len(c) < 2 or not all(isinstance(x, str) for x in c) for c in choices
        )
    ):
        raise DataError("a multiple-choice task needs two or more choices (texts) for each question")
    split = Split(list(questions), None, [0] * len(questions), [list(c) for c in choices])
    enc = encode_choices(split, tokenizer, task["max_length"])
    _, outs = evaluate(model, enc, **eval_kw(task, tokenizer, device, batch_size))
    rows = []
    for q, options, probs in zip(questions, choices, outs):
        probs = [round(float(x), 6) for x in probs[: len(options)]]
        rows.append({"text": q, "choices": list(options), "answer": int(np.argmax(probs)), "probabilities": probs})
    return rows
