"""Scoring one encoded split of a prepared task with the model being trained, whatever the task
type: a causal LM's loss and perplexity, a tagger's entity scores, or a classifier's metrics."""

from __future__ import annotations

from adaptune.lm.causal_lm import evaluate_lm
from adaptune.training.config import CAUSAL_LM, TrainConfig
from adaptune.training.distributed import Dist
from adaptune.training.prepared import _Prepared
from adaptune.training.steps import autocast, evaluate
from adaptune.training.qa import evaluate_qa
from adaptune.training.tagging import evaluate_tagged


def score_split(
    model, split: str, data: _Prepared, cfg: TrainConfig, device, pad_id: int, dd: Dist | None, threshold=None
) -> dict:
    """The metrics of ``split`` of ``data``; ``threshold``: a multi-label task's decision threshold,
    or a SQuAD 2.0 task's no-answer threshold (None: chosen on this split, as on dev)."""
    encoded = data.enc[split]
    common = dict(batch_size=cfg.batch_size * 2, pad_id=pad_id, device=device, dd=dd)
    amp = lambda: autocast(device, cfg.precision)
    if data.task_type == CAUSAL_LM:
        return evaluate_lm(model, encoded, autocast_ctx=amp, **common)
    if data.task_type == "question-answering":
        raw, with_null = getattr(data.raw, split), data.task["with_null"]
        kw = dict(threshold=threshold, with_null=with_null, autocast_ctx=amp, **common)
        return evaluate_qa(model, encoded, raw.text_pairs, raw.labels, **kw)[0]
    if data.task_type == "token-classification":
        names, span_tags = data.task["label_names"], data.task["span_tags"]
        return evaluate_tagged(model, encoded, names, span_tags, autocast_ctx=amp, **common)[0]
    return evaluate(
        model,
        encoded,
        task_type=data.task_type,
        num_labels=data.num_labels,
        precision=cfg.precision,
        positive=data.positive,
        threshold=threshold,
        select=data.metric,
        **common,
    )[0]
