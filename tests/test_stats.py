"""Paired bootstrap intervals: the benchmark calls a difference only when its interval excludes 0."""

import itertools

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


# ---- known answers (issue 22): the exact bootstrap distribution of a tiny data set -------------
def every_resample(n: int) -> np.ndarray:
    """All n^n resamples of n examples (each equally likely under the bootstrap), as indices."""
    return np.array(list(itertools.product(range(n), repeat=n)))


def test_interval_quantiles_and_level_on_known_replicates():
    replicates = np.arange(1001) / 1000  # 0, 0.001, …, 1: the q-quantile is q exactly
    assert interval(replicates, 0.5) == {"value": 0.5, "low": 0.025, "high": 0.975}
    assert interval(replicates, 0.5, level=0.9) == {"value": 0.5, "low": 0.05, "high": 0.95}
    assert interval(replicates, 0.5, level=0.5) == {"value": 0.5, "low": 0.25, "high": 0.75}


def test_bootstrap_interval_equals_the_exact_one_from_every_resample():
    # scores [0, 1, 1, 1]: a resample's mean is k/4 with k ~ Binomial(4, 3/4); of the 4^4 = 256
    # equally likely resamples, k = 0, 1, 2, 3, 4 for 1, 12, 54, 108, 81 (cumulative 1, 13, 67, 175, 256).
    # Sorted, the means are 0 (index 0), 0.25 (1–12), 0.5 (13–66), 0.75 (67–174), 1 (175–255).
    # 95 %: the 2.5 % point sits at index 0.025·255 = 6.4 → 0.25; the 97.5 % point at 248.6 → 1.
    # 80 %: 10 % at index 25.5 → 0.5; 90 % at 229.5 → 1.   (90 %: 5 % at 12.75 → 0.25 + 0.75·0.25 = 0.4375)
    scores = [[0, 1, 1, 1]]
    point, replicates = average_precision(scores, [every_resample(4)])
    assert point == 0.75 and sorted(replicates.tolist()) == [0.0] + [0.25] * 12 + [0.5] * 54 + [0.75] * 108 + [1.0] * 81
    assert interval(replicates, point) == {"value": 0.75, "low": 0.25, "high": 1.0}
    assert interval(replicates, point, level=0.8) == {"value": 0.75, "low": 0.5, "high": 1.0}
    assert interval(replicates, point, level=0.9)["low"] == 0.4375
    # Monte Carlo resamples land on the same interval: P(mean ≤ 0) = 1/256 < 2.5 % < P(mean ≤ 0.25) = 13/256
    # and P(mean < 1) = 175/256 < 97.5 %, with 20 000 replicates far from either edge
    point, replicates = average_precision(scores, resample_indices([4], 20000, seed=5))
    assert interval(replicates, point) == {"value": 0.75, "low": 0.25, "high": 1.0}


def test_paired_difference_calls_higher_lower_and_no_difference_by_hand():
    idx = [every_resample(4)]
    # a − b per example = [1, 1, 0, 1]: the paired mean is k/4 with k ~ Binomial(4, 3/4), as above → [0.25, 1]
    a, b = average_precision([[1, 1, 0, 1]], idx), average_precision([[0, 0, 0, 0]], idx)
    assert paired_difference(a, b) == {"value": 0.75, "low": 0.25, "high": 1.0, "called": "higher"}
    assert paired_difference(b, a) == {"value": -0.75, "low": -1.0, "high": -0.25, "called": "lower"}
    # a − b = [1, 0, 0, 0]: k/4 with k ~ Binomial(4, 1/4): 0 for 81 of 256 resamples → the 2.5 % point is 0
    # (index 6.4 of the sorted means), the 97.5 % point 0.75 (k = 0, 1, 2, 3 cumulative 81, 189, 243, 255)
    c = average_precision([[1, 0, 0, 0]], idx)
    assert paired_difference(c, b) == {"value": 0.25, "low": 0.0, "high": 0.75, "called": "no difference"}
    # a − b = [1, 1, −1, 1]: 1 − k/2 with k ~ Binomial(4, 1/4) = 1 (81), 0.5 (108), 0 (54), −0.5 (12), −1 (1);
    # sorted: −1 (0), −0.5 (1–12), 0 (13–66), 0.5 (67–174), 1 (175–255)
    d, e = average_precision([[1, 1, 0, 1]], idx), average_precision([[0, 0, 1, 0]], idx)
    # 95 %: index 6.4 → −0.5, 248.6 → 1: no difference; level 0.4: 30 % at 76.5 → 0.5, 70 % at 178.5 → 1: higher
    assert paired_difference(d, e) == {"value": 0.5, "low": -0.5, "high": 1.0, "called": "no difference"}
    assert paired_difference(d, e, level=0.4) == {"value": 0.5, "low": 0.5, "high": 1.0, "called": "higher"}
    assert paired_difference(e, d, level=0.4)["called"] == "lower"


def test_backward_transfer_and_combine_by_hand():
    # final − learned per example: task 0 [0, −1], task 1 [−1, −1]; the last task (2) is left out
    # point = mean(−0.5, −1) = −0.75. The 4 resamples of 2 examples, (0,0) (0,1) (1,0) (1,1), shared by the
    # tasks: task 0's mean is 0, −0.5, −0.5, −1; task 1's is −1 always → BWT replicates (t0 − 1)/2 =
    # −0.5, −0.75, −0.75, −1, in the resamples' order
    final = [[1, 0], [0, 0], [1, 1]]
    learned = [[1, 1], [1, 1], [0, 0]]
    idx = [every_resample(2)] * 3
    point, replicates = backward_transfer(final, learned, idx)
    assert point == -0.75 and replicates.tolist() == [-0.5, -0.75, -0.75, -1.0]
    # combine averages points and replicates resample by resample: (−0.75 + 0.25)/2, (r + 0.5)/2
    mean, reps = combine([(point, replicates), (0.25, np.full(4, 0.5))])
    assert mean == -0.25 and reps.tolist() == [0.0, -0.125, -0.125, -0.25]


def test_resamples_are_reproducible_with_documented_defaults():
    # defaults: 2000 replicates, seed 0; the same seed draws the same resamples, another seed others
    default = resample_indices([5, 3])
    assert [d.shape for d in default] == [(2000, 5), (2000, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(default, resample_indices([5, 3], 2000, seed=0)))
    assert not np.array_equal(resample_indices([5], 50, seed=1)[0], resample_indices([5], 50, seed=2)[0])
    assert all(0 <= d.min() and d.max() < n for d, n in zip(default, [5, 3]))


def test_interval_rounds_to_six_decimals():
    assert interval(np.full(5, 0.12345678), 0.87654321) == {"value": 0.876543, "low": 0.123457, "high": 0.123457}


def test_refusals_name_what_is_wrong():
    with pytest.raises(ValueError, match="^2 tasks of scores but 1 of indices$"):
        task_means([[1, 0], [0, 1]], resample_indices([2], 10))
    with pytest.raises(ValueError, match="^a task has 4 scored examples, the resample expects 5$"):
        task_means([np.ones(4)], resample_indices([5], 10))
    with pytest.raises(ValueError, match="^backward transfer needs at least two tasks$"):
        backward_transfer([[1]], [[1]], resample_indices([1], 10))
    # a reference with fewer tasks than the final row is refused, not silently cut short
    with pytest.raises(ValueError):
        backward_transfer([[1], [1], [1]], [[1]], resample_indices([1, 1, 1], 10))
    # two tasks are enough: BWT = final[0] − reference[0] = 0 − 1
    assert backward_transfer([[0], [1]], [[1], [1]], resample_indices([1, 1], 10))[0] == -1.0
