"""Extractive QA with a model: start and end logits of every window, the best span of every
question (:func:`adaptune.data.qa.best_spans`), SQuAD's exact match and F1, and for SQuAD 2.0 the
no-answer threshold chosen on dev."""

from __future__ import annotations

import numpy as np
import torch

from adaptune.data.qa import answer_or_null, best_spans, encode_qa
from adaptune.data.squad import squad_scores
from adaptune.training.distributed import Dist
from adaptune.training.evaluation import batched_rows


@torch.no_grad()
def window_logits(
    model, features: list[dict], *, batch_size: int, pad_id: int, device, autocast_ctx, dd: Dist | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of every window (each rank scores every N-th under torchrun)."""

    def rows(batch, idx):
        with autocast_ctx():
            out = model(**batch)
        s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        return list(zip(s, e))

    both = batched_rows(model, features, rows, batch_size=batch_size, pad_id=pad_id, device=device, dd=dd)
    return [s for s, _ in both], [e for _, e in both]


def null_threshold(spans: list[dict], references: list[list[str]]) -> float:
    """The no-answer threshold with the best F1 on these questions (SQuAD 2.0's "best_f1_thresh"):
    a question is answered when its best span's score beats its null score by more than it."""
    margins = sorted({s["score"] - s["null_score"] for s in spans if np.isfinite(s["score"])})
    candidates = [-np.inf] + [m - 1e-6 for m in margins] + [np.inf]
    return float(max(candidates, key=lambda t: squad_scores(answer_or_null(spans, t), references)["f1"]))


def evaluate_qa(
    model,
    features: list[dict],
    contexts: list[str],
    answers: list[list[dict]],
    *,
    threshold: float | None = None,
    with_null: bool = False,
    **kw,
) -> tuple[dict[str, float], list[str]]:
    """SQuAD exact match and F1 of a split's questions, and the predicted answers.

    ``with_null``: SQuAD 2.0 data (some questions have no answer): answers below ``threshold``
    become "" (None: the threshold is chosen here, for dev, and reported as ``null_threshold``).
    ``kw``: those of :func:`window_logits`."""
    starts, ends = window_logits(model, features, **kw)
    spans = best_spans(features, starts, ends, contexts)
    references = [[a["text"] for a in ans] or [""] for ans in answers]
    if with_null and threshold is None:
        threshold = null_threshold(spans, references)
    predicted = answer_or_null(spans, threshold if with_null else None)
    metrics = squad_scores(predicted, references)
    if with_null:
        metrics["null_threshold"] = float(threshold)
    return metrics, predicted


def answer_questions(model, tokenizer, questions: list[str], contexts: list[str], task: dict, **kw) -> list[dict]:
    """Each question's answer in its context: text, character offsets, score (start + end logit),
    or no answer (``answer`` None) below a SQuAD 2.0 run's threshold."""
    features = encode_qa(questions, contexts, None, tokenizer, task["max_length"], task.get("doc_stride", 128))
    starts, ends = window_logits(model, features, **kw)
    spans = best_spans(features, starts, ends, contexts)
    threshold = task.get("null_threshold")
    rows = []
    for q, span in zip(questions, spans):
        answered = np.isfinite(span["score"]) and (threshold is None or span["score"] - span["null_score"] > threshold)
        row = {"text": q, "answer": span["text"] if answered else None}
        if answered:
            row.update(start=span["start"], end=span["end"], score=round(span["score"], 4))
        rows.append(row)
    return rows
