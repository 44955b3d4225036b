"""Task types and the GLUE benchmark table — as data.

Houlsby et al. (2019), Section 3.2, evaluate adapters on GLUE. This module records, for each GLUE
task, how the files of the standard GLUE download (``download_glue_data.py``) are laid out: which
folder names it is recognised by, its train/dev files, whether the TSV has a header, which columns
hold the text, the optional second text and the label, the label set, and the task's official
primary metric. ``data.py`` reads GLUE folders through this table; adding a task means adding a row.

A text-pair task is not a separate type: it is classification or regression with a second text
column (``text_pair_column``).

GLUE TSVs are tab separated with no quoting (sentences contain bare ``"``), so they must be read
with ``csv.QUOTE_NONE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# multi-label: several classes per example (a list in JSON Lines, or a delimited string);
# token-classification: a tag per word (CoNLL files, or JSON Lines with tokens and tags lists)
# multiple-choice: a question, its candidate answers and the index of the right one (JSON Lines)
# question-answering: extractive, the answer a span of the context (SQuAD v1.1 / v2.0 files)
TASK_TYPES = (
    "classification",
    "regression",
    "multi-label",
    "token-classification",
    "multiple-choice",
    "question-answering",
)


@dataclass(frozen=True)
class GlueTask:
    """Layout of one GLUE task folder.

    Args:
        name: short key, e.g. ``"mrpc"``.
        display: the name GLUE uses, e.g. ``"MRPC"``.
        description: what the task is, in a few words.
        folder_names: folder names it is recognised by (compared case- and punctuation-blind).
        text_column: column of the first text — a header name, or an index when ``header`` is False.
        text_pair_column: column of the second text, or None for single-sentence tasks.
        label_column: column of the label.
        task_type: one of :data:`TASK_TYPES`.
        labels: class names as written in the files, index = class id; None for regression.
        metric: the primary metric GLUE reports for the task.
        header: whether the TSV's first line names the columns.
        train_file: training file inside the folder.
        dev_file: development file inside the folder (GLUE test files carry no labels).
    """

    name: str
    display: str
    description: str
    folder_names: tuple[str, ...]
    text_column: str | int
    text_pair_column: str | int | None
    label_column: str | int
    task_type: str
    labels: tuple[str, ...] | None
    metric: str
    header: bool = True
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"


_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        # CoLA has no header: source, label, original (star) judgement, sentence.
        GlueTask(
            "cola",
            "CoLA",
            "grammatical acceptability",
            ("CoLA",),
            text_column=3,
            text_pair_column=None,
            label_column=1,
            task_type="classification",
            labels=_BINARY,
            metric="mcc",
            header=False,
        ),
        GlueTask(
            "sst2",
            "SST-2",
            "movie review sentiment",
            ("SST-2", "SST2"),
            text_column="sentence",
            text_pair_column=None,
            label_column="label",
            task_type="classification",
            labels=_BINARY,
            metric="accuracy",
        ),
        # Header: Quality, #1 ID, #2 ID, #1 String, #2 String (Quality 1 = paraphrase).
        GlueTask(
            "mrpc",
            "MRPC",
            "paraphrase, sentence pairs",
            ("MRPC",),
            text_column="#1 String",
            text_pair_column="#2 String",
            label_column="Quality",
            task_type="classification",
            labels=_BINARY,
            metric="f1",
        ),
        GlueTask(
            "qqp",
            "QQP",
            "duplicate questions",
            ("QQP",),
            text_column="question1",
            text_pair_column="question2",
            label_column="is_duplicate",
            task_type="classification",
            labels=_BINARY,
            metric="f1",
        ),
        # Scores are similarities from 0 to 5; GLUE reports Pearson and Spearman correlation.
        GlueTask(
            "stsb",
            "STS-B",
            "semantic similarity, 0-5",
            ("STS-B", "STSB"),
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="score",
            task_type="regression",
            labels=None,
            metric="spearman",
        ),
        # train.tsv has label1 and gold_label, dev files label1..label5 and gold_label.
        GlueTask(
            "mnli",
            "MNLI",
            "natural language inference, 3 classes",
            ("MNLI", "MultiNLI"),
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="gold_label",
            task_type="classification",
            labels=("contradiction", "entailment", "neutral"),
            metric="accuracy",
            dev_file="dev_matched.tsv",
        ),
        GlueTask(
            "qnli",
            "QNLI",
            "question answering as inference",
            ("QNLI", "QNLIv2"),
            text_column="question",
            text_pair_column="sentence",
            label_column="label",
            task_type="classification",
            labels=_ENTAIL,
            metric="accuracy",
        ),
        GlueTask(
            "rte",
            "RTE",
            "textual entailment",
            ("RTE",),
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="label",
            task_type="classification",
            labels=_ENTAIL,
            metric="accuracy",
        ),
        GlueTask(
            "wnli",
            "WNLI",
            "Winograd inference",
            ("WNLI",),
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="label",
            task_type="classification",
            labels=_BINARY,
            metric="accuracy",
        ),
    )
}


def _normalise(name: str) -> str:
    # "STS-B", "sts_b" and "stsb" all name the same task.
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_glue_task(name: str | Path) -> GlueTask | None:
    """The GLUE task a task key or folder name refers to.

    Args:
        name: a key (``"sst2"``), a GLUE folder name (``"SST-2"``), or a path whose last part is one.

    Returns:
        The matching :class:`GlueTask`, or None if the name is not a GLUE task.

    Example::

        find_glue_task("glue_data/STS-B").metric  # "spearman"
    """
    key = _normalise(Path(name).name)
    for task in GLUE_TASKS.values():
        if key == task.name or key in {_normalise(f) for f in task.folder_names}:
            return task
    return None
