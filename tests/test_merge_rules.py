"""Merge rules (task vectors, MagMax, LoRA re-factoring, RegMean) by hand: pins what surviving mutants changed (issue 22)."""

from __future__ import annotations

import torch

from kifmerge.fusion.rules import (
    TASK_VECTOR_CONFIGS,
    lora_product,
    max_magnitude_merge,
    random_drop,
    regmean,
    task_vector_merge,
)


def test_plain_calls_use_the_documented_defaults():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0])
    # task_vector_merge: a plain weighted sum, no sign election, no division:
    # 1·[1, −1] + 0.5·[−1, −1] = [0.5, −1.5]  (consensus would keep only a's 1 in entry 0; normalize would ÷1.5)
    assert task_vector_merge(base, [a, b], [1.0, 0.5]).tolist() == [0.5, -1.5]
    # MagMax with λ = 1: per entry the larger |τ| (a tie keeps the first) → [1, −1]
    assert max_magnitude_merge(base, [a, b]).tolist() == [1.0, -1.0]
    # RegMean with non_diagonal 0.9: G̃₁ = [[2, .9], [.9, 2]], G̃₂ = I; Σ ΔW G̃ = [2, .9] + [0, 1] = [2, 1.9];
    # Σ G̃ = [[3, .9], [.9, 3]], det 8.19 → [2, 1.9]·[[3, −.9], [−.9, 3]] / 8.19 = [4.29, 3.9] / 8.19 = [11/21, 10/21]
    merged = regmean([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], [torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.eye(2)])
    torch.testing.assert_close(merged, torch.tensor([[11 / 21, 10 / 21]]))


def test_dare_keeps_an_entry_with_probability_exactly_density():
    # torch.rand(8) under seed 7 draws 0x1.11e15ep-1 (= 0.53492254…) first, then .199 .659 .657 .233 .425 .207 .630.
    # With the density set to that very draw, entry 0 is dropped (keep ⟺ draw < density, so on rand's 2⁻²⁴ grid
    # P(keep) = density exactly); the kept entries are rescaled by 1/density.
    density = float.fromhex("0x1.11e15ep-1")
    kept = random_drop(torch.ones(8), density, torch.Generator().manual_seed(7))
    assert (kept != 0).tolist() == [False, True, False, False, True, True, True, False]
    torch.testing.assert_close(kept[1], torch.tensor(1 / density))


def test_ties_with_alpha_zero_keeps_the_line_and_no_nan():
    # weights [1, 0] (--alpha 0): the task weighs nothing, the line's trimmed vector is kept as is.
    # density 0.5 of 4 → Δline keeps its 2 largest magnitudes: [0.5, −0.25, 0, 2] → [0.5, 0, 0, 2];
    # the entries nobody keeps divide 0 by a guarded divisor (1), giving 0, not 0/0 = NaN
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    line, task = base + torch.tensor([0.5, -0.25, 0.0, 2.0]), base + 1.0
    merged = task_vector_merge(base, [line, task], [1.0, 0.0], density=0.5, **TASK_VECTOR_CONFIGS["ties"])
    assert merged.tolist() == [1.5, 2.0, 3.0, 6.0]


def test_ties_with_a_negative_weight_divides_by_the_signed_kept_weights():
    # weights [1, −1] (a task subtracted), density 1: weighted Δ's a: [1, 0], b: −1·[−1, −2] = [1, 2]; sums + → keep +
    # entry 0: kept weights 1 + (−1) = 0 → guarded to 1 → (1 + 1)/1 = 2
    # entry 1: only b kept, weight −1 → 2/(−1) = −2
    base = torch.zeros(2)
    merged = task_vector_merge(base, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -2.0])], [1.0, -1.0], density=1.0,
                               **TASK_VECTOR_CONFIGS["ties"])
    assert merged.tolist() == [2.0, -2.0]


def test_normalized_sum_without_consensus_divides_by_the_summed_weights():
    # (0.25·[1, 2] + 0.25·[3, −2]) / (0.25 + 0.25) = [1, 0] / 0.5 = [2, 0]: the plain average
    merged = task_vector_merge(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])], [0.25, 0.25], normalize=True)
    assert merged.tolist() == [2.0, 0.0]


def test_ties_block_is_cut_at_the_whole_tensor_threshold():
    # α = 1 (weights [0, 1]) takes the general path; the engine passes the cut found over the whole tensor.
    # Cut 0.15 keeps |Δ| ≥ 0.15 of the task: [0.1, 0.2, 0.3, 0.4] → [0, 0.2, 0.3, 0.4]
    # (the block's own density-0.5 cut would be 0.3 and keep only [0, 0, 0.3, 0.4])
    task = torch.tensor([0.1, 0.2, 0.3, 0.4])
    merged = task_vector_merge(torch.zeros(4), [torch.ones(4), task], [0.0, 1.0], density=0.5,
                               thresholds=[torch.tensor(0.5), torch.tensor(0.15)], **TASK_VECTOR_CONFIGS["ties"])
    assert merged.tolist() == torch.tensor([0.0, 0.2, 0.3, 0.4]).tolist()


def test_normalized_dare_ties_of_two_draws_from_the_given_generator():
    # DARE drops with consensus and normalize (two inputs, positive weights: the pair path). Seed 7, density 0.5:
    # a kept [0 1 0 0 1 1 1 0], b kept [1 0 0 0 1 1 1 1] (draws in tests/test_rules.py); ×2 then ×w:
    # a: e1 .125, e4 −.25, e5 .375, e6 −.3125;  b: e0 .375, e4 .75, e5 −.375, e6 −.1875, e7 .5625
    # e0 .375/.75 = .5; e1 .125/.25 = .5; e2, e3 nothing → 0; e4 sum +.5 → b: .75/.75 = 1; e5 sum 0 → + → a: .375/.25 = 1.5;
    # e6 both −: −.5/(.25 + .75) = −.5; e7 .5625/.75 = .75
    base = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0, -2.0, 0.5, 4.0])
    da = torch.tensor([0.125, 0.25, 0.375, 0.5, -0.5, 0.75, -0.625, 1.0])
    db = torch.tensor([0.25, -0.5, 0.75, 1.0, 0.5, -0.25, -0.125, 0.375])
    merged = task_vector_merge(base, [base + da, base + db], [0.25, 0.75], sparsify="random", density=0.5, consensus=True,
                               normalize=True, generator=torch.Generator().manual_seed(7))
    assert (merged - base).tolist() == [0.5, 0.5, 0.0, 0.0, 1.0, 1.5, -0.5, 0.75]


def test_magmax_selects_in_float32_and_leaves_the_inputs_alone():
    # float16 inputs: τ = t − base is taken in float32, where 2048 − (−0.5) = 2048.5 is exact (in float16 it would
    # round to 2048). Entry 0: the line's 2048.5 wins, entry 1: the task's; λ = 0.5 → 1024.25 − 0.5 = 1023.75
    base = torch.tensor([-0.5, -0.5], dtype=torch.float16)
    line = torch.tensor([2048.0, 0.5], dtype=torch.float16)
    task = torch.tensor([0.5, 2048.0], dtype=torch.float16)
    merged = task_vector_merge(base, [line, task], [0.5, 0.5], lam=0.5, out_dtype=torch.float32, **TASK_VECTOR_CONFIGS["magmax"])
    assert merged.dtype == torch.float32 and merged.tolist() == [1023.75, 1023.75]
    # float32 inputs are read, never overwritten
    line32, task32 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.5])
    max_magnitude_merge(torch.ones(2), [line32, task32])
    assert line32.tolist() == [3.0, 0.0] and task32.tolist() == [0.0, 1.5]
    # a tie of opposite signs keeps the first input's: τ = [0.5] vs [−0.5] → 1 + 0.5
    assert max_magnitude_merge(torch.ones(1), [torch.tensor([1.5]), torch.tensor([0.5])]).tolist() == [1.5]


def test_merged_dtype_is_out_dtype_or_the_last_inputs():
    base = torch.zeros(2)
    half = [torch.tensor([1.0, -1.0], dtype=torch.float16), torch.tensor([0.5, 1.0], dtype=torch.float16)]
    for method in ("task-arithmetic", "ties", "magmax"):
        config = TASK_VECTOR_CONFIGS[method]
        assert task_vector_merge(base, half, [0.5, 0.5], out_dtype=torch.float32, **config).dtype == torch.float32, method
        # no out_dtype: the last input's (float32, float16, bfloat16 → bfloat16), on 3 inputs and on the TIES pair
        mixed = [torch.tensor([1.0, -1.0]), torch.tensor([0.5, 1.0], dtype=torch.float16), torch.tensor([2.0, 1.0], dtype=torch.bfloat16)]
        assert task_vector_merge(base, mixed, [0.25, 0.25, 0.5], **config).dtype == torch.bfloat16, method
        assert task_vector_merge(base, mixed[1:], [0.5, 0.5], **config).dtype == torch.bfloat16, method


def test_float64_checkpoints_are_merged_in_float32():
    # The base 2²⁴ + 1 rounds to 2²⁴ in float32; both inputs 2²⁴ + 2 → τ = 2; TIES (½·2 + ½·2)/1 = 2 and MagMax 2;
    # λ = 0.5 → 1; 2²⁴ + 1 is a float32 tie → rounds to even 2²⁴ = 16777216 (not the float64 answer 2²⁴ + 1.5)
    base = torch.tensor([2.0**24 + 1], dtype=torch.float64)
    inputs = [torch.tensor([2.0**24 + 2], dtype=torch.float64)] * 2
    for method in ("ties", "magmax"):
        merged = task_vector_merge(base, inputs, [0.5, 0.5], density=1.0, lam=0.5, **TASK_VECTOR_CONFIGS[method])
        assert merged.dtype == torch.float64 and merged.tolist() == [16777216.0], method


def test_lora_product_of_half_precision_factors_is_float32():
    # B·A = [[3], [4]]·[[1, 2]] = [[3, 6], [4, 8]], computed and returned in float32
    product = lora_product(torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), torch.tensor([[3.0], [4.0]], dtype=torch.float16))
    assert product.dtype == torch.float32 and product.tolist() == [[3.0, 6.0], [4.0, 8.0]]


def test_regmean_ridge_is_relative_to_the_grams_and_only_damps():
    one = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    # Grams scaled by s = 2⁻²⁶ (tiny activations): the merge is scale-free, [2·3, 4·3]s / (4s) = [1.5, 3] as at s = 1
    s = 2.0**-26
    tiny = [torch.diag(torch.tensor([3.0, 1.0])) * s, torch.diag(torch.tensor([1.0, 3.0])) * s]
    torch.testing.assert_close(regmean(one, tiny), torch.tensor([[1.5, 3.0]]))
    # Two equal updates [1, 1], Grams diag(1, 1e-9) each: ΣG = diag(2, 2e-9), ridge = 1e-9 · mean diag ≈ 1e-9.
    # Feature 2, barely seen, is damped: 2e-9 / (2e-9 + 1e-9) = 2/3; feature 1: 2 / (2 + 1e-9) ≈ 1
    same = [torch.tensor([[1.0, 1.0]])] * 2
    weak = [torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64))] * 2
    torch.testing.assert_close(regmean(same, weak, non_diagonal=1.0), torch.tensor([[1.0, 2 / 3]]))
    # Grams of 1e-40 (float64): the mean diagonal 2e-40 is floored at 1e-30, ridge 1e-39 (in float64):
    # 2e-40 / (2e-40 + 1e-39) = 1/6 exactly as float32
    vanishing = [torch.diag(torch.tensor([1e-40, 1e-40], dtype=torch.float64))] * 2
    assert torch.equal(regmean(same, vanishing), torch.full((1, 2), 1 / 6))
