"""Evaluation metrics in plain numpy: the figures GLUE reports (Houlsby et al. 2019, Section 3.2).

Classification: accuracy, F1 (binary with class id 1 as the positive class, as GLUE scores MRPC
and QQP; macro-averaged for more than two classes) and Matthews correlation (CoLA; the
multi-class form of Gorodkin 2004). Regression: Pearson and Spearman correlation (STS-B) and mean
squared error.

Degenerate inputs — constant predictions or constant labels — give 0.0 for correlations instead
of NaN, so a collapsed model scores as "no signal" and the best-checkpoint comparison still works.
"""

from __future__ import annotations

import numpy as np

from adaptune.errors import ConfigError

PRIMARY_DEFAULT = {"classification": "accuracy", "regression": "spearman"}
# Names compute_metrics returns per task type; all but mse are "higher is better".
METRICS = {"classification": ("accuracy", "f1", "mcc"), "regression": ("pearson", "spearman", "mse")}


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


def f1(predictions, labels, num_labels: int | None = None) -> float:
    """F1 score of class predictions.

    Args:
        predictions: predicted class ids.
        labels: true class ids.
        num_labels: number of classes. Two (or None with ids in {0, 1}): binary F1 of class 1.
            More: macro average over the classes that occur in labels or predictions.

    Returns:
        F1 in [0, 1].
    """
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    binary = num_labels == 2 if num_labels is not None else set(classes.tolist()) <= {0, 1}
    if binary:
        return _f1_of(p, y, 1)
    return float(np.mean([_f1_of(p, y, c) for c in classes]))


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


def compute_metrics(task_type: str, predictions, labels, num_labels: int | None = None) -> dict[str, float]:
    """All metrics of a task type.

    Args:
        task_type: ``"classification"`` or ``"regression"``.
        predictions: class ids, or logits of shape ``(n, num_labels)`` (argmax is taken), for
            classification; values of shape ``(n,)`` or ``(n, 1)`` for regression.
        labels: true class ids or values, shape ``(n,)``.
        num_labels: number of classes (decides binary vs macro F1); ignored for regression.

    Returns:
        ``{"accuracy", "f1", "mcc"}`` or ``{"pearson", "spearman", "mse"}``, as Python floats.

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
        return {"accuracy": accuracy(p, labels), "f1": f1(p, labels, num_labels), "mcc": mcc(p, labels)}
    if task_type == "regression":
        return {"pearson": pearson(p, labels), "spearman": spearman(p, labels), "mse": mse(p, labels)}
    raise ConfigError(f"unknown task type {task_type!r}; use one of {', '.join(PRIMARY_DEFAULT)}")
