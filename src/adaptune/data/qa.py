"""Extractive QA features: a question and its context as token windows, and answers back as text.

A context longer than the window is cut into windows that overlap by ``doc_stride`` tokens, each
with the whole question in front (the tokenizer's own overflow with a stride). A window is
labelled with the first and last token of the answer when the answer lies wholly inside it, else
with the first token (the "no answer" position, as BERT's SQuAD code does): every window trains,
none is dropped. :func:`best_spans` reads the spans back: over every window of a question, the
``n_best`` start and end tokens, kept when both lie in the context, end ≥ start and the span is at
most ``max_answer_length`` tokens; the best by start + end logit wins, and its text is cut from the
context by the tokens' character offsets.
"""

from __future__ import annotations

import numpy as np

from adaptune.errors import ConfigError


def encode_qa(
    questions: list[str],
    contexts: list[str],
    answers: list[list[dict]] | None,
    tokenizer,
    max_length: int,
    doc_stride: int = 128,
) -> list[dict]:
    """Token windows of (question, context) pairs.

    Returns:
        One dict per window: ``input_ids``, ``token_type_ids`` (if the tokenizer makes them),
        ``label`` ((start, end) token indices; (0, 0) when the window holds no answer), ``example``
        (the question's index) and ``offsets`` (each token's character span in the context, None
        outside the context).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("extractive QA needs a fast tokenizer (one that gives character offsets)")
    longest = max((len(tokenizer(q)["input_ids"]) for q in questions), default=0)
    if longest + 8 > max_length:  # the question, special tokens, and room for some context
        raise ConfigError(
            f"--max-length {max_length} leaves no room for the context after a question of {longest} tokens; "
            f"raise it to at least {longest + 32}"
        )
    stride = max(0, min(doc_stride, (max_length - longest) // 2))
    enc = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    out = []
    for w in range(len(enc["input_ids"])):
        example = enc["overflow_to_sample_mapping"][w]
        seq = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq)]
        f = {"input_ids": list(enc["input_ids"][w])}
        if "token_type_ids" in enc:
            f["token_type_ids"] = list(enc["token_type_ids"][w])
        f["label"] = _answer_tokens(offsets, answers[example] if answers is not None else [])
        f["example"], f["offsets"] = example, offsets
        out.append(f)
    return out


def _answer_tokens(offsets: list, answers: list[dict]) -> tuple[int, int]:
    """The first answer's first and last token in this window, or (0, 0) when it is not all in it."""
    if not answers:
        return (0, 0)
    a = answers[0]
    first, last = a["answer_start"], a["answer_start"] + len(a["text"])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
        return (0, 0)
    start = next(i for i in inside if offsets[i][1] > first)
    end = next(i for i in reversed(inside) if offsets[i][0] < last)
    return (start, end)


def best_spans(
    features: list[dict],
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    contexts: list[str],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[dict]:
    """The best answer span of every question, from its windows' logits.

    Returns:
        Per question: ``text``, ``start`` and ``end`` (character offsets in the context), ``score``
        (start + end logit, "" / -inf when no valid span exists) and ``null_score`` (the lowest
        no-answer score of its windows: start + end logit at the first token), for SQuAD 2.0's
        no-answer decision.
    """
    best = [{"text": "", "start": 0, "end": 0, "score": -np.inf, "null_score": np.inf} for _ in contexts]
    for f, s, e in zip(features, start_logits, end_logits):
        row, offsets = best[f["example"]], f["offsets"]
        n = len(offsets)
        s, e = np.asarray(s[:n], dtype=np.float64), np.asarray(e[:n], dtype=np.float64)
        row["null_score"] = min(row["null_score"], s[0] + e[0])
        for i in np.argsort(-s)[:n_best]:
            for j in np.argsort(-e)[:n_best]:
                if offsets[i] is None or offsets[j] is None or j < i or j - i + 1 > max_answer_length:
                    continue
                if s[i] + e[j] > row["score"]:
                    a, b = offsets[i][0], offsets[j][1]
                    row.update(text=contexts[f["example"]][a:b], start=a, end=b, score=float(s[i] + e[j]))
    for row in best:
        row["null_score"] = float(row["null_score"])
    return best


def answer_or_null(spans: list[dict], threshold: float | None) -> list[str]:
    """Answer texts; with a SQuAD 2.0 ``threshold``, "" (no answer) where the null score beats the
    best span's by more than it."""
    if threshold is None:
        return [s["text"] for s in spans]
    return [s["text"] if s["score"] - s["null_score"] > threshold else "" for s in spans]
