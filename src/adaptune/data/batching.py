"""Tokens and batches: encoding a split, length-bucketed or random batch order, padding a batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from adaptune.data.loading import Split


def encode_split(split: Split, task_type: str, tokenizer, max_length: int, doc_stride: int = 128) -> list[dict]:
    """The features of a split for its task type: sub-word windows of tagged sentences
    (:func:`adaptune.data.tagging.encode_tagged`), question-choice pairs (:func:`encode_choices`),
    question-context windows (:func:`adaptune.data.qa.encode_qa`), else texts (:func:`encode`)."""
    if task_type == "question-answering":
        from adaptune.data.qa import encode_qa

        return encode_qa(split.texts, split.text_pairs, split.labels, tokenizer, max_length, doc_stride)
    if task_type == "token-classification":
        from adaptune.data.tagging import encode_tagged

        return encode_tagged(split.texts, split.labels, tokenizer, max_length)
    if task_type == "multiple-choice":
        return encode_choices(split, tokenizer, max_length)
    return encode(split, tokenizer, max_length)


def encode_choices(split: Split, tokenizer, max_length: int) -> list[dict]:
    """Tokenise a multiple-choice split: each example's question paired with each of its choices
    (the question truncated first, so a choice keeps its words).

    Returns:
        One dict per example whose ``input_ids`` (and ``token_type_ids``) hold one list per choice,
        and ``label``, the right choice's index.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    features = []
    for question, choices, label in zip(split.texts, split.choices, split.labels):
        enc = tokenizer([question] * len(choices), choices, truncation="longest_first", max_length=max_length)
        f = {"input_ids": [list(x) for x in enc["input_ids"]]}
        if "token_type_ids" in enc:
            f["token_type_ids"] = [list(x) for x in enc["token_type_ids"]]
        f["label"] = label
        features.append(f)
    return features


def feature_length(feature: dict) -> int:
    """Tokens of an encoded example: its longest choice's, for multiple choice."""
    ids = feature["input_ids"]
    return max(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids)


def encode(split: Split, tokenizer, max_length: int) -> list[dict]:
    """Tokenise a split, truncating to ``max_length`` tokens and not padding (:func:`collate` pads).

    Args:
        split: the examples.
        tokenizer: a Hugging Face tokenizer; pairs are truncated longest-first.
        max_length: most tokens per example, special tokens included.

    Returns:
        One dict per example: ``input_ids``, ``token_type_ids`` (if the tokenizer makes them), ``label``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    enc = tokenizer(split.texts, split.text_pairs, truncation=True, max_length=max_length)
    features = []
    for i, label in enumerate(split.labels):
        f = {"input_ids": list(enc["input_ids"][i])}
        if "token_type_ids" in enc:
            f["token_type_ids"] = list(enc["token_type_ids"][i])
        f["label"] = label
        features.append(f)
    return features


def bucket_batches(
    lengths: list[int], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, bucket_size: int = 50
) -> list[list[int]]:
    """Group example indices into batches of similar length, so padding wastes little compute.

    Shuffled: indices are shuffled (by ``seed`` and ``epoch``), cut into chunks of
    ``batch_size * bucket_size``, each chunk sorted by length and cut into batches, and the batch
    order shuffled. Not shuffled (evaluation): all indices sorted longest first — an out-of-memory
    error then shows on the first batch. The result depends only on the arguments, so a resumed run
    replays the same batches.

    Args:
        lengths: token count of each example.
        batch_size: examples per batch (the last batch of a chunk may be smaller).
        shuffle: shuffle as above, else sort for evaluation.
        seed, epoch: seed the shuffle; each epoch gives a different order.
        bucket_size: batches per sorted chunk; larger groups lengths more tightly but less randomly.

    Returns:
        Batches of indices; every index appears exactly once.
    """
    if batch_size < 1 or bucket_size < 1:
        raise ValueError(f"batch_size and bucket_size must be at least 1, got {batch_size} and {bucket_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    cut = lambda idx: [idx[i : i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    if not shuffle:
        return cut(np.argsort(-lengths, kind="stable"))
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * bucket_size):
        chunk = order[start : start + batch_size * bucket_size]
        batches += cut(chunk[np.argsort(lengths[chunk], kind="stable")])
    return [batches[i] for i in rng.permutation(len(batches))]


def bucket_length(longest: int, max_length: int, smallest: int = 16) -> int:
    """The padded length of a batch whose longest example has ``longest`` tokens, from a few fixed
    sizes (powers of two from ``smallest``, and ``max_length``): a compiled model (CUDA graphs
    above all) then sees a handful of shapes instead of one per length."""
    size = smallest
    while size < longest:
        size *= 2
    return max(longest, min(size, max_length))


def split_even(idx: list[int], parts: int) -> list[list[int]]:
    """``idx`` in ``parts`` contiguous pieces as even as possible (none empty)."""
    parts = min(parts, len(idx))
    size, extra = divmod(len(idx), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [idx[bounds[k] : bounds[k + 1]] for k in range(parts)]


def collate(features: list[dict], pad_token_id: int, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch of :func:`encode` features to its longest example (right padding).

    Args:
        features: examples from :func:`encode`.
        pad_token_id: id written into padded positions (their attention mask is 0).
        pad_to: pad to this length instead (static shapes; the baseline of ``bench/bucketing.py``).

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids`` (if present) — long tensors of shape
        ``(B, T)`` — and ``labels``: long for class ids, float for regression values, ``(B, T)`` long
        for per-token labels (padded with -100), ``(B, labels)`` float 0/1 for multi-label rows.
    """
    if not features:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)")
    if isinstance(features[0]["input_ids"][0], list):
        return _collate_choices(features, pad_token_id, pad_to)
    longest = max(len(f["input_ids"]) for f in features)
    if pad_to is not None:
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the batch's longest example ({longest} tokens)")
        longest = pad_to
    ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    types = torch.zeros((len(features), longest), dtype=torch.long) if "token_type_ids" in features[0] else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(f["token_type_ids"], dtype=torch.long)
    labels = [f["label"] for f in features]
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if isinstance(labels[0], list):  # per-token labels of a language model (chat.py); -100 is not trained
        batch["labels"] = torch.full((len(features), longest), -100, dtype=torch.long)
        for i, f in enumerate(features):
            batch["labels"][i, : len(f["label"])] = torch.tensor(f["label"], dtype=torch.long)
        return batch
    if isinstance(labels[0], tuple):  # extractive QA: the answer's first and last token
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch
    if isinstance(labels[0], np.ndarray):  # multi-label: one 0/1 row per example
        batch["labels"] = torch.from_numpy(np.stack(labels)).float()
        return batch
    is_class = all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
    batch["labels"] = torch.tensor(labels, dtype=torch.long if is_class else torch.float)
    return batch


def _collate_choices(features: list[dict], pad_token_id: int, pad_to: int | None) -> dict[str, torch.Tensor]:
    """Multiple-choice examples as ``(B, C, T)`` tensors; an example with fewer than C choices is
    padded with empty ones, and ``choice_mask`` (B, C) marks the real ones (only when some are padded)."""
    rows = [[{k: f[k][c] for k in ("input_ids", "token_type_ids") if k in f} for c in range(len(f["input_ids"]))]
            for f in features]  # fmt: skip
    width = max(len(r) for r in rows)
    flat = [r[c] if c < len(r) else {k: [pad_token_id] for k in r[0]} for r in rows for c in range(width)]
    batch = collate([{**x, "label": 0} for x in flat], pad_token_id, pad_to=pad_to)
    batch.pop("labels")
    out = {k: v.view(len(features), width, -1) for k, v in batch.items()}
    if any(len(r) < width for r in rows):
        out["choice_mask"] = torch.tensor([[c < len(r) for c in range(width)] for r in rows])
    out["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    return out
