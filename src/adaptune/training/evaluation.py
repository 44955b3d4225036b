"""Evaluation of a classifier-style task (classification, regression, multi-label, multiple choice)
on an encoded split, and the pieces the training step shares with it: autocast and the logits of a
batch."""

from __future__ import annotations

import numpy as np
import torch

from adaptune.data.batching import feature_length
from adaptune.data.loading import bucket_batches, collate
from adaptune.data.metrics import compute_metrics
from adaptune.errors import ConfigError
from adaptune.training.distributed import Dist


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision="bf16"`` (weights stay fp32); a no-op context for fp32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch``; a multiple-choice batch's ``choice_mask`` (popped from it)
    sets the logits of padded choices to the lowest value, so they get no probability."""
    mask = batch.pop("choice_mask", None)
    out = model(**batch)
    if getattr(out, "start_logits", None) is not None:  # extractive QA: (B, T, 2), start then end
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    logits = out.logits
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), torch.finfo(logits.dtype).min)
    return logits


@torch.no_grad()
def evaluate(
    model,
    encoded: list[dict],
    *,
    task_type: str,
    num_labels: int,
    batch_size: int,
    pad_id: int,
    device,
    dd: Dist | None = None,
    precision: str = "fp32",
    positive: int = 1,
    threshold: float | None = None,
    select: str = "micro_f1",
) -> tuple[dict, np.ndarray]:
    """Metrics on an encoded split, and the raw outputs (:func:`scores`: class probabilities,
    per-label probabilities for multi-label, or scores for regression).

    ``positive`` is the class whose F1 a two-class task reports (see :mod:`adaptune.data.metrics`).
    ``threshold``: a multi-label task's decision threshold; None chooses it on this split by
    ``select`` (dev), reported as the metric ``threshold``.

    Under torchrun (``dd``) each rank scores every N-th example and the outputs are gathered, so
    every rank returns the same metrics.
    """

    def rows(batch, idx):
        with autocast(torch.device(device), precision):
            logits = forward_logits(model, batch).float()
        return scores(task_type, logits).cpu().numpy()

    outputs = batched_rows(model, encoded, rows, batch_size=batch_size, pad_id=pad_id, device=device, dd=dd)
    if task_type == "multiple-choice":  # examples with fewer choices: probability 0 for the missing ones
        width = max((len(o) for o in outputs), default=0)
        outputs = [np.pad(o, (0, width - len(o))) for o in outputs]
    outs = np.stack(outputs) if outputs else np.zeros((0,))
    labels = np.array([e["label"] for e in encoded])
    if task_type == "multi-label":
        return compute_metrics(task_type, outs, labels, threshold=threshold, select=select), outs
    if task_type == "multiple-choice":
        return compute_metrics(task_type, outs, labels), outs
    preds = outs if task_type == "regression" else outs.argmax(-1)
    return compute_metrics(task_type, preds, labels, num_labels, positive), outs


@torch.no_grad()
def batched_rows(model, features: list[dict], rows, *, batch_size: int, pad_id: int, device, dd: Dist | None = None):
    """Every feature's output, in the features' order: the model in eval mode (its mode restored
    after), batches of similar length padded by :func:`collate` (labels left out) and on
    ``device``, and ``rows(batch, idx)`` giving one output per feature ``idx`` of the batch. Under
    torchrun (``dd``) each rank runs every N-th feature and the outputs are gathered, so every rank
    returns them all."""
    was_training = model.training
    model.eval()
    mine = list(range(len(features))) if dd is None else dd.shard(list(range(len(features))))
    scored: list = []
    for idx in bucket_batches([feature_length(features[i]) for i in mine], batch_size, shuffle=False):
        idx = [mine[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], pad_id).items() if k != "labels"}
        scored += zip(idx, rows(batch, idx))
    if dd is not None:
        scored = [pair for part in dd.gather(scored) for pair in part]
    out: list = [None] * len(features)
    for i, row in scored:
        out[i] = row
    model.train(was_training)
    return out


def scores(task_type: str, logits: torch.Tensor) -> torch.Tensor:
    """What a head's logits (..., outputs) mean: the value of a regression, a probability per label
    of a multi-label task (sigmoid), else class probabilities (softmax)."""
    if task_type == "regression":
        return logits.squeeze(-1)
    return logits.sigmoid() if task_type == "multi-label" else logits.softmax(-1)
