"""Evaluation metrics in plain numpy: the figures GLUE reports (Houlsby et al. 2019, Section 3.2).

Classification, always all of: accuracy, macro-F1 (the mean of the per-class F1 scores, so a model
that never predicts a class loses that class's share), Matthews correlation (CoLA; the multi-class
form of Gorodkin 2004) and, for two classes, the F1 of a named positive class (GLUE scores MRPC
and QQP with class 1; elsewhere the caller names it, by default the minority class of the training
data, see :func:`default_positive`). Beside them, two figures that make a collapsed model visible:
``majority_baseline`` (the accuracy of always predicting the split's most frequent label) and
``predicted_classes`` (how many distinct classes the model predicted). Regression: Pearson and
Spearman correlation (STS-B) and mean squared error.

Degenerate inputs — constant predictions or constant labels — give 0.0 for correlations instead
of NaN, so a collapsed model scores as "no signal" and the best-checkpoint comparison still works.
"""

from __future__ import annotations

import numpy as np

from adaptune.errors import ConfigError

# The selection metric when the task names none: macro-F1, because accuracy cannot tell a model
# that predicts the majority class from one that learned (90 % accuracy at 10 % positives).
PRIMARY_DEFAULT = {
    "classification": "macro_f1",
    "regression": "spearman",
    "multi-label": "micro_f1",
    "token-classification": "entity_f1",
    "multiple-choice": "accuracy",
    "question-answering": "f1",
}
# Metrics a run can select on, per task type; all but mse are "higher is better". ``f1`` (of the
# positive class) exists for two-class tasks only.
METRICS = {
    "classification": ("macro_f1", "accuracy", "mcc", "f1"),
    "regression": ("pearson", "spearman", "mse"),
    "multi-label": ("micro_f1", "macro_f1", "subset_accuracy"),
    # entity_f1 for span tags (BIO, BIOES), accuracy for tags of single tokens (part of speech)
    "token-classification": ("entity_f1", "accuracy", "macro_f1", "type_macro_f1"),
    "multiple-choice": ("accuracy",),
    "question-answering": ("f1", "exact_match"),  # SQuAD's, in percent
}


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels; they must match one to one")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def _f1_of(p: np.ndarray, y: np.ndarray, cls) -> float:
    tp = np.sum((p == cls) & (y == cls))
    fp = np.sum((p == cls) & (y != cls))
    fn = np.sum((p != cls) & (y == cls))
    # 2tp / (2tp + fp + fn); a class never predicted nor present scores 0 (sklearn's zero_division=0).
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def f1(predictions, labels, num_labels: int | None = None, positive: int = 1) -> float:
    """F1 score of class predictions.

    Args:
        predictions: predicted class ids.
        labels: true class ids.
        num_labels: number of classes. Two (or None with ids in {0, 1}): binary F1 of ``positive``.
            More: :func:`macro_f1`.
        positive: the class id whose F1 a two-class task reports (GLUE's MRPC and QQP: 1).

    Returns:
        F1 in [0, 1].
    """
    p, y = _pair(predictions, labels)
    return _f1_of(p, y, positive) if _is_binary(p, y, num_labels) else macro_f1(p, y)


def _is_binary(p: np.ndarray, y, num_labels: int | None) -> bool:
    """Two classes: as ``num_labels`` says, else when every id is 0 or 1."""
    return num_labels == 2 if num_labels is not None else set(np.union1d(p, y).tolist()) <= {0, 1}


def macro_f1(predictions, labels) -> float:
    """Unweighted mean of the per-class F1 scores over the classes that occur in ``labels`` or in
    ``predictions``.

    A class that is present but never predicted scores 0, so predicting only the majority class of
    a two-class task gives at most about 0.5 whatever the accuracy. A class that is neither present
    in this split nor predicted carries no information about the model and is left out (as
    scikit-learn does without an explicit label list).
    """
    p, y = _pair(predictions, labels)
    return float(np.mean([_f1_of(p, y, c) for c in np.union1d(p, y)]))


def majority_baseline(labels) -> float:
    """Accuracy of always predicting the most frequent label of ``labels``."""
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("no labels to score")
    return float(np.unique(y, return_counts=True)[1].max() / y.size)


def default_positive(train_labels, num_labels: int) -> int:
    """The positive class of a two-class task when the user names none: the less frequent class in
    the training labels (the one a detector is for: spam, a rare topic); class 1 on a tie."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64).reshape(-1), minlength=num_labels)
    return 0 if counts[0] < counts[1] else 1


def mcc(predictions, labels) -> float:
    """Matthews correlation coefficient, multi-class form; 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    confusion = np.zeros((k, k), dtype=np.float64)  # rows: true class, columns: predicted class
    np.add.at(confusion, (inverse[:n], inverse[n:]), 1)
    t, q = confusion.sum(axis=1), confusion.sum(axis=0)
    s, correct = confusion.sum(), np.trace(confusion)
    cov_yp = correct * s - t @ q
    var_y, var_p = s * s - t @ t, s * s - q @ q
    if var_y == 0 or var_p == 0:
        return 0.0
    return float(cov_yp / np.sqrt(var_y * var_p))


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    # Test constancy exactly: after subtracting a rounded mean, a constant array is not exactly zero.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    r = (dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip(r, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (like scipy's rankdata)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts_run = np.r_[True, xs[1:] != xs[:-1]]
    run_id = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    return pearson(_average_ranks(p), _average_ranks(y))


def mse(predictions, labels) -> float:
    """Mean squared error."""
    p, y = _pair(predictions, labels)
    return float(np.mean((p.astype(np.float64) - y.astype(np.float64)) ** 2))


def compute_metrics(
    task_type: str,
    predictions,
    labels,
    num_labels: int | None = None,
    positive: int = 1,
    threshold: float | None = None,
    select: str = "micro_f1",
) -> dict[str, float]:
    """All metrics of a task type.

    Args:
        task_type: ``"classification"`` or ``"regression"``.
        predictions: class ids, or logits of shape ``(n, num_labels)`` (argmax is taken), for
            classification; values of shape ``(n,)`` or ``(n, 1)`` for regression.
        labels: true class ids or values, shape ``(n,)``; for multi-label, 0/1 of shape ``(n, labels)``
            beside probabilities of that shape.
        num_labels: number of classes (two adds ``f1`` of ``positive``); ignored for regression.
        positive: the positive class id of a two-class task.
        threshold, select: multi-label only, see :func:`multi_label_metrics`.

    Returns:
        Classification: ``accuracy``, ``macro_f1``, ``mcc``, ``f1`` (two classes only),
        ``majority_baseline`` and ``predicted_classes``; regression: ``pearson``, ``spearman``,
        ``mse``; multi-label: those of :func:`multi_label_metrics`. All Python floats.

    Raises:
        ConfigError: unknown task type.
        ValueError: predictions and labels differ in number, or are empty.

    Example::

        compute_metrics("classification", [1, 0, 1], [1, 1, 1], 2)["accuracy"]  # 0.666...
    """
    p = np.asarray(predictions)
    if task_type == "classification":
        if p.ndim == 2:
            p = p.argmax(axis=-1)
        out = {"accuracy": accuracy(p, labels), "macro_f1": macro_f1(p, labels), "mcc": mcc(p, labels)}
        if _is_binary(p, labels, num_labels):
            out["f1"] = f1(p, labels, 2, positive)
        out["majority_baseline"] = majority_baseline(labels)
        out["predicted_classes"] = float(len(np.unique(p)))
        return out
    if task_type == "regression":
        return {"pearson": pearson(p, labels), "spearman": spearman(p, labels), "mse": mse(p, labels)}
    if task_type == "multi-label":
        return multi_label_metrics(p, labels, threshold, select)
    if task_type == "multiple-choice":  # p: (n, choices) probabilities, 0 for an example's missing choices
        chosen = p.argmax(axis=-1)
        return {
            "accuracy": accuracy(chosen, labels),
            "majority_baseline": majority_baseline(labels),  # always the most frequent right position
            "chance_baseline": float(np.mean(1.0 / (p > 0).sum(axis=-1).clip(min=1))),
        }
    raise ConfigError(f"unknown task type {task_type!r}; use one of {', '.join(PRIMARY_DEFAULT)}")


# ------------------------------------------------------------------------------------ multi-label

# Thresholds tried on dev: 0.05, 0.10, ..., 0.95 (one for every label: a per-label threshold over-fits
# the dev split of a rare label).
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _label_counts(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives and false negatives of 0/1 arrays (n, labels)."""
    tp = (pred & true).sum(axis=0)
    return tp, pred.sum(axis=0) - tp, true.sum(axis=0) - tp


def _multi_label_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    tp, fp, fn = _label_counts(pred, true)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    seen = (tp + fp + fn) > 0  # labels present in this split or predicted, as macro_f1 does for classes
    per_label = 2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])
    return {
        "micro_f1": float(2 * tp.sum() / denom) if denom else 0.0,
        "macro_f1": float(per_label.mean()) if per_label.size else 0.0,
        "subset_accuracy": float(np.mean((pred == true).all(axis=1))),
        "label_accuracy": float(np.mean(pred == true)),
    }


def multi_label_metrics(
    probabilities, labels, threshold: float | None = None, select: str = "micro_f1"
) -> dict[str, float]:
    """Metrics of a multi-label task: several labels per example, each predicted when its sigmoid
    probability reaches ``threshold``.

    Args:
        probabilities: (n, labels) probabilities.
        labels: (n, labels) 0/1 (or bool) true label sets.
        threshold: the decision threshold; None picks the one of :data:`THRESHOLDS` that scores best
            on ``select`` here (for the dev split; the test split then takes dev's).
        select: the metric the threshold is chosen on.

    Returns:
        ``micro_f1`` (F1 of every (example, label) decision pooled), ``macro_f1`` (mean per-label F1
        over the labels present or predicted), ``subset_accuracy`` (the whole set right),
        ``label_accuracy`` (1 - Hamming loss), ``majority_baseline`` (subset accuracy of always
        predicting the most frequent label set: often the empty set), ``predicted_labels`` (how
        many labels were predicted at least once), ``predicted_sets`` (how many different label
        sets were predicted: 1 means the same answer for every example), ``mean_predicted_labels``
        and ``mean_true_labels`` per example, and ``threshold``.

    Example::

        multi_label_metrics([[0.9, 0.2], [0.6, 0.7]], [[1, 0], [0, 1]], threshold=0.5)["micro_f1"]  # 0.8
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if p.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} must both be (examples, labels)")
    if p.shape[0] == 0:
        raise ValueError("no predictions to score")
    if select not in ("micro_f1", "macro_f1", "subset_accuracy"):
        raise ConfigError(f"a multi-label threshold is chosen on micro_f1, macro_f1 or subset_accuracy, not {select}")
    if threshold is None:  # one pass per threshold, vectorised over examples and labels
        threshold = max(THRESHOLDS, key=lambda t: _multi_label_scores(p >= t, y)[select])
    pred = p >= threshold
    out = _multi_label_scores(pred, y)
    _, sets = np.unique(np.packbits(y, axis=1), axis=0, return_counts=True)
    out["majority_baseline"] = float(sets.max() / len(y))
    out["predicted_labels"] = float(pred.any(axis=0).sum())
    out["predicted_sets"] = float(len(np.unique(np.packbits(pred, axis=1), axis=0)))
    out["mean_predicted_labels"] = float(pred.sum(axis=1).mean())
    out["mean_true_labels"] = float(y.sum(axis=1).mean())
    out["threshold"] = float(threshold)
    return out


def multi_label_warning(metrics: dict[str, float]) -> str | None:
    """A warning when a multi-label model predicted no label at all, or the same label set for every
    example, else None."""
    if metrics.get("predicted_labels") == 0.0:
        return "the model predicts no label for any example: it has learned no more than the label prior; " + _TRY
    if metrics.get("predicted_sets") == 1.0:
        n = int(metrics.get("mean_predicted_labels", 0))
        return f"the model predicts the same {n} label(s) for every example, as the label prior would; " + _TRY
    return None


_TRY = "try more epochs, --class-weights balanced, or a different learning rate"


def single_class_warning(metrics: dict[str, float]) -> str | None:
    """A warning when a classifier predicted one class for every example (or a multi-label model
    no label, or one label only), else None."""
    if "predicted_labels" in metrics:
        return multi_label_warning(metrics)
    if metrics.get("predicted_tags") == 1.0:
        return "the model tags every word alike: it has learned no more than the most frequent tag; " + _TRY
    if metrics.get("predicted_classes") != 1.0:
        return None
    share = metrics.get("majority_baseline")
    return (
        "the model predicts a single class for every example: it has learned no more than the class prior"
        + (f" (majority baseline {share:.4f})" if share is not None else "")
        + "; "
        + _TRY
    )
