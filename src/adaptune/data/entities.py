"""Entity spans from tag sequences, and the entity-level scores of the CoNLL shared tasks.

Tags are ``O`` or ``PREFIX-TYPE`` with PREFIX one of B (begin), I (inside), E (end), S (single), so
BIO, IOB1, IOB2 and BIOES (also written IOBES) files all read alike. Spans are found the way the
CoNLL evaluation script (``conlleval``) finds them:

- a span starts at B or S, at a change of type, and at an I or E that follows O, E or S (so an
  ``I-PER`` right after ``O`` starts a PER span: IOB1 files and a tagger's stray I- tags are read
  as conlleval reads them, not dropped);
- a span ends before B, S or O, after E or S, and at a change of type.

Precision, recall and F1 count a predicted span correct only when type, start and end all match a
true span; token accuracy is reported beside them. Everything is plain Python and numpy.
"""

from __future__ import annotations

import re

import numpy as np

from adaptune.data.metrics import accuracy, macro_f1

_PREFIXED = re.compile(r"^([BIESLU])-(.+)$")
# BILOU's L (last) and U (unit) are E and S under other names
_ALIASES = {"L": "E", "U": "S"}


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``; a tag without a prefix (``"PER"``)
    is read as inside a span of that type, ``("I", "PER")``."""
    if tag == "O":
        return "O", ""
    m = _PREFIXED.match(tag)
    if m is None:
        return "I", tag
    return _ALIASES.get(m.group(1), m.group(1)), m.group(2)


def is_span_scheme(tags) -> bool:
    """Whether a tag set names spans (every tag ``O`` or ``B-``/``I-``/``E-``/``S-`` prefixed, at
    least one prefixed): entity scores apply. Otherwise (part-of-speech tags) each token's tag is
    its own answer and accuracy is the metric."""
    tags = set(tags)
    return any(t != "O" for t in tags) and all(t == "O" or _PREFIXED.match(t) for t in tags)


def _ends(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    (pp, pt), (cp, ct) = prev, cur
    if pp == "O":
        return False
    return pp in ("E", "S") or cp in ("B", "S", "O") or pt != ct


def _starts(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    (pp, pt), (cp, ct) = prev, cur
    if cp == "O":
        return False
    return cp in ("B", "S") or pp in ("O", "E", "S") or pt != ct


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """The spans of one sentence's tags as ``(type, first, last)`` token indices (``last``
    inclusive), in order.

    Example::

        spans(["B-PER", "I-PER", "O", "I-LOC"])  # [("PER", 0, 1), ("LOC", 3, 3)]
    """
    out, start, prev = [], None, ("O", "")
    for i, tag in enumerate([*tags, "O"]):  # a final O closes the last span
        cur = split_tag(tag)
        if start is not None and _ends(prev, cur):
            out.append((prev[1], start, i - 1))
            start = None
        if _starts(prev, cur):
            start = i
        prev = cur
    return out


def entity_scores(predicted: list[list[str]], true: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (micro over every span of every sentence), the
    macro-F1 over entity types, and token accuracy.

    Args:
        predicted, true: per sentence, one tag per token (the same lengths).

    Returns:
        ``entity_f1``, ``entity_precision``, ``entity_recall``, ``type_macro_f1`` (mean over the
        types present or predicted), ``accuracy`` (tokens), ``true_entities``, ``predicted_entities``.
        A span counts as correct only with its type, first and last token right.

    Example::

        entity_scores([["B-PER", "O"]], [["B-PER", "I-PER"]])["entity_f1"]  # 0.0 (the end is wrong)
    """
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predicted sentences but {len(true)} true ones")
    found, gold, hit, right, tokens = {}, {}, {}, 0, 0
    for k, (p, t) in enumerate(zip(predicted, true)):
        if len(p) != len(t):
            raise ValueError(f"sentence {k}: {len(p)} predicted tags for {len(t)} tokens")
        ps, ts = set(spans(p)), set(spans(t))
        for kind, counts in ((ps, found), (ts, gold), (ps & ts, hit)):
            for span in kind:
                counts[span[0]] = counts.get(span[0], 0) + 1
        right += sum(a == b for a, b in zip(p, t))
        tokens += len(t)
    if tokens == 0:
        raise ValueError("no tokens to score")
    n_hit, n_found, n_gold = sum(hit.values()), sum(found.values()), sum(gold.values())
    per_type = [_f1(hit.get(c, 0), found.get(c, 0), gold.get(c, 0)) for c in sorted(set(found) | set(gold))]
    return {
        "entity_f1": _f1(n_hit, n_found, n_gold),
        "entity_precision": n_hit / n_found if n_found else 0.0,
        "entity_recall": n_hit / n_gold if n_gold else 0.0,
        "type_macro_f1": float(np.mean(per_type)) if per_type else 0.0,
        "accuracy": right / tokens,
        "true_entities": float(n_gold),
        "predicted_entities": float(n_found),
    }


def _f1(hit: int, found: int, gold: int) -> float:
    return 2 * hit / (found + gold) if found + gold else 0.0


def tagging_metrics(predicted: list[list[str]], true: list[list[str]], span_tags: bool) -> dict[str, float]:
    """The metrics of a token-classification task: :func:`entity_scores` for span tags (BIO,
    BIOES), else (tags of single tokens, e.g. part of speech) token ``accuracy`` and the ``macro_f1``
    over tags; both with ``majority_baseline``, the accuracy of tagging every token with the most
    frequent true tag."""
    flat_p = [t for s in predicted for t in s]
    flat_t = [t for s in true for t in s]
    if span_tags:
        out = entity_scores(predicted, true)
    else:
        out = {"accuracy": accuracy(np.array(flat_p), np.array(flat_t)), "macro_f1": macro_f1(flat_p, flat_t)}
    _, counts = np.unique(np.array(flat_t), return_counts=True)
    out["majority_baseline"] = float(counts.max() / len(flat_t))
    out["predicted_tags"] = float(len(set(flat_p)))
    return out
