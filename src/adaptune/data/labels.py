"""Labels as the files write them, mapped to what a model trains on: class ids (sorted names),
regression values, multi-label 0/1 rows, and the inference of a task's type from its labels."""

from __future__ import annotations

import math

import numpy as np

from adaptune.errors import DataError
from adaptune.data.sources import Table


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _as_number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _class_name(v) -> str:
    # 1, 1.0, "1" and "1.0" are one class: files store numbers either way.
    f = _as_number(v)
    return str(int(f)) if f is not None and f.is_integer() else str(v).strip()


def _sorted_names(values) -> list[str]:
    names = sorted({_class_name(v) for v in values})
    if all(_as_number(n) is not None for n in names):  # numeric classes in numeric order: 2 before 10
        names.sort(key=float)
    return names


def _label_set(v, delimiter: str) -> list[str]:
    """One example's labels: a JSON list, or a string of labels joined by ``delimiter``."""
    if isinstance(v, (list, tuple)):
        return [_class_name(x) for x in v if not missing(x)]
    if missing(v):
        return []
    return [_class_name(x) for x in str(v).split(delimiter) if x.strip()]


def multi_hot(values, table: Table, names: list[str], delimiter: str, notes: list[str]) -> list[np.ndarray]:
    """0/1 rows (uint8, one column per label) of each example's label set; a label that training
    never saw cannot be learned or predicted: it is left out, with a note."""
    ids = {n: i for i, n in enumerate(names)}
    rows, unseen = [], 0
    for v in values:
        row = np.zeros(len(names), dtype=np.uint8)
        for name in _label_set(v, delimiter):
            if name in ids:
                row[ids[name]] = 1
            else:
                unseen += 1
        rows.append(row)
    if unseen:
        notes.append(f"{table.name}: {unseen} label occurrences of labels absent from train left out")
    return rows


def map_labels(values, table: Table, col, task_type: str, names: list[str] | None) -> list:
    if task_type == "regression":
        out = [_as_number(v) for v in values]
        bad = next((v for v, f in zip(values, out) if f is None), None)
        if bad is not None:
            raise DataError(
                f"label column {col!r} in {table.name} has a non-numeric value {bad!r}; regression needs "
                "finite numbers: fix the value or pass task_type='classification'"
            )
        return out
    ids = {n: i for i, n in enumerate(names)}
    unknown = next((_class_name(v) for v in values if _class_name(v) not in ids), None)
    if unknown is not None:
        raise DataError(
            f"label {unknown!r} in {table.name} is not one of the train labels ({', '.join(names)}); "
            "fix the label or add train examples of it"
        )
    return [ids[_class_name(v)] for v in values]


def label_names(raw, label, values: list, ttype: str, delimiter: str) -> list[str] | None:
    """The classes (or multi-label labels) of a task, from the source or the train labels."""
    if ttype == "regression":
        return None
    names = raw.label_names.get(label)
    if names is not None:
        return list(names)
    if ttype == "multi-label":
        if not delimiter:
            raise DataError("label_delimiter must not be empty; pass e.g. ',' or '|'")
        names = _sorted_names([n for v in values for n in _label_set(v, delimiter)])
        if len(names) < 2:
            found = f"only the label {names[0]!r}" if names else "no labels at all"
            raise DataError(
                f"{raw.train.name} has {found} in column {label!r}; a multi-label task needs two or more "
                f"(labels separated by {delimiter!r}: pass label_delimiter= if they are separated otherwise)"
            )
        return names
    names = _sorted_names(values)
    if len(names) < 2:
        raise DataError(f"{raw.train.name} has a single label {names[0]!r}; a classifier needs two or more")
    return names


def inferred_task_type(values: list) -> str:
    """Multi-label when a train label is a list; regression when every train label is a number and
    not all are whole; else classification."""
    if any(isinstance(v, (list, tuple)) for v in values):
        return "multi-label"
    numbers = [_as_number(v) for v in values]
    if all(n is not None for n in numbers) and not all(n.is_integer() for n in numbers):
        return "regression"
    return "classification"


# ----------------------------------------------------------------------------- token classification


def is_tagged(table: Table, words_column) -> bool:
    """Whether a table holds tagged sentences: its words column (``tokens`` by default) holds lists."""
    values = table.columns.get(words_column if words_column is not None else "tokens")
    return bool(values) and isinstance(values[0], (list, tuple))


def _where(table: Table, i: int) -> str:
    return f"line {table.lines[i]} of {table.name}" if table.lines else f"row {i + 1} of {table.name}"


def tagged_rows(table: Table, columns: tuple[list, list], names: tuple, notes: list[str]) -> tuple[list, list]:
    """Words and tags per sentence, checked: lists of strings, one tag per word. Empty sentences are
    left out (with a note).

    Raises:
        DataError: naming the file, line and field of the first bad sentence.
    """
    words_out, tags_out, empty = [], [], 0
    for i, (words, tags) in enumerate(zip(*columns)):
        for value, field in ((words, names[0]), (tags, names[1])):
            if not isinstance(value, (list, tuple)) or not all(isinstance(x, (str, int)) for x in value):
                raise DataError(
                    f"{_where(table, i)}: field {field!r} must be a list of strings, got {str(value)[:40]!r}"
                )
        if len(words) != len(tags):
            raise DataError(
                f"{_where(table, i)}: {len(words)} words in {names[0]!r} but {len(tags)} tags in {names[1]!r}; "
                "give one tag per word"
            )
        if not words:
            empty += 1
            continue
        words_out.append([str(w) for w in words])
        tags_out.append([str(t) for t in tags])
    if empty:
        notes.append(f"{table.name}: left out {empty} empty sentences")
    if not words_out:
        raise DataError(f"{table.name} has no sentences with words; add some")
    return words_out, tags_out


def tag_ids(tags: list[list[str]], names: list[str], table: Table) -> list[list[int]]:
    """Tags as ids into ``names``.

    Raises:
        DataError: a tag training never saw (the head has no output for it).
    """
    ids = {n: i for i, n in enumerate(names)}
    out = []
    for sentence in tags:
        row = [ids.get(t, -1) for t in sentence]
        if -1 in row:
            bad = sentence[row.index(-1)]
            raise DataError(
                f"tag {bad!r} in {table.name} is not one of the train tags ({', '.join(names[:12])}); "
                "fix the tag or add train sentences with it"
            )
        out.append(row)
    return out


# ---------------------------------------------------------------------------------- multiple choice

_CHOICE_COLUMNS = ("choices", "endings", "options")


def choice_column(table: Table) -> str | None:
    """The column of a table that holds each example's candidate answers as a list, if any."""
    for name in _CHOICE_COLUMNS:
        values = table.columns.get(name)
        if values and isinstance(values[0], (list, tuple)):
            return name
    return None


def choice_rows(table: Table, columns: tuple[list, list], choices_name: str, names: tuple) -> tuple[list, list, list]:
    """Questions, choices and the right choice's index per example, checked: at least two choices
    of text, and an index among them (a whole number, or a letter A, B, ... as ARC writes them).

    Raises:
        DataError: naming the file, line and field of the first bad example.
    """
    values = table.columns.get(choices_name)
    if values is None:
        raise DataError(f"{table.name} has no {choices_name!r} column (a list of candidate answers per line)")
    texts, choices, labels = [], [], []
    for i, (question, label, options) in enumerate(zip(*columns, values)):
        where = _where(table, i)
        if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise DataError(f"{where}: field {choices_name!r} must be a list of two or more texts")
        if not isinstance(question, str):
            raise DataError(f"{where}: field {names[0]!r} must be a text, got {str(question)[:40]!r}")
        index = _choice_index(label)
        if index is None or not 0 <= index < len(options):
            raise DataError(
                f"{where}: field {names[1]!r} is {label!r}, not the index of one of its {len(options)} choices "
                f"(0 to {len(options) - 1}, or A to {chr(64 + len(options))})"
            )
        texts.append(question)
        choices.append(list(options))
        labels.append(index)
    if not texts:
        raise DataError(f"{table.name} has no examples; add some")
    return texts, choices, labels


def _choice_index(label) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and label.strip().isdigit():
        return int(label)
    if isinstance(label, str) and len(label.strip()) == 1 and label.strip().isalpha():
        return ord(label.strip().upper()) - ord("A")
    return None
