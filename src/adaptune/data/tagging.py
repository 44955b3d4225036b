"""Token classification data: sentences of words, one tag each, made into sub-word windows.

A sentence is a list of words (CoNLL files and JSON Lines ``tokens`` give them split already; a
plain text is split by :func:`words_with_offsets`). The tokenizer splits words into sub-words; a
word's tag is learned and predicted on its first sub-word, the others carry no label (-100).

A sentence longer than ``max_length`` sub-words is cut into overlapping windows of whole words
(:func:`windows`), never truncated: each window overlaps the one before by up to ``stride``
sub-words, and every word is *owned* by exactly one window, the one where it sits farthest from a
cut. Only owned words are labelled, in training and in evaluation, so every word is trained and
scored exactly once and the windows' predictions merge back into one tag per word
(:func:`merge_words`). A single word longer than a window keeps its first sub-words.
"""

from __future__ import annotations

import re

import numpy as np

from adaptune.errors import ConfigError

IGNORE = -100  # the label of positions that are not a word's first sub-word (cross-entropy skips it)

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words_with_offsets(text: str) -> list[tuple[str, int, int]]:
    """A text split into words the CoNLL way (punctuation apart from letters and digits), each with
    its character span ``[start, end)`` in ``text``.

    Example::

        words_with_offsets("Paris, France")  # [("Paris", 0, 5), (",", 5, 6), ("France", 7, 13)]
    """
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _pieces(words: list[str], tokenizer) -> tuple[list[int], list[list[int]], list[int], bool]:
    """One sentence tokenised once: the special tokens before and after the sub-words, each word's
    sub-word ids (a word the tokenizer drops entirely, such as a control character, becomes the
    unknown token, so that it still gets a tag), and whether the tokenizer makes token type ids."""
    enc = tokenizer(words, is_split_into_words=True) if words else tokenizer("")
    ids = list(enc["input_ids"])
    word_ids = enc.word_ids() if words else [None] * len(ids)
    inside = [k for k, w in enumerate(word_ids) if w is not None]
    lead, tail = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
    out: list[list[int]] = [[] for _ in words]
    for k in inside:
        out[word_ids[k]].append(ids[k])
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return ids[:lead], [p or [unk] for p in out], ids[tail:], "token_type_ids" in enc


def windows(lengths: list[int], budget: int, stride: int) -> list[tuple[int, int, list[int]]]:
    """Cut a sentence whose words have ``lengths`` sub-words into windows of whole words.

    Args:
        lengths: sub-words per word.
        budget: most sub-words per window (special tokens excluded).
        stride: most sub-words a window shares with the one before it.

    Returns:
        ``(first, end, owned)`` per window: words ``first`` to ``end - 1``, and the indices of the
        words it owns. Every word is in at least one window and owned by exactly one.
    """
    n = len(lengths)
    if n == 0:
        return [(0, 0, [])]
    spans, first = [], 0
    cost = [min(c, budget) for c in lengths]  # a word longer than a window keeps its first sub-words
    while True:
        end, used = first, 0
        while end < n and used + cost[end] <= budget:
            used += cost[end]
            end += 1
        end = max(end, first + 1)
        spans.append((first, end))
        if end >= n:
            break
        nxt, shared = end, 0  # go back while the overlap stays within the stride
        while nxt - 1 > first and shared + cost[nxt - 1] <= stride:
            nxt -= 1
            shared += cost[nxt]
        first = nxt
    owner = []
    for w in range(n):  # the window where the word is farthest from a cut; the earlier on ties
        best = max(
            (k for k, (a, b) in enumerate(spans) if a <= w < b),
            key=lambda k: (min(w - spans[k][0], spans[k][1] - 1 - w), -k),
        )
        owner.append(best)
    return [(a, b, [w for w in range(a, b) if owner[w] == k]) for k, (a, b) in enumerate(spans)]


def encode_tagged(
    sentences: list[list[str]], tags: list[list[int]] | None, tokenizer, max_length: int, stride: int = 32
) -> list[dict]:
    """Sub-word features of tagged sentences, long ones cut into windows (see the module).

    Args:
        sentences: words per sentence.
        tags: tag ids per word (None for prediction: every owned word gets a placeholder 0).
        tokenizer: a fast Hugging Face tokenizer (it must map sub-words to words).
        max_length: most tokens per window, special tokens included.
        stride: most sub-words a window shares with the one before it.

    Returns:
        One dict per window: ``input_ids``, ``token_type_ids`` (if the tokenizer makes them),
        ``label`` (a tag id at each owned word's first sub-word, else -100), ``sentence`` and
        ``words`` (the word index at each labelled position, -1 elsewhere).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("token classification needs a fast tokenizer (one that maps sub-words to words)")
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_length - specials
    if budget < 1:
        raise ConfigError(f"--max-length {max_length} leaves no room beside {specials} special tokens; raise it")
    stride = max(0, min(stride, budget // 2))
    out = []
    for s, words in enumerate(sentences):
        lead, pieces, trail, types = _pieces(words, tokenizer)
        for first, end, owned in windows([len(p) for p in pieces], budget, stride):
            mine = set(owned)
            ids, label, where = list(lead), [IGNORE] * len(lead), [-1] * len(lead)
            for w in range(first, end):
                part = pieces[w][:budget]  # a word longer than a window keeps its first sub-words
                tag = (tags[s][w] if tags is not None else 0) if w in mine else IGNORE
                ids += part
                label += [tag] + [IGNORE] * (len(part) - 1)
                where += [w if w in mine else -1] + [-1] * (len(part) - 1)
            ids += trail
            f = {"input_ids": ids}
            if types:
                f["token_type_ids"] = [0] * len(ids)
            f["label"] = label + [IGNORE] * len(trail)
            f["sentence"], f["words"] = s, where + [-1] * len(trail)
            out.append(f)
    return out


def merge_words(features: list[dict], predictions: list[np.ndarray], n_words: list[int]) -> list[list[int]]:
    """One predicted id per word of every sentence, from per-window predictions (``predictions[i]``
    holds an id per position of ``features[i]``).

    Raises:
        ValueError: a word was predicted by no window, or by two (the windows do not tile).
    """
    merged = [[-1] * n for n in n_words]
    for f, pred in zip(features, predictions):
        row = merged[f["sentence"]]
        for pos, w in enumerate(f["words"]):
            if w >= 0:
                if row[w] != -1:
                    raise ValueError(f"word {w} of sentence {f['sentence']} is owned by two windows")
                row[w] = int(pred[pos])
    for s, row in enumerate(merged):
        if -1 in row:
            raise ValueError(f"word {row.index(-1)} of sentence {s} was predicted by no window")
    return merged
