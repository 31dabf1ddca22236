"""Paired bootstrap intervals: the benchmark calls a difference only when its interval excludes 0."""

import numpy as np
import pytest

from kifmerge.stats import (
    average_precision,
    backward_transfer,
    combine,
    interval,
    paired_difference,
    resample_indices,
    task_means,
)


def test_ap_interval_brackets_the_estimate_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        scores = [rng.random(n) < p for p in (0.3, 0.6, 0.8)]
        point, reps = average_precision(scores, resample_indices([n] * 3, 1000, seed=2))
        cell = interval(reps, point)
        assert cell["low"] <= point <= cell["high"]
        assert point == pytest.approx(np.mean([s.mean() for s in scores]))
        widths.append(cell["high"] - cell["low"])
    assert widths[1] < widths[0] / 2


def test_pairing_separates_a_small_consistent_gain_that_unpaired_intervals_would_not():
    """Method b answers 4 % more examples right than a, on the same examples: their AP intervals
    overlap, but the paired difference excludes 0."""
    rng = np.random.default_rng(3)
    a = [rng.random(300) < 0.5 for _ in range(4)]
    b = []
    for task in a:
        better = task.copy()
        better[np.flatnonzero(~task)[:12]] = True  # 12 of 300 examples flip to right
        b.append(better)
    idx = resample_indices([300] * 4, 2000, seed=0)
    ap_a, ap_b = average_precision(a, idx), average_precision(b, idx)
    ia, ib = interval(ap_a[1], ap_a[0]), interval(ap_b[1], ap_b[0])
    assert ia["high"] > ib["low"], "unpaired intervals overlap"
    diff = paired_difference(ap_b, ap_a)
    assert diff["value"] == pytest.approx(0.04)
    assert diff["low"] > 0 and diff["called"] == "higher"
    assert paired_difference(ap_a, ap_a)["called"] == "no difference"


def test_backward_transfer_uses_all_but_the_last_task_and_pairs_examples():
    final = [np.array([1, 0, 1, 0]), np.array([1, 1, 1, 1]), np.array([0, 0, 0, 0])]
    learned = [np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1])]
    point, reps = backward_transfer(final, learned, resample_indices([4] * 3, 500))
    assert point == pytest.approx((-0.5 + 0.0) / 2)  # the last task's column is not forgetting
    assert reps.shape == (500,) and reps.max() <= 0
    with pytest.raises(ValueError):
        backward_transfer(final[:1], learned[:1], resample_indices([4], 10))


def test_mismatched_sizes_are_refused_and_combine_averages():
    idx = resample_indices([5], 10)
    with pytest.raises(ValueError):
        task_means([np.ones(4)], idx)
    point, reps = combine([(0.2, np.zeros(10)), (0.4, np.ones(10))])
    assert point == pytest.approx(0.3) and np.allclose(reps, 0.5)
