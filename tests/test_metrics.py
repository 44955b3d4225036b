"""Metrics against values computed by hand (and against scipy / scikit-learn when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaptune.errors import ConfigError
from adaptune.data.metrics import (
    PRIMARY_DEFAULT,
    accuracy,
    compute_metrics,
    default_positive,
    f1,
    macro_f1,
    majority_baseline,
    mcc,
    mse,
    pearson,
    single_class_warning,
    spearman,
)

# A small binary example: tp=2 (idx 0, 2), fp=1 (idx 3), fn=1 (idx 1), tn=2 (idx 4, 5).
P = [1, 0, 1, 1, 0, 0]
Y = [1, 1, 1, 0, 0, 0]


def test_accuracy_and_binary_f1_by_hand():
    assert accuracy(P, Y) == pytest.approx(4 / 6)
    # precision 2/3, recall 2/3 -> F1 2/3
    assert f1(P, Y, 2) == pytest.approx(2 / 3)


def test_binary_f1_uses_class_one_as_positive():
    # Swapping which class is called positive changes the score: class 1 is never predicted.
    assert f1([0, 0, 0, 0], [1, 0, 0, 0], 2) == 0.0
    assert f1([1, 1], [1, 1], 2) == 1.0


def test_binary_mcc_by_hand():
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc(P, Y) == pytest.approx(expected)  # = 1/3


def test_multiclass_f1_is_macro_and_mcc_multiclass():
    p = [0, 1, 2, 2, 1, 0]
    y = [0, 1, 2, 1, 1, 2]
    # per class F1: class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5; class 2: tp1 fp1 fn1 -> 1/2
    assert f1(p, y, 3) == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    # Gorodkin: c=4 correct, s=6, t=(1,3,2), p=(2,2,2): (4*6 - 12) / sqrt((36-14)(36-12))
    assert mcc(p, y) == pytest.approx(12 / math.sqrt(22 * 24))


def test_mcc_perfect_and_inverse():
    assert mcc([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # deviations (-1.5,-.5,.5,1.5) and (-1.75,.25,1.25,.25): cov 3.5, var 5 and 4.75
    assert pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # ranks of y with the tie averaged: (1, 2.5, 4, 2.5); deviations (-1.5, 0, 1.5, 0): cov 3, var 4.5
    assert spearman(x, y) == pytest.approx(3 / math.sqrt(5 * 4.5))
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3], [10, 100, 1000]) < 0.95
    assert mse([1.0, 2.0], [2.0, 4.0]) == pytest.approx(2.5)


@pytest.mark.parametrize("const", [[0, 0, 0, 0], [0.1, 0.1, 0.1, 0.1]])
def test_degenerate_inputs_give_zero_not_nan(const):
    other = [0, 1, 1, 0]
    for fn in (pearson, spearman, mcc):
        assert fn(const, other) == 0.0
        assert fn(other, const) == 0.0


def test_matches_scipy_and_sklearn_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert mcc(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    assert f1(p, y, 3) == pytest.approx(skm.f1_score(y, p, average="macro"))
    yb, pb = y % 2, p % 2
    assert f1(pb, yb, 2) == pytest.approx(skm.f1_score(yb, pb))
    a, b = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # many ties in a
    assert spearman(b, a) == pytest.approx(stats.spearmanr(b, a).statistic)
    assert pearson(b, a) == pytest.approx(stats.pearsonr(b, a).statistic)


def test_compute_metrics_per_task_type():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # argmax: 0, 1, 0
    got = compute_metrics("classification", logits, [0, 1, 1], 2)
    assert set(got) == {"accuracy", "macro_f1", "mcc", "f1", "majority_baseline", "predicted_classes"}
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got == compute_metrics("classification", [0, 1, 0], [0, 1, 1], 2)
    assert all(type(v) is float for v in got.values())
    reg = compute_metrics("regression", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 3.5])
    assert set(reg) == {"pearson", "spearman", "mse"} and reg["spearman"] == pytest.approx(1.0)
    assert PRIMARY_DEFAULT == {
        "classification": "macro_f1",
        "regression": "spearman",
        "multi-label": "micro_f1",
        "token-classification": "entity_f1",
        "multiple-choice": "accuracy",
        "question-answering": "f1",
    }
    # f1 (of a positive class) exists for two-class tasks only
    assert "f1" not in compute_metrics("classification", [0, 1, 2], [0, 1, 1], 3)


def test_binary_f1_is_of_the_named_positive_class():
    # 10 % positives (class 0 here, as when labels sort the minority first); the model finds 1 of 2
    y = [0, 0] + [1] * 18
    p = [0, 1] + [1] * 18
    got = compute_metrics("classification", p, y, 2, positive=0)
    assert got["f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))  # tp 1, fp 0, fn 1
    assert compute_metrics("classification", p, y, 2, positive=1)["f1"] == pytest.approx(2 * 18 / (2 * 18 + 1))
    assert f1(p, y, 2, positive=0) == got["f1"]


def test_default_positive_is_the_minority_training_class():
    assert default_positive([1, 1, 1, 0], 2) == 0
    assert default_positive([0, 0, 1], 2) == 1
    assert default_positive([0, 1, 1, 0], 2) == 1  # a tie: class 1, GLUE's convention


def test_a_majority_class_model_is_visible():
    """90 % accuracy from always predicting the majority: macro-F1, MCC and the warning show it."""
    y = [0] * 90 + [1] * 10
    p = [0] * 100
    got = compute_metrics("classification", p, y, 2, positive=1)
    assert got["accuracy"] == pytest.approx(0.9) == got["majority_baseline"]
    assert got["f1"] == 0.0 and got["mcc"] == 0.0
    assert got["macro_f1"] == pytest.approx((2 * 90 / (2 * 90 + 10) + 0.0) / 2)  # ~0.47, not 0.9
    assert got["predicted_classes"] == 1.0
    warning = single_class_warning(got)
    assert warning is not None and "single class" in warning and "0.9000" in warning
    learned = compute_metrics("classification", [0] * 89 + [1] * 11, y, 2)
    assert single_class_warning(learned) is None and learned["predicted_classes"] == 2.0


def test_macro_f1_over_absent_classes():
    # class 2 exists in the task but neither in this split nor in the predictions: left out
    assert macro_f1([0, 1, 1], [0, 1, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # a class present in the labels but never predicted counts with F1 0
    assert macro_f1([0, 0, 0], [0, 1, 2]) == pytest.approx((2 * 1 / (2 * 1 + 2 + 0) + 0 + 0) / 3)
    # a class predicted but absent from the labels counts too (all its predictions are false positives)
    assert macro_f1([0, 2], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 3, 50)  # class 3 never predicted
    assert macro_f1(p, y) == pytest.approx(skm.f1_score(y, p, average="macro"))


def test_majority_baseline():
    assert majority_baseline([2, 2, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="no labels"):
        majority_baseline([])


def test_bad_calls_raise():
    with pytest.raises(ConfigError, match="unknown task type"):
        compute_metrics("ranking", [1], [1], 2)
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions"):
        pearson([], [])
