"""The GLUE table: every row is complete and consistent, and folder names are recognised."""

from __future__ import annotations

import pytest

from adaptune.data.metrics import METRICS
from adaptune.data.tasks import GLUE_TASKS, TASK_TYPES, find_glue_task

# Primary metrics as the GLUE benchmark reports them (Wang et al. 2019, Table 1).
EXPECTED_METRIC = {
    "cola": "mcc",
    "sst2": "accuracy",
    "mrpc": "f1",
    "qqp": "f1",
    "stsb": "spearman",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
}


def test_table_covers_the_nine_glue_tasks_with_their_primary_metrics():
    assert {k: t.metric for k, t in GLUE_TASKS.items()} == EXPECTED_METRIC


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_row_is_consistent(name):
    task = GLUE_TASKS[name]
    assert task.name == name
    assert task.task_type in TASK_TYPES
    assert task.metric in METRICS[task.task_type]
    if task.task_type == "classification":
        assert task.labels is not None and len(task.labels) >= 2 and len(set(task.labels)) == len(task.labels)
    else:
        assert task.labels is None
    # Headerless files can only be addressed by position, files with a header by name.
    kinds = {type(c) for c in (task.text_column, task.text_pair_column, task.label_column) if c is not None}
    assert kinds == ({str} if task.header else {int})


def test_file_layout_quirks():
    assert not GLUE_TASKS["cola"].header
    assert (GLUE_TASKS["cola"].text_column, GLUE_TASKS["cola"].label_column) == (3, 1)
    assert GLUE_TASKS["mnli"].dev_file == "dev_matched.tsv"
    assert GLUE_TASKS["mnli"].labels == ("contradiction", "entailment", "neutral")
    assert GLUE_TASKS["mrpc"].label_column == "Quality"
    assert GLUE_TASKS["stsb"].task_type == "regression"
    single = {k for k, t in GLUE_TASKS.items() if t.text_pair_column is None}
    assert single == {"cola", "sst2"}


@pytest.mark.parametrize(
    "folder, key",
    [
        ("SST-2", "sst2"),
        ("sst2", "sst2"),
        ("CoLA", "cola"),
        ("MRPC", "mrpc"),
        ("STS-B", "stsb"),
        ("sts_b", "stsb"),
        ("MNLI", "mnli"),
        ("QNLI", "qnli"),
        ("QQP", "qqp"),
        ("RTE", "rte"),
        ("WNLI", "wnli"),
        ("glue_data/STS-B", "stsb"),
        ("/data/glue/MRPC/", "mrpc"),
    ],
)
def test_find_glue_task_recognises_folder_names(folder, key):
    assert find_glue_task(folder).name == key


@pytest.mark.parametrize("folder", ["reviews", "SST", "glue_data", "MRPC2", ""])
def test_find_glue_task_rejects_other_names(folder):
    assert find_glue_task(folder) is None
