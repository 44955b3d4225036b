"""Extractive question answering data: SQuAD v1.1 / v2.0 files and flat JSON Lines, and the official
SQuAD scores.

An example is a question, its context, and its answers (each a text and its character offset in
the context; none for a SQuAD 2.0 question without an answer). Exact match and F1 follow the
official evaluation scripts (v1.1 and v2.0): answers are normalised (lower case, punctuation and
the articles a/an/the removed, white space collapsed), F1 is over the normalised words, an empty
answer matches only an empty answer, and a prediction takes its best score over the references.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

from adaptune.errors import DataError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces.

    Example::

        normalize_answer("The  Denver Broncos!")  # "denver broncos"
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """F1 over normalised words; an empty answer scores 1 against an empty answer, else 0."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over a question's references (``[""]`` for
    a question without an answer), averaged over the questions; for SQuAD 2.0 data also the scores
    of the questions with and without an answer."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    em, f1, has = [], [], []
    for pred, refs in zip(predictions, references):
        refs = refs or [""]
        em.append(max(exact_match(pred, r) for r in refs))
        f1.append(max(f1_score(pred, r) for r in refs))
        has.append(any(normalize_answer(r) for r in refs))
    out = {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}
    if not all(has):
        for name, keep in (("has_answer", True), ("no_answer", False)):
            idx = [i for i, h in enumerate(has) if h == keep]
            if idx:
                out[f"{name}_f1"] = 100 * sum(f1[i] for i in idx) / len(idx)
        out["no_answer_share"] = 1 - sum(has) / len(has)
    return out


def is_squad(source) -> bool:
    """Whether a data file holds extractive QA: a SQuAD JSON file (an object with ``data``), or JSON
    Lines whose first record has ``question``, ``context`` and ``answers``."""
    path = Path(str(source))
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096)
        if head.lstrip().startswith("{") and '"data"' in head[:300]:
            return '"paragraphs"' in head
        f.seek(0)
        line = f.readline()
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and {"question", "context", "answers"} <= set(first)


def read_squad(path: Path) -> tuple[list[str], list[str], list[list[dict]]]:
    """Questions, contexts and answers of a SQuAD JSON file (``{"data": [{"paragraphs": ...}]}``,
    v1.1 or v2.0) or of JSON Lines with ``question``, ``context`` and ``answers`` (a list of
    ``{"text", "answer_start"}``, or SQuAD-on-the-hub's ``{"text": [...], "answer_start": [...]}``).

    Raises:
        DataError: naming the file, the question (or line) and the field of the first bad example,
            e.g. an answer that is not in its context at its offset.
    """
    text = _read(path)
    if text.lstrip().startswith("{") and '"data"' in text[:200]:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        rows = [
            (qa, p.get("context"), f"question {qa.get('id', '?')!r}")
            for article in doc.get("data", [])
            for p in article.get("paragraphs", [])
            for qa in p.get("qas", [])
        ]
    else:
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    qa = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"line {number} of {path} is not valid JSON ({e.msg})") from None
                rows.append((qa, qa.get("context") if isinstance(qa, dict) else None, f"line {number}"))
    if not rows:
        raise DataError(f"{path} holds no questions; write SQuAD JSON or one question per line")
    questions, contexts, answers = [], [], []
    for qa, context, where in rows:
        q, a = _checked(qa, context, f"{path.name}, {where}")
        questions.append(q)
        contexts.append(context)
        answers.append(a)
    return questions, contexts, answers


def _read(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8") from None


def _checked(qa, context, where: str) -> tuple[str, list[dict]]:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
        raise DataError(f"{where}: field 'question' must be a text")
    if not isinstance(context, str) or not context:
        raise DataError(f"{where}: field 'context' must be a non-empty text")
    raw = [] if qa.get("is_impossible") else qa.get("answers", [])
    if isinstance(raw, dict):  # the hub's columnar form
        raw = [{"text": t, "answer_start": s} for t, s in zip(raw.get("text", []), raw.get("answer_start", []))]
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'answers' must be a list of {{text, answer_start}}")
    answers = []
    for a in raw:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(a.get("answer_start"), int):
            raise DataError(f"{where}: each answer needs a text and an integer answer_start, got {str(a)[:60]}")
        start, span = a["answer_start"], a["text"]
        if context[start : start + len(span)] != span:
            raise DataError(f"{where}: answer {span[:40]!r} is not in the context at offset {start}; fix answer_start")
        answers.append({"text": span, "answer_start": start})
    return qa["question"], answers
