"""A task made ready for the loop: data loaded and encoded, the selection metric and the positive
class chosen, before anything is written to disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from adaptune.data.entities import is_span_scheme
from adaptune.data.batching import encode_split
from adaptune.data.loading import load_task_data
from adaptune.errors import ConfigError
from adaptune.data.metrics import METRICS, default_positive
from adaptune.training.config import CAUSAL_LM, TrainConfig


@dataclass
class _Prepared:
    """A task ready for the loop: encoded splits and how to judge them."""

    enc: dict[str, list[dict]]
    task_type: str
    metric: str
    higher_is_better: bool
    num_labels: int
    description: str
    notes: list[str]
    task: dict[str, Any]  # written to task.json (and beside the adapter)
    raw: Any = None
    positive: int = 1  # the class a two-class task reports the F1 of


def _prepare_lm(cfg: TrainConfig, tokenizer) -> _Prepared:
    """Chat data for a causal LM, rendered and encoded; loss on the responses."""
    from adaptune.lm.chat import encode_conversations, has_chat_template

    if cfg.metric is not None or cfg.positive_label is not None or cfg.class_weights != "none":
        raise ConfigError(
            "--metric, --positive-label and --class-weights apply to classification and regression "
            "tasks; a causal LM is selected on its dev loss"
        )

    chat = _load_data(cfg)
    enc, notes = {}, list(chat.notes)
    for name in ("train", "dev", "test"):
        enc[name], dropped = encode_conversations(getattr(chat, name), tokenizer, cfg.max_length)
        if dropped:
            notes.append(
                f"{name}: dropped {dropped} conversations with no response token left within {cfg.max_length} tokens"
            )
        if not enc[name]:
            raise ConfigError(f"no {name} conversation fits in --max-length {cfg.max_length}; raise it")
    template = (
        "the model's chat template"
        if has_chat_template(tokenizer)
        else "a plain User:/Assistant: layout (no chat template)"
    )
    notes.append(f"conversations rendered with {template}; loss on response tokens only")
    task = {
        "task_type": CAUSAL_LM,
        "metric": "loss",
        "max_length": cfg.max_length,
        "chat_template": has_chat_template(tokenizer),
    }
    return _Prepared(enc, CAUSAL_LM, "loss", False, 0, chat.description, notes, task, raw=chat)


def _prepare(cfg: TrainConfig, tokenizer) -> _Prepared:
    """Load and encode the data of ``cfg`` for its objective (classification, regression,
    multi-label, token classification, multiple choice, extractive QA, or causal LM)."""
    if cfg.causal:
        return _prepare_lm(cfg, tokenizer)
    data = _load_data(cfg)
    if data.task_type not in ("classification", "regression") and (
        cfg.positive_label is not None or cfg.class_weights != "none"
    ):
        raise ConfigError(
            f"--positive-label and --class-weights apply to single-label classification, not to this "
            f"{data.task_type} task"
        )
    if data.task_type in ("multiple-choice", "question-answering") and cfg.cache_frozen_layers:
        raise ConfigError(f"--cache-frozen-layers does not apply to {data.task_type} tasks; drop it")
    tagged = data.task_type == "token-classification"
    enc = {
        name: encode_split(split, data.task_type, tokenizer, cfg.max_length, cfg.doc_stride)
        for name, split in (("train", data.train), ("dev", data.dev), ("test", data.test))
        if split is not None
    }
    if tagged:
        windows, sentences = len(enc["train"]), len(data.train)
        if windows > sentences:
            data.notes.append(
                f"train: {windows - sentences} sentences longer than --max-length {cfg.max_length} were cut into "
                "overlapping windows (every word trained and scored once)"
            )
    num_labels = {"regression": 1, "multiple-choice": 1, "question-answering": 2}.get(data.task_type)
    num_labels = num_labels or len(data.label_names)
    metric = _selection_metric(cfg, data.task_type, data.metric, num_labels)
    positive = _positive_class(cfg, data, num_labels)
    task = {
        "task_type": data.task_type,
        "label_names": data.label_names,
        "metric": metric,
        "max_length": cfg.max_length,
        "text_pair": data.train.text_pairs is not None,
    }
    if num_labels == 2 and data.task_type == "classification":
        task["positive_label"] = data.label_names[positive]
    if tagged:
        task["span_tags"] = is_span_scheme(data.label_names)
    if data.task_type == "question-answering":  # with_null: SQuAD 2.0 data, some questions unanswerable
        task.update(doc_stride=cfg.doc_stride, with_null=any(not a for a in data.train.labels))
    return _Prepared(
        enc,
        data.task_type,
        metric,
        metric != "mse",
        num_labels,
        data.description,
        data.notes,
        task,
        raw=data,
        positive=positive,
    )


def _selection_metric(cfg: TrainConfig, task_type: str, default: str, num_labels: int) -> str:
    """The dev metric that picks the best checkpoint: ``cfg.metric``, else the task's own (GLUE's
    official one, else macro-F1 for classification)."""
    if cfg.metric is None:
        return default
    if task_type == "token-classification":
        allowed = ("entity_f1", "accuracy", "type_macro_f1") if default == "entity_f1" else ("accuracy", "macro_f1")
        if cfg.metric not in allowed:
            raise ConfigError(
                f"--metric {cfg.metric} does not apply to these tags; choose one of {', '.join(allowed)}"
            )
        return cfg.metric
    if cfg.metric not in METRICS[task_type] or (cfg.metric == "f1" and num_labels != 2):
        allowed = [m for m in METRICS[task_type] if m != "f1" or num_labels == 2]
        raise ConfigError(
            f"--metric {cfg.metric} does not apply to this {task_type} task; choose one of {', '.join(allowed)}"
        )
    return cfg.metric


def _positive_class(cfg: TrainConfig, data, num_labels: int) -> int:
    """Index of the positive class of a two-class task: ``--positive-label``, else the source's own
    (GLUE: class 1), else the minority class of the training labels."""
    if cfg.positive_label is not None:
        if num_labels != 2:
            raise ConfigError(
                f"--positive-label applies to two-class tasks; this one has {num_labels} "
                f"{'classes' if data.task_type == 'classification' else '(a regression)'}"
            )
        if cfg.positive_label not in data.label_names:
            raise ConfigError(
                f"--positive-label {cfg.positive_label!r} is not a label of this task; "
                f"its labels are {', '.join(data.label_names)}"
            )
        return data.label_names.index(cfg.positive_label)
    if num_labels != 2 or data.task_type != "classification":
        return 1
    if data.positive is not None and data.positive in data.label_names:
        return data.label_names.index(data.positive)
    return default_positive(data.train.labels, 2)


def _load_data(cfg: TrainConfig):
    if cfg.causal:
        from adaptune.lm.chat import load_chat_data

        return load_chat_data(
            cfg.data,
            dev_file=cfg.dev_file,
            test_file=cfg.test_file,
            dev_fraction=cfg.dev_fraction,
            seed=cfg.seed,
            limit_train=cfg.limit_train,
            limit_eval=cfg.limit_eval,
        )
    return load_task_data(
        cfg.data,
        text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column,
        label_column=cfg.label_column,
        task_type=cfg.task_type,
        dev_file=cfg.dev_file,
        test_file=cfg.test_file,
        glue_task=cfg.glue_task,
        dev_fraction=cfg.dev_fraction,
        seed=cfg.seed,
        limit_train=cfg.limit_train,
        limit_eval=cfg.limit_eval,
        label_delimiter=cfg.label_delimiter,
    )
