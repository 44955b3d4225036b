"""Task data: one loader for every source, then tokenisation and length-bucketed batching.

:func:`load_task_data` reads any source of :mod:`adaptune.data.sources` (the embedded demo
``"reviews"``, CSV / TSV / JSON Lines files, GLUE folders, Hugging Face ``datasets``) and maps
columns and labels. Every source ends in the same
:class:`TaskData`: train / dev / test splits of raw texts and label ids, plus what was done to
them (carved dev split, dropped rows, subsets) in ``notes``.

:func:`encode`, :func:`bucket_batches` and :func:`collate` turn a split into padded tensors.
Batching is a pure function of (lengths, seed, epoch), so a resumed run sees the same batches.

Every problem with the data raises :class:`~adaptune.errors.DataError` with a one-line message
that names the file and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from adaptune.errors import DataError
from adaptune.data.metrics import PRIMARY_DEFAULT
from adaptune.data.sources import Table as _Table, read_source
from adaptune.data.entities import is_span_scheme
from adaptune.data.squad import is_squad, read_squad
from adaptune.data.labels import (
    choice_column,
    choice_rows,
    is_tagged,
    tag_ids,
    tagged_rows,
    inferred_task_type as _inferred_task_type,
    label_names as _label_names,
    map_labels as _map_labels,
    missing as _missing,
    multi_hot as _multi_hot,
)
from adaptune.data.tasks import TASK_TYPES


@dataclass
class Split:
    """One split, raw: texts, optional second texts, and labels (int class ids, float values, 0/1
    rows of a multi-label task, or tag ids per word when ``texts`` hold the words of sentences);
    ``choices``: the candidate answers of a multiple-choice task (the label is the right one's index)."""

    texts: list
    text_pairs: list[str] | None
    labels: list
    choices: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> Split:
        """The examples at ``indices``, in that order."""
        pick = lambda xs: [xs[i] for i in indices]
        pairs = pick(self.text_pairs) if self.text_pairs is not None else None
        choices = pick(self.choices) if self.choices is not None else None
        return Split(pick(self.texts), pairs, pick(self.labels), choices)


@dataclass
class TaskData:
    """A task ready to train on; ``description`` is one line, ``notes`` say what was done to the data."""

    train: Split
    dev: Split
    test: Split | None
    task_type: str
    label_names: list[str] | None
    metric: str
    description: str
    notes: list[str] = field(default_factory=list)
    positive: str | None = None  # the source's fixed positive class of a two-class task (GLUE: "1"), else None


# ----------------------------------------------------------------------------- columns and labels

_PAIR_DEFAULTS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
)


def _has(table: _Table, key) -> bool:
    return key in table.columns or (isinstance(key, int) and 0 <= key < len(table.columns))


def _column(table: _Table, key, role: str, arg: str) -> list:
    if key in table.columns:
        return table.columns[key]
    if isinstance(key, int) and 0 <= key < len(table.columns):  # by position
        return list(table.columns.values())[key]
    available = ", ".join(map(str, table.columns)) or "(none)"
    raise DataError(f"{table.name} has no {role} column {key!r}; available columns: {available}; pass {arg}=")


def _default_columns(table: _Table, text, pair, label) -> tuple:
    cols, names = table.columns, ", ".join(map(str, table.columns))
    if text is None:
        options = [("text", None)] + list(_PAIR_DEFAULTS) + [("sentence", None)]
        if pair is not None:
            options = [(t, pair) for t in ("text", "sentence", "sentence1", "question1", "premise", "question")]
        found = next(((t, p) for t, p in options if t in cols and (p is None or p in cols)), None)
        if found is None:
            raise DataError(
                f"{table.name} has no column 'text' or 'sentence'; available columns: {names}; pass text_column="
            )
        text, pair = found
    if label is None:
        label = next((c for c in ("label", "labels") if c in cols), None)
        if label is None:
            raise DataError(f"{table.name} has no column 'label'; available columns: {names}; pass label_column=")
    return text, pair, label


def _extract(table: _Table, text, pair, label, empty_label: bool = False) -> tuple[list, list | None, list, int]:
    """Texts, pairs and raw labels, without rows that miss any of them; also how many were dropped.
    ``empty_label``: an empty label cell is an empty label set (multi-label), not a missing label."""
    cols = [_column(table, text, "text", "text_column"), _column(table, label, "label", "label_column")]
    if pair is not None:
        cols.append(_column(table, pair, "text pair", "text_pair_column"))
    needed = [c for k, c in enumerate(cols) if not (empty_label and k == 1)]
    keep = [i for i in range(len(cols[0])) if not any(_missing(c[i]) for c in needed)]
    dropped = len(cols[0]) - len(keep)
    if not keep and not table.labels_optional:
        if not cols[0] and not table.malformed:
            raise DataError(f"{table.name} has no examples; add some")
        raise DataError(
            f"{table.name} has no usable examples ({dropped} rows miss text or label, "
            f"{table.malformed} have a wrong number of fields); fill them in"
        )
    texts, labels = [str(cols[0][i]) for i in keep], [cols[1][i] for i in keep]
    pairs = [str(cols[2][i]) for i in keep] if pair is not None else None
    return texts, pairs, labels, dropped


# ------------------------------------------------------------------------------------- the loader


def _carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    n = len(split)
    n_dev = max(1, round(n * fraction))
    if n - n_dev < 1:
        raise DataError(
            f"train has only {n} examples, too few to carve a dev split from; add examples or pass dev_file="
        )
    perm = np.random.default_rng(seed).permutation(n)
    return split.subset(sorted(perm[n_dev:].tolist())), split.subset(sorted(perm[:n_dev].tolist()))


def seeded_subset(items, limit: int | None, seed: int, salt: int, name: str, notes: list, unit: str = "examples"):
    """At most ``limit`` of ``items`` (a :class:`Split` or a list), drawn by ``seed`` and kept in order;
    what was done is appended to ``notes``."""
    if limit is None or limit >= len(items):
        return items
    # salt: train, dev and test draw from independent streams of the same seed
    keep = sorted(np.random.default_rng([seed, salt]).choice(len(items), size=limit, replace=False).tolist())
    notes.append(f"{name} limited to {limit} of {len(items)} {unit} (seed {seed})")
    return items.subset(keep) if isinstance(items, Split) else [items[i] for i in keep]


def load_task_data(
    source: str,
    *,
    text_column=None,
    text_pair_column=None,
    label_column=None,
    task_type: str | None = None,
    dev_file=None,
    test_file=None,
    glue_task: str | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    label_delimiter: str = ",",
) -> TaskData:
    """Load a task's train / dev / test splits from any supported source.

    Args:
        source: ``"reviews"`` (demo: fine-food reviews, great vs other); a ``.csv``, ``.tsv`` (unquoted)
            or ``.jsonl``/``.json`` (JSON Lines) file; a CoNLL file (``.conll``, ``.iob``, ``.bio``,
            ``.txt``); a SQuAD JSON file; a GLUE task folder; a ``datasets.save_to_disk`` folder; or
            ``"hf:NAME"`` / ``"hf:NAME:CONFIG"`` from the Hugging Face hub.
        text_column, text_pair_column, label_column: column names (or positions). Defaults: ``text``
            (else ``sentence1``/``sentence2``, ``question1``/``question2``, ``premise``/``hypothesis``,
            ``question``/``sentence``, ``sentence``) and ``label``. GLUE folders know their own.
        task_type: one of :data:`~adaptune.data.tasks.TASK_TYPES`; default from the data:
            question-answering for SQuAD files, multiple-choice for a ``choices`` list,
            token-classification for CoNLL files or ``tokens`` lists, multi-label for list labels,
            regression for numbers not all whole, else classification. A delimited label column
            (``"sports,politics"``) needs ``task_type="multi-label"``.
        dev_file, test_file: files in the train file's format (for GLUE, relative to the folder).
        glue_task: GLUE task key, when the folder's name does not say it (e.g. ``"mrpc"``).
        dev_fraction: share of train carved off, by a seeded shuffle, as dev when there is no dev split.
        seed: seed of the dev carving and of the ``limit_*`` subsets.
        limit_train, limit_eval: keep a seeded random subset of at most this many train / dev and
            test examples (to keep a run short).
        label_delimiter: multi-label: what separates the labels of a string label cell.

    Returns:
        A :class:`TaskData`. Class labels are ids in sorted order of the train labels (numeric order
        for numbers) unless the source fixes the classes (GLUE, ClassLabel); regression labels are
        floats; multi-label labels 0/1 ``uint8`` rows (labels absent from train left out of dev
        and test, with a note); token classification: words per sentence and a tag id per word;
        multiple choice: the right choice's index; QA: a list of answers per question.

    Raises:
        DataError: the source or a file is missing, unreadable, not UTF-8, empty, lacks a column,
            has a dev/test label not seen in train, or a non-numeric regression label.

    Example::

        data = load_task_data("reviews.csv", text_column="review", label_column="score")
        data.description  # "reviews.csv, 900/100 train/dev"
    """
    _check_options(task_type, dev_fraction, limit_train, limit_eval)
    limits = (limit_train, limit_eval)
    if task_type == "question-answering" or (task_type is None and is_squad(source)):
        raw, splits = _qa_splits(Path(source), dev_file, test_file)
        return _finish(raw, splits, "question-answering", None, "f1", [], (dev_fraction, seed, limits))
    raw = read_source(str(source), glue_task, dev_file, test_file)
    if raw.task_type and task_type and task_type != raw.task_type:
        raise DataError(f"{raw.what} is a {raw.task_type} task; drop task_type={task_type!r}")
    if task_type == "multiple-choice" or (task_type is None and choice_column(raw.train) is not None):
        splits, notes = _choice_splits(raw, text_column, label_column)
        return _finish(raw, splits, "multiple-choice", None, "accuracy", notes, (dev_fraction, seed, limits))
    if task_type == "token-classification" or (task_type is None and is_tagged(raw.train, text_column)):
        splits, names, notes = _tagged_splits(raw, text_column, label_column)
        metric = "entity_f1" if is_span_scheme(names) else "accuracy"
        return _finish(raw, splits, "token-classification", names, metric, notes, (dev_fraction, seed, limits))
    given = (text_column, text_pair_column, label_column)
    splits, ttype, names, notes = _labelled_splits(raw, given, task_type, label_delimiter)
    metric = raw.metric or PRIMARY_DEFAULT[ttype]
    return _finish(raw, splits, ttype, names, metric, notes, (dev_fraction, seed, limits))


def _labelled_splits(raw, given: tuple, task_type: str | None, label_delimiter: str) -> tuple:
    """Splits of a text (pair) task with a label per example: classification, regression or
    multi-label (the type from ``task_type``, the source, or the train labels)."""
    text, pair, label = _default_columns(raw.train, *[g if g is not None else r for g, r in zip(given, raw.columns)])
    values = _extract(raw.train, text, pair, label, empty_label=task_type == "multi-label")[2]
    ttype = task_type or raw.task_type or _inferred_task_type(values)
    names = _label_names(raw, label, values, ttype, label_delimiter)
    notes = list(raw.notes)

    def build(table: _Table | None, name: str) -> Split | None:
        if table is None:
            return None
        return _split_of(table, name, (text, pair, label), (ttype, names, label_delimiter), notes)

    return (build(raw.train, "train"), build(raw.dev, "dev"), build(raw.test, "test")), ttype, names, notes


def _finish(raw, splits: tuple, ttype: str, names, metric: str, notes: list, sampling: tuple) -> TaskData:
    """The task from its splits: dev carved from train when there is none, then the limits."""
    (train, dev, test), (dev_fraction, seed, (limit_train, limit_eval)) = splits, sampling
    if dev is None:
        train, dev = _carve(train, dev_fraction, seed)
        notes.append(f"dev split carved from train: {dev_fraction * 100:g}% (seed {seed})")
    train = seeded_subset(train, limit_train, seed, 1, "train", notes)
    dev = seeded_subset(dev, limit_eval, seed, 2, "dev", notes)
    test = seeded_subset(test, limit_eval, seed, 3, "test", notes) if test is not None else None

    sizes = [len(train), len(dev)] + ([len(test)] if test is not None else [])
    parts = "train/dev/test" if test is not None else "train/dev"
    description = f"{raw.what}, {'/'.join(map(str, sizes))} {parts}"
    return TaskData(train, dev, test, ttype, names, metric, description, notes, raw.positive)


_TAG_COLUMNS = ("tags", "ner_tags", "pos_tags", "chunk_tags", "labels", "label")


def _qa_splits(path: Path, dev_file, test_file) -> tuple:
    """Extractive QA splits: questions, their contexts (``text_pairs``) and answers (``labels``)."""
    splits = []
    for f in (path, dev_file, test_file):
        if f is None:
            splits.append(None)
            continue
        questions, contexts, answers = read_squad(Path(f))
        splits.append(Split(questions, contexts, answers))
    return SimpleNamespace(what=path.name, positive=None), tuple(splits)


def _choice_splits(raw, text_column, label_column) -> tuple[tuple, list[str]]:
    """Multiple-choice splits: the question (or context) as text, its choices, the right one's index."""
    train = raw.train
    question = text_column or next((c for c in ("question", "text", "context") if c in train.columns), None)
    label = label_column or next((c for c in ("label", "answer", "answerKey") if c in train.columns), None)
    if question is None or label is None:
        found = ", ".join(map(str, train.columns))
        raise DataError(
            f"{train.name}: a multiple-choice file needs a question (or text/context) column, a 'choices' list and "
            f"a label column (the right choice's index); found {found}"
        )
    splits = []
    for table in (raw.train, raw.dev, raw.test):
        if table is None:
            splits.append(None)
            continue
        cols = (_column(table, question, "question", "text_column"), _column(table, label, "label", "label_column"))
        texts, choices, labels = choice_rows(table, cols, choice_column(table) or "choices", (question, label))
        splits.append(Split(texts, None, labels, choices))
    return tuple(splits), list(raw.notes)


def _tagged_splits(raw, words_column, tags_column) -> tuple[tuple, list[str], list[str]]:
    """Token-classification splits: words per sentence (``Split.texts``) and a tag id per word."""
    words = words_column if words_column is not None else "tokens"
    tags = tags_column
    if tags is None:
        tags = next((c for c in _TAG_COLUMNS if c in raw.train.columns and c != words), None)
        if tags is None:
            found = ", ".join(map(str, raw.train.columns))
            raise DataError(f"{raw.train.name} has no tags column ({', '.join(_TAG_COLUMNS)}); found {found}")
    notes = list(raw.notes)
    rows = {}
    for name, table in (("train", raw.train), ("dev", raw.dev), ("test", raw.test)):
        if table is not None:
            cols = (_column(table, words, "words", "text_column"), _column(table, tags, "tags", "label_column"))
            rows[name] = tagged_rows(table, cols, (words, tags), notes)
    names = raw.label_names.get(tags) or sorted({t for sentence in rows["train"][1] for t in sentence})
    if len(names) < 2:
        raise DataError(f"{raw.train.name} has a single tag {names[0]!r} in {tags!r}; a tagger needs two or more")
    tables = {"train": raw.train, "dev": raw.dev, "test": raw.test}
    splits = tuple(
        Split(rows[n][0], None, tag_ids(rows[n][1], names, tables[n])) if n in rows else None
        for n in ("train", "dev", "test")
    )
    return splits, names, notes


def _check_options(task_type: str | None, dev_fraction: float, limit_train, limit_eval) -> None:
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    if not 0 < dev_fraction < 1:
        raise DataError(f"dev_fraction must be between 0 and 1, got {dev_fraction}")
    for name, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive whole number, got {value!r}")


def _split_of(table: _Table, name: str, columns: tuple, labelling: tuple, notes: list[str]) -> Split | None:
    """One split's examples, labels mapped (``labelling``: task type, label names, multi-label
    delimiter); None (with a note) for a split without labels."""
    text, pair, label = columns
    ttype, names, delimiter = labelling
    t = None
    if _has(table, label) or not table.labels_optional:
        t, p, v, n_dropped = _extract(table, text, pair, label, empty_label=ttype == "multi-label")
    if not t:  # a hub test split without labels
        notes.append(f"{name}: {table.name} has no labels; not used")
        return None
    if n_dropped + table.malformed:
        total = len(t) + n_dropped + table.malformed
        notes.append(
            f"{name}: dropped {n_dropped + table.malformed} of {total} rows "
            "(missing text or label, or a wrong number of fields)"
        )
    if ttype == "multi-label":
        return Split(t, p, _multi_hot(v, table, names, delimiter, notes))
    return Split(t, p, _map_labels(v, table, label, ttype, names))


# tokens and batches live in adaptune.data.batching; importable from here as before
from adaptune.data.batching import bucket_batches, collate, encode  # noqa: E402

__all__ = ["Split", "TaskData", "bucket_batches", "collate", "encode", "load_task_data", "seeded_subset"]
