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

import math
from dataclasses import dataclass, field

import numpy as np

from adaptune.errors import DataError
from adaptune.data.metrics import PRIMARY_DEFAULT
from adaptune.data.sources import Table as _Table, read_source
from adaptune.data.tasks import TASK_TYPES


@dataclass
class Split:
    """One split, raw: texts, optional second texts, and labels (int class ids or float values)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> Split:
        """The examples at ``indices``, in that order."""
        pick = lambda xs: [xs[i] for i in indices]
        pairs = pick(self.text_pairs) if self.text_pairs is not None else None
        return Split(pick(self.texts), pairs, pick(self.labels))


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


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _extract(table: _Table, text, pair, label) -> tuple[list, list | None, list, int]:
    """Texts, pairs and raw labels, without rows that miss any of them; also how many were dropped."""
    cols = [_column(table, text, "text", "text_column"), _column(table, label, "label", "label_column")]
    if pair is not None:
        cols.append(_column(table, pair, "text pair", "text_pair_column"))
    keep = [i for i in range(len(cols[0])) if not any(_missing(c[i]) for c in cols)]
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


def _map_labels(values, table: _Table, col, task_type: str, names: list[str] | None) -> list:
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
) -> TaskData:
    """Load a task's train / dev / test splits from any supported source.

    Args:
        source: ``"reviews"`` (demo: fine-food reviews, great vs other); a ``.csv``, ``.tsv`` (unquoted)
            or ``.jsonl``/``.json`` (JSON Lines) file; a GLUE task folder; a ``datasets.save_to_disk``
            folder; or ``"hf:NAME"`` / ``"hf:NAME:CONFIG"`` from the Hugging Face hub.
        text_column, text_pair_column, label_column: column names (or positions). Defaults: ``text``
            (else ``sentence1``/``sentence2``, ``question1``/``question2``, ``premise``/``hypothesis``,
            ``question``/``sentence``, ``sentence``) and ``label``. GLUE folders know their own.
        task_type: ``"classification"`` or ``"regression"``; default: regression when the train labels
            are numbers not all whole, else classification.
        dev_file, test_file: files in the train file's format (for GLUE, relative to the folder).
        glue_task: GLUE task key, when the folder's name does not say it (e.g. ``"mrpc"``).
        dev_fraction: share of train carved off, by a seeded shuffle, as dev when there is no dev split.
        seed: seed of the dev carving and of the ``limit_*`` subsets.
        limit_train, limit_eval: keep a seeded random subset of at most this many train / dev and
            test examples (to keep a run short).

    Returns:
        A :class:`TaskData`. Class labels are ids in sorted order of the train labels (numeric order
        for numbers) unless the source fixes the classes (GLUE, ClassLabel); regression labels are floats.

    Raises:
        DataError: the source or a file is missing, unreadable, not UTF-8, empty, lacks a column,
            has a dev/test label not seen in train, or a non-numeric regression label.

    Example::

        data = load_task_data("reviews.csv", text_column="review", label_column="score")
        data.description  # "reviews.csv, 900/100 train/dev"
    """
    _check_options(task_type, dev_fraction, limit_train, limit_eval)
    raw = read_source(str(source), glue_task, dev_file, test_file)
    if raw.task_type and task_type and task_type != raw.task_type:
        raise DataError(f"{raw.what} is a {raw.task_type} task; drop task_type={task_type!r}")
    given = (text_column, text_pair_column, label_column)
    text, pair, label = _default_columns(raw.train, *[g if g is not None else r for g, r in zip(given, raw.columns)])

    values = _extract(raw.train, text, pair, label)[2]
    ttype = task_type or raw.task_type or _inferred_task_type(values)
    names = raw.label_names.get(label) if ttype == "classification" else None
    if ttype == "classification" and names is None:
        names = _sorted_names(values)
        if len(names) < 2:
            raise DataError(f"{raw.train.name} has a single label {names[0]!r}; a classifier needs two or more")
    notes = list(raw.notes)

    def build(table: _Table | None, name: str) -> Split | None:
        return None if table is None else _split_of(table, name, (text, pair, label), ttype, names, notes)

    train, dev, test = build(raw.train, "train"), build(raw.dev, "dev"), build(raw.test, "test")
    if dev is None:
        train, dev = _carve(train, dev_fraction, seed)
        notes.append(f"dev split carved from train: {dev_fraction * 100:g}% (seed {seed})")
    train = seeded_subset(train, limit_train, seed, 1, "train", notes)
    dev = seeded_subset(dev, limit_eval, seed, 2, "dev", notes)
    test = seeded_subset(test, limit_eval, seed, 3, "test", notes) if test is not None else None

    sizes = [len(train), len(dev)] + ([len(test)] if test is not None else [])
    parts = "train/dev/test" if test is not None else "train/dev"
    description = f"{raw.what}, {'/'.join(map(str, sizes))} {parts}"
    return TaskData(
        train, dev, test, ttype, names, raw.metric or PRIMARY_DEFAULT[ttype], description, notes, raw.positive
    )


def _check_options(task_type: str | None, dev_fraction: float, limit_train, limit_eval) -> None:
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    if not 0 < dev_fraction < 1:
        raise DataError(f"dev_fraction must be between 0 and 1, got {dev_fraction}")
    for name, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive whole number, got {value!r}")


def _inferred_task_type(values: list) -> str:
    """Regression when every train label is a number and not all are whole, else classification."""
    numbers = [_as_number(v) for v in values]
    if all(n is not None for n in numbers) and not all(n.is_integer() for n in numbers):
        return "regression"
    return "classification"


def _split_of(table: _Table, name: str, columns: tuple, ttype: str, names, notes: list[str]) -> Split | None:
    """One split's examples, labels mapped; None (with a note) for a split without labels."""
    text, pair, label = columns
    t = None
    if _has(table, label) or not table.labels_optional:
        t, p, v, n_dropped = _extract(table, text, pair, label)
    if not t:  # a hub test split without labels
        notes.append(f"{name}: {table.name} has no labels; not used")
        return None
    if n_dropped + table.malformed:
        total = len(t) + n_dropped + table.malformed
        notes.append(
            f"{name}: dropped {n_dropped + table.malformed} of {total} rows "
            "(missing text or label, or a wrong number of fields)"
        )
    return Split(t, p, _map_labels(v, table, label, ttype, names))


# tokens and batches live in adaptune.data.batching; importable from here as before
from adaptune.data.batching import bucket_batches, collate, encode  # noqa: E402

__all__ = ["Split", "TaskData", "bucket_batches", "collate", "encode", "load_task_data", "seeded_subset"]
