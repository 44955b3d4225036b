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
PRIMARY_DEFAULT = {"classification": "macro_f1", "regression": "spearman"}
# Metrics a run can select on, per task type; all but mse are "higher is better". ``f1`` (of the
# positive class) exists for two-class tasks only.
METRICS = {"classification": ("macro_f1", "accuracy", "mcc", "f1"), "regression": ("pearson", "spearman", "mse")}


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
    task_type: str, predictions, labels, num_labels: int | None = None, positive: int = 1
) -> dict[str, float]:
    """All metrics of a task type.

    Args:
        task_type: ``"classification"`` or ``"regression"``.
        predictions: class ids, or logits of shape ``(n, num_labels)`` (argmax is taken), for
            classification; values of shape ``(n,)`` or ``(n, 1)`` for regression.
        labels: true class ids or values, shape ``(n,)``.
        num_labels: number of classes (two adds ``f1`` of ``positive``); ignored for regression.
        positive: the positive class id of a two-class task.

    Returns:
        Classification: ``accuracy``, ``macro_f1``, ``mcc``, ``f1`` (two classes only),
        ``majority_baseline`` and ``predicted_classes``; regression: ``pearson``, ``spearman``,
        ``mse``. All Python floats.

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
    raise ConfigError(f"unknown task type {task_type!r}; use one of {', '.join(PRIMARY_DEFAULT)}")


def single_class_warning(metrics: dict[str, float]) -> str | None:
    """A warning when a classifier predicted one class for every example, else None."""
    if metrics.get("predicted_classes") != 1.0:
        return None
    share = metrics.get("majority_baseline")
    return (
        "the model predicts a single class for every example: it has learned no more than the class prior"
        + (f" (majority baseline {share:.4f})" if share is not None else "")
        + "; try more epochs, --class-weights balanced, or a different learning rate"
    )
