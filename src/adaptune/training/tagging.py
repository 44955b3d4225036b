"""Token classification with a model: scoring encoded windows, merging them back into one tag per
word (:mod:`adaptune.data.tagging`), the task's metrics, and predicted entities with their
character offsets."""

from __future__ import annotations

import numpy as np
import torch

from adaptune.data.entities import spans, tagging_metrics
from adaptune.data.tagging import IGNORE, encode_tagged, merge_words, words_with_offsets
from adaptune.training.distributed import Dist
from adaptune.training.evaluation import batched_rows


def sentence_lengths(features: list[dict]) -> list[int]:
    """Words per sentence of encoded windows (every word is owned by exactly one window)."""
    n = max((f["sentence"] for f in features), default=-1) + 1
    counts = [0] * n
    for f in features:
        counts[f["sentence"]] += sum(1 for w in f["words"] if w >= 0)
    return counts


@torch.no_grad()
def predict_windows(
    model, features: list[dict], *, batch_size: int, pad_id: int, device, autocast_ctx, dd: Dist | None = None
) -> list[np.ndarray]:
    """The most likely tag id at every position of every window (under torchrun each rank scores
    every N-th window and the results are gathered)."""

    def rows(batch, idx):
        with autocast_ctx():
            best = model(**batch).logits.argmax(-1).cpu().numpy()
        return [best[row, : len(features[i]["input_ids"])] for row, i in enumerate(idx)]

    return batched_rows(model, features, rows, batch_size=batch_size, pad_id=pad_id, device=device, dd=dd)


def evaluate_tagged(
    model, features: list[dict], names: list[str], span_tags: bool, **kw
) -> tuple[dict[str, float], list[list[int]]]:
    """The task's metrics on encoded windows (:func:`adaptune.data.entities.tagging_metrics`) and the
    predicted tag ids of every word of every sentence. ``kw``: those of :func:`predict_windows`."""
    n_words = sentence_lengths(features)
    predicted = merge_words(features, predict_windows(model, features, **kw), n_words)
    true = merge_words(features, [np.asarray(f["label"]) for f in features], n_words)
    as_tags = lambda rows: [[names[i] for i in row] for row in rows]
    return tagging_metrics(as_tags(predicted), as_tags(true), span_tags), predicted


def tag_texts(model, tokenizer, texts: list[str], task: dict, **kw) -> list[dict]:
    """Each text split into words (:func:`adaptune.data.tagging.words_with_offsets`) and tagged;
    span tags are joined into entities with their type, text and character offsets ``[start, end)``."""
    split = [words_with_offsets(t) for t in texts]
    features = encode_tagged([[w for w, _, _ in s] for s in split], None, tokenizer, task["max_length"])
    for f in features:  # placeholders mark the owned words; predictions replace them
        f["label"] = [0 if w >= 0 else IGNORE for w in f["words"]]
    predicted = merge_words(features, predict_windows(model, features, **kw), [len(s) for s in split])
    names, rows = task["label_names"], []
    for text, words, ids in zip(texts, split, predicted):
        tags = [names[i] for i in ids]
        row = {
            "text": text,
            "tokens": [{"text": w, "tag": t, "start": a, "end": b} for (w, a, b), t in zip(words, tags)],
        }
        if task.get("span_tags", True):
            row["entities"] = [
                {"type": kind, "text": text[words[a][1] : words[b][2]], "start": words[a][1], "end": words[b][2]}
                for kind, a, b in spans(tags)
            ]
        rows.append(row)
    return rows
