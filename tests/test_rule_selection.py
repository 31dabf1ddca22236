"""Pins the unit rules' edge cases and the exact top-k selection (TIES' cut) on hand-computed values (issue 22's surviving mutants)."""

from __future__ import annotations

import math

import pytest
import torch

from kifmerge.fusion.rules import (
    blend,
    bracket_pass,
    bracket_pick,
    element_weights,
    important_units,
    kif_adaptive,
    kif_static,
    kth_largest,
    linear,
    magnitude_trim,
    rank_normalise,
    sample_bracket,
    task_vector_merge,
)

# ---- unit rules -------------------------------------------------------------------------------------


def test_important_units_of_an_empty_profile_is_an_empty_mask():
    hot = important_units(torch.zeros(0), 0.2)
    assert hot.dtype == torch.bool and hot.shape == (0,)


def test_important_units_separates_scores_one_float32_step_apart():
    # [1, 1 + 2⁻²³] (adjacent float32 values), top 0.25: the 0.75 quantile of two values is
    # 1 + 0.75·2⁻²³, exact in float64; the upper unit is strictly above it. (In float32 the
    # quantile rounds up to 1 + 2⁻²³ and the upper unit would no longer count.)
    profile = torch.tensor([1.0, 1.0 + 2**-23])
    assert important_units(profile, 0.25).tolist() == [False, True]


def test_kif_static_with_an_integer_neither_keeps_float_coefficients():
    # The 10-unit example of test_rules: top 0.2 → old hot {0, 1}, new hot {0, 2}.
    # neither = 1 (an int): unit 0 both → (0.3, 0.7); 1 old only → (0, 1); 2 new only → (1, 0);
    # the rest neither → (1, 1 − 1 = 0)
    p_old = torch.tensor([0.9, 1.0, 0.1, 0.2, 0.0, 0.3, 0.1, 0.2, 0.0, 0.1])
    p_new = torch.tensor([1.0, 0.0, 0.9, 0.2, 0.1, 0.3, 0.1, 0.2, 0.0, 0.1])
    c_new, c_old = kif_static(p_old, p_new, neither=1)
    torch.testing.assert_close(c_new, torch.tensor([0.3, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(c_old, torch.tensor([0.7, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))


def test_kif_adaptive_is_the_float32_rounding_of_the_exact_sigmoid():
    # τ = 0.5, gap 1 − 0 = 1: c_new = σ(2) = 1/(1 + e⁻²) = 0.88079707797788…; its float32
    # neighbours are 0.88079702854… and 0.88079708814…, the nearer is the upper (1.0e-8 away)
    c_new, c_old = kif_adaptive(torch.tensor([0.0]), torch.tensor([1.0]), tau=0.5)
    assert c_new.item() == 0.880797088146209716796875
    assert c_old.item() == 1 - 0.880797088146209716796875  # 0.11920291185…, exact in float32


def test_rank_normalise_of_two_units_and_of_one():
    # n = 2: ranks (low + high − 1)/(2·(n − 1)): 0.7 → (1 + 2 − 1)/2 = 1, 0.2 → (0 + 1 − 1)/2 = 0;
    # a tie shares the mean rank: (0 + 2 − 1)/2 = 0.5
    assert rank_normalise(torch.tensor([0.7, 0.2])).tolist() == [1.0, 0.0]
    assert rank_normalise(torch.tensor([0.4, 0.4])).tolist() == [0.5, 0.5]
    # a single unit has no rank spread: 0, in float32 like every other profile's ranks
    one = rank_normalise(torch.tensor([0.3], dtype=torch.float64))
    assert one.dtype == torch.float32 and one.tolist() == [0.0]


def test_linear_defaults_to_an_even_mix_and_keeps_float_coefficients_for_an_integer_alpha():
    p = torch.tensor([0.2, 0.9])
    c_new, c_old = linear(p, p)  # default α = 0.5
    assert c_new.tolist() == [0.5, 0.5] and c_old.tolist() == [0.5, 0.5]
    # α = 1 (sequential fine-tuning) given as an int: float32 (1, 0), so `c_new.mean()` works
    c_new, c_old = linear(p, p, alpha=1)
    assert c_new.dtype == torch.float32 and c_old.dtype == torch.float32
    assert c_new.tolist() == [1.0, 1.0] and c_old.tolist() == [0.0, 0.0] and float(c_new.mean()) == 1.0


def test_element_weights_default_power_is_a_square_root():
    # p = 0.5: √4 / (√4 + √1) = 2/3
    torch.testing.assert_close(element_weights(torch.tensor([1.0]), torch.tensor([4.0])), torch.tensor([2 / 3]))


def test_element_weights_of_small_scores_are_not_flattened_to_a_half():
    # √0.25 = 0.5 and √0.0625 = 0.25: the total 0.75 is below 1 but above 0 → 0.5/0.75 = 2/3;
    # only a total of exactly 0 (neither scored) takes 0.5
    weights = element_weights(torch.tensor([0.0625, 0.0]), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 0.5]))


def test_element_weights_compute_float16_scores_in_float32():
    # profiles store element scores in float16; equal scores give a/(a + a) = 0.5 exactly when
    # both √s are taken in float32 (√2 in float16 is 1.4140625, not √2 in float32: 0.49997…)
    scores = torch.tensor([2.0, 3.0], dtype=torch.float16)
    weights = element_weights(scores, scores.clone())
    assert weights.dtype == torch.float32 and weights.tolist() == [0.5, 0.5]


def test_blend_computes_in_float32_for_float64_weights():
    # as documented, c_new·W_new + c_old·W_old is taken in float32, whatever the input dtype:
    # 1/3 → float32 0.333333343267…, returned in W_new's float64
    third = blend(torch.zeros(1, dtype=torch.float64), torch.tensor([1 / 3], dtype=torch.float64),
                  torch.tensor([1.0]), torch.tensor([0.0]), axis=0)
    assert third.dtype == torch.float64 and third.item() == 0.3333333432674408
    # W_old = 2⁻²⁴ + 2⁻⁵⁰ rounds to 2⁻²⁴ in float32; 1 + 2⁻²⁴ is half-way between 1 and 1 + 2⁻²³
    # and rounds to even: 1.0 (in float64 the sum lies above half-way and would round up)
    total = blend(torch.tensor([2**-24 + 2**-50], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                  torch.tensor([1.0]), torch.tensor([1.0]), axis=0)
    assert total.item() == 1.0


# ---- TIES' trimming ----------------------------------------------------------------------------------


def test_magnitude_trim_keeps_exactly_one_entry_at_a_tiny_density():
    # 4 entries, density 0.25: k = max(1, int(0.25·4)) = 1 → the cut is the largest magnitude, 3
    trimmed = magnitude_trim(torch.tensor([1.0, -3.0, 2.0, 0.5]), 0.25)
    assert trimmed.tolist() == [0.0, -3.0, 0.0, 0.0]


def test_magnitude_trim_at_density_one_or_more_keeps_every_entry():
    delta = torch.tensor([1.0, -3.0, 2.0, 0.5])
    # density 1 means no trimming, even where a caller passes a cut
    assert magnitude_trim(delta.clone(), 1.0, threshold=torch.tensor(2.0)).tolist() == [1.0, -3.0, 2.0, 0.5]
    assert magnitude_trim(delta.clone(), 1.5).tolist() == [1.0, -3.0, 2.0, 0.5]


def test_magnitude_trim_of_an_empty_or_one_entry_block():
    # TIES of a zero-size tensor is a zero-size tensor, not an error
    empty = torch.zeros(0)
    merged = task_vector_merge(empty, [empty, empty], [0.5, 0.5], sparsify="magnitude", density=0.5,
                               consensus=True, normalize=True)
    assert merged.shape == (0,)
    assert magnitude_trim(torch.zeros(0), 0.5).shape == (0,)
    # a one-entry block of a tensor whose cut is 2: |0.5| < 2 is trimmed, |−3| ≥ 2 is kept
    assert magnitude_trim(torch.tensor([0.5]), 0.5, threshold=torch.tensor(2.0)).tolist() == [0.0]
    assert magnitude_trim(torch.tensor([-3.0]), 0.5, threshold=torch.tensor(2.0)).tolist() == [-3.0]


def test_magnitude_trim_keeps_ties_with_a_float64_threshold():
    # cut 2 (a float64 tensor): |2|, |−2| and |3| are ≥ 2 and kept, |−1| is trimmed
    trimmed = magnitude_trim(torch.tensor([2.0, -1.0, -2.0, 3.0]), 0.5, threshold=torch.tensor(2.0, dtype=torch.float64))
    assert trimmed.tolist() == [2.0, 0.0, -2.0, 3.0]


# ---- the exact k-th largest (TIES' cut over a whole tensor) ------------------------------------------


def test_sample_bracket_spans_four_sigma_plus_eight_ranks_around_the_fraction():
    # Sample 0, 1, …, 99: the value of rank j from the top (0-based) is 99 − j.
    # margin = 4·√(n·f·(1 − f)) + 8 ranks around at = f·n; top = int(at − margin), bottom = ⌈at + margin⌉
    sample = torch.arange(100.0)
    # f = 0.5: at 50, √25 = 5, margin 28 → ranks 22 and 78 → values 77 and 21
    assert sample_bracket(sample, 0.5) == (21.0, 77.0)
    # f = 0.25: at 25, √18.75 = 4.3301, margin 25.3205 → top = int(−0.32) = 0 (the largest, 99),
    # bottom = ⌈50.32⌉ = 51 → 48
    assert sample_bracket(sample, 0.25) == (48.0, 99.0)
    # f = 0.01: at 1, n·f·(1 − f) = 0.99 counts as 1 → margin 12 → top −11: no upper edge (inf);
    # bottom 13 → 86
    assert sample_bracket(sample, 0.01) == (86.0, math.inf)
    # a sample of 20, f = 0.2: at 4, √3.2 = 1.7889, margin 15.1554 → top −11 (inf), bottom
    # ⌈19.16⌉ = 20 = n: no value has that rank, so the lower edge is 0
    assert sample_bracket(torch.arange(20.0), 0.2) == (0.0, math.inf)


def test_bracket_pass_collects_every_value_inside_the_bracket():
    values = torch.tensor([5.0, 3.0, 2.0, 2.0, 1.0, 0.0])
    # [1, 3]: one value above (5); inside, edges included: 3, 2, 2, 1
    above, inside = bracket_pass(values, 1.0, 3.0)
    assert above == 1 and inside.tolist() == [3.0, 2.0, 2.0, 1.0]
    # the 3rd largest overall is the 2nd largest inside: 2
    assert bracket_pick(above, inside, 3) == 2.0
    # magnitudes near float32's smallest normal: the bracket [0, 2e-38] holds all three, so the
    # largest is 2e-38, not 1e-38
    tiny = torch.tensor([2e-38, 1e-38, 0.0])
    above, inside = bracket_pass(tiny, 0.0, float(tiny[0]))
    assert above == 0 and inside.tolist() == tiny.tolist()
    assert bracket_pick(above, inside, 1) == tiny[0]


def test_bracket_pick_declines_or_finds_the_kth_largest_at_the_bracket_edges():
    values = torch.tensor([5.0, 3.0, 2.0, 2.0, 1.0, 0.0])
    above, inside = bracket_pass(values, 1.0, 3.0)  # 1 above, 4 inside
    assert bracket_pick(above, inside, 1) is None    # the largest (5) is above the bracket
    assert bracket_pick(above, inside, 5) == 1.0     # the 5th largest is the lower edge itself
    assert bracket_pick(above, inside, 6) is None    # the 6th (0) is below it
    # no upper edge: the 5th largest is again the lower edge, 1
    above, inside = bracket_pass(values, 1.0, math.inf)
    assert above == 0 and bracket_pick(above, inside, 5) == 1.0


def test_kth_largest_refuses_a_k_list_of_the_wrong_length():
    values = torch.tensor([3.0, 1.0, 3.0, 0.0, 2.0])

    def count(fn):  # one series, one block
        return fn([values])

    # ties: the 2nd largest is 3, the 3rd 2
    assert [float(v) for v in kth_largest(count, [2])] == [3.0]
    assert [float(v) for v in kth_largest(count, [3])] == [2.0]
    with pytest.raises(ValueError, match="zip"):  # two ks for one series: an error, not one result
        kth_largest(count, [2, 3])
