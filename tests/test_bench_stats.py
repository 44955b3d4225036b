"""The benchmark's statistics: bootstrap intervals of a median ratio, per process or pooled over processes."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "adapter_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adapter_speed", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_process_interval_brackets_the_median_and_is_repeatable(bench):
    values = [1.0 + 0.01 * ((7 * i) % 11) for i in range(20)]
    lo, hi = bench.bootstrap_interval(values)
    assert lo <= sorted(values)[10] <= hi and lo < hi
    assert bench.bootstrap_interval(values) == [lo, hi]
    # one group holding every value is the same as no groups
    assert bench.bootstrap_interval(values, groups=[20]) == [lo, hi]


def test_pooled_interval_widens_when_one_process_runs_apart(bench):
    # three processes near 1.05, one settled at 1.30: pooling the rounds as if independent hides
    # the odd process (the median barely moves); resampling processes shows it
    values = [1.04, 1.05, 1.06, 1.05, 1.05] * 3 + [1.29, 1.30, 1.31, 1.30, 1.30]
    naive = bench.bootstrap_interval(values)
    cluster = bench.bootstrap_interval(values, groups=[5, 5, 5, 5])
    assert naive[1] < 1.1
    assert cluster[1] > 1.15
    assert cluster[0] <= naive[0]


def test_paired_ratio_pairs_rounds_and_passes_groups(bench):
    times = {"a": [2.0, 2.2, 4.0, 4.4], "b": [1.0, 2.0, 2.0, 4.0]}  # per-round ratios 2, 1.1, 2, 1.1
    median, interval = bench.paired_ratio(times, "a", "b")
    assert median == pytest.approx(1.55)
    assert interval == bench.bootstrap_interval([2.0, 1.1, 2.0, 1.1])
    _, grouped = bench.paired_ratio(times, "a", "b", groups=[2, 2])
    assert grouped == bench.bootstrap_interval([2.0, 1.1, 2.0, 1.1], groups=[2, 2])


def test_figures_from_pooled_times(bench):
    times = {"base": [1.0, 1.0, 2.0, 2.0], "adapter": [1.1, 1.1, 2.1, 2.1]}
    res = bench.infer_figures(times, groups=[2, 2])
    assert res["overhead"] == pytest.approx(1.6 / 1.5 - 1)  # ratio of medians
    assert res["overhead_paired"] == pytest.approx(0.075)  # median of 0.1, 0.1, 0.05, 0.05
