"""Pins kifmerge.importance's EMA values, blocking, callback, calibration and Gram hooks with hand-computed numbers (issue 22: mutants of importance.py)."""

import pytest
import torch

from kifmerge.errors import UsageError
from kifmerge.importance import CPU_BLOCK, GramCollector, ImportanceAccumulator, ImportanceCallback, calibrate

# θ = [2, −1], g = [3, 4] → s = |θ·g| = [6, 4]; defaults β1 = β2 = 0.85, so each step lerps by 0.15.
# step 1: Ī = 0.15·s = [0.9, 0.6];  Ū = 0.15·|s − Ī| = 0.15·[5.1, 3.4] = [0.765, 0.51]
# step 2: Ī = 0.85·[0.9, 0.6] + 0.15·[6, 4] = [1.665, 1.11];  |s − Ī| = [4.335, 2.89]
#         Ū = 0.85·[0.765, 0.51] + 0.15·[4.335, 2.89] = [1.3005, 0.867]
#         score Ī·Ū = [1.665·1.3005, 1.11·0.867] = [2.1653325, 0.96237]
TWO_STEP_SCORES = torch.tensor([2.1653325, 0.96237])


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_default_betas_are_0_85_and_two_steps_give_the_hand_computed_scores():
    param = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    acc = ImportanceAccumulator([("w", param)])
    assert acc.report() == {"estimator": "first", "beta1": 0.85, "beta2": 0.85, "steps": 0, "skipped_non_finite": 0}
    param.grad = torch.tensor([3.0, 4.0])
    assert acc.update()
    close(acc.ipt["w"], [0.9, 0.6])
    close(acc.unc["w"], [0.765, 0.51])
    assert acc.update()
    close(acc.element_scores()["w"], TWO_STEP_SCORES)
    close(acc.unit_scores("full")["w"], [(2.1653325 + 0.96237) / 2])  # unit score = mean of the element scores


def test_an_unknown_estimator_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown importance estimator 'third'"):
        ImportanceAccumulator([("w", torch.nn.Parameter(torch.ones(1)))], estimator="third")


def test_scores_of_a_bfloat16_parameter_are_kept_in_float32():
    # θ = 1, g = 1 + 2⁻⁷ (exact in bfloat16) → s = 1.0078125
    # Ī = 0.15·1.0078125 = 0.151171875; Ū = 0.15·(1.0078125 − 0.151171875) = 0.12849609375
    # (bfloat16 steps near 0.15 are 2⁻¹⁰ ≈ 0.001: a bfloat16 EMA could not hold these values)
    param = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
    acc = ImportanceAccumulator([("w", param)])
    param.grad = torch.tensor([1.0078125], dtype=torch.bfloat16)
    assert acc.update()
    assert acc.ipt["w"].dtype == acc.unc["w"].dtype == torch.float32
    close(acc.ipt["w"], [0.151171875])
    close(acc.unc["w"], [0.12849609375])


def test_a_parameter_larger_than_a_cpu_block_is_scored_in_every_element():
    # "a" spans two CPU blocks (2¹⁸ + 2 elements), "b" shares the second block.
    # a: θ = 2, g = 3 → s = 6 → Ī = 0.9, Ū = 0.15·5.1 = 0.765, score 0.6885; last element θ = −1, g = 4 →
    #    s = 4 → Ī = 0.6, Ū = 0.51, score 0.306
    # b: θ = [1, 0.5], g = [2, 2] → s = [2, 1] → Ī = [0.3, 0.15], Ū = 0.15·[1.7, 0.85] = [0.255, 0.1275],
    #    scores [0.0765, 0.019125]
    a = torch.nn.Parameter(torch.full((CPU_BLOCK + 2,), 2.0))
    b = torch.nn.Parameter(torch.tensor([1.0, 0.5]))
    acc = ImportanceAccumulator([("a", a), ("b", b)])
    with torch.no_grad():
        a[-1] = -1.0
    a.grad = torch.full((CPU_BLOCK + 2,), 3.0)
    a.grad[-1] = 4.0
    b.grad = torch.tensor([2.0, 2.0])
    assert acc.update()
    scores = acc.element_scores()
    expected_a = torch.full((CPU_BLOCK + 2,), 0.6885)
    expected_a[-1] = 0.306
    close(scores["a"], expected_a)
    close(scores["b"], [0.0765, 0.019125])


def test_update_on_a_non_cpu_device_folds_in_the_step():
    # The accelerator path (all parameters of a device in one group). The meta device stands in for a
    # GPU on machines without one: it has no values, so this pins that the step runs and counts.
    params = [(f"p{i}", torch.nn.Parameter(torch.empty(3, 2, device="meta"))) for i in range(2)]
    acc = ImportanceAccumulator(params)
    for _, p in params:
        p.grad = torch.empty(3, 2, device="meta")
    assert acc.update(finite=True)
    assert acc.steps == 1 and acc.ipt["p1"].shape == (3, 2)


def test_a_non_contiguous_parameter_is_scored():
    # Found by the mutants of `_blocks`: the score buffers took a transposed parameter's strides, the
    # CPU path updated `reshape(-1)` copies of them, and the scores stayed 0.
    # θ = 1, g = 1 → s = 1 → Ī = 0.15 everywhere
    param = torch.nn.Parameter(torch.ones(3, 2).t())
    acc = ImportanceAccumulator([("w", param)])
    param.grad = torch.ones(2, 3)
    assert acc.update()
    close(acc.ipt["w"], torch.full((2, 3), 0.15))


@pytest.mark.parametrize("grad_norm", [None, lambda: None], ids=["no-norm-function", "trainer-reported-none"])
def test_callback_without_a_trainer_norm_checks_the_gradients_itself(grad_norm):
    param = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    acc = ImportanceAccumulator([("w", param)])
    callback = ImportanceCallback(acc, grad_norm=grad_norm)
    param.grad = torch.tensor([3.0, 4.0])
    callback.on_optimizer_step(None, None, None)
    close(acc.ipt["w"], [0.9, 0.6])  # step 1 of the numbers at the top
    param.grad = torch.tensor([float("nan"), 4.0])
    callback.on_optimizer_step(None, None, None)
    assert acc.report()["steps"] == 1 and acc.report()["skipped_non_finite"] == 1


def test_callback_takes_finiteness_from_the_trainer_norm():
    norms = iter([1.5, float("inf")])
    param = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    acc = ImportanceAccumulator([("w", param)])
    callback = ImportanceCallback(acc, grad_norm=lambda: next(norms))
    param.grad = torch.tensor([3.0, 4.0])
    callback.on_optimizer_step(None, None, None)
    callback.on_optimizer_step(None, None, None)  # same finite gradients, but the trainer's norm says inf
    assert acc.report()["steps"] == 1 and acc.report()["skipped_non_finite"] == 1


def test_calibrate_scores_each_batch_and_ticks_progress_once_per_batch():
    # loss = w·x with w = [2, −1], x = [3, 4] → g = x, s = [6, 4]: two batches are the two steps at the top
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0]]))
    acc = ImportanceAccumulator(model.named_parameters())
    ticks = []
    batches = [{"x": torch.tensor([[3.0, 4.0]])}] * 2
    calibrate(model, batches, acc, lambda m, batch: m(batch["x"]).sum(), ticks.append)
    assert ticks == [1, 1]
    close(acc.element_scores()["weight"], TWO_STEP_SCORES[None])
    assert model.weight.grad is None and not model.training


def test_gram_collector_records_only_lora_adapted_linear_layers():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(3, 2)
            self.lin = torch.nn.Linear(2, 1, bias=False)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    tiny = Tiny()
    with torch.no_grad():
        tiny.emb.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]))
    model = get_peft_model(tiny, LoraConfig(r=1, target_modules=["emb", "lin"]))
    grams = GramCollector(model)
    model.train()
    model(torch.tensor([[0, 1]]))
    # the LoRA embedding is adapted too but is no linear layer: no Gram matrix for it.
    # lin's inputs X = rows 0 and 1 of the embedding (LoRA B starts at 0) = [[1, 2], [3, 0]]
    # XᵀX = [[1·1 + 3·3, 1·2 + 3·0], [2·1 + 0·3, 2·2 + 0·0]] = [[10, 2], [2, 4]]
    assert set(grams.grams) == {"base_model.model.lin"}
    close(grams.grams["base_model.model.lin"], [[10.0, 2.0], [2.0, 4.0]])
    # train --gram refuses such a model before any step: RegMean could not fuse its task
    assert grams.unsupported == {"base_model.model.emb": "Embedding"}
    with pytest.raises(UsageError, match=r"--gram records linear layers only; the LoRA module base_model\.model\.emb \(Embedding\)"):
        grams.refuse_unsupported()
    grams.remove()
    # as the default (--gram not given) it records nothing instead, and says why once
    from kifmerge.errors import KifWarning

    with pytest.warns(KifWarning, match=r"no Gram matrices recorded: the LoRA module base_model\.model\.emb is a Embedding"):
        assert GramCollector.attach(model, None) is None
    assert GramCollector.attach(model, False) is None
    with pytest.raises(UsageError, match="--gram records linear layers only"):
        GramCollector.attach(model, True)


def two_heads_collector(double_between: bool = False):
    """q and v LoRA-adapted linear layers reading one embedding output (rows [1, 2], [3, 0], [0, 1]),
    and a collector on them; `double_between` doubles that output in place after q has read it."""
    from peft import LoraConfig, get_peft_model

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(3, 2)
            self.q = torch.nn.Linear(2, 1, bias=False)
            self.v = torch.nn.Linear(2, 1, bias=False)

        def forward(self, ids):
            hidden = self.emb(ids)
            out = self.q(hidden)
            if double_between:
                hidden.mul_(2)  # the same tensor object, other values
            return out + self.v(hidden)

    tiny = TwoHeads()
    with torch.no_grad():
        tiny.emb.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]]))
    model = get_peft_model(tiny, LoraConfig(r=1, target_modules=["q", "v"]))
    model.train()
    return model, GramCollector(model)


def test_two_modules_on_the_same_input_share_one_sum_counted_once_per_step():
    """q and v of a layer read one tensor: the collector multiplies once and keeps one buffer for
    both, which counts each step once (kifmerge/gram_sums.py)."""
    model, grams = two_heads_collector()
    model(torch.tensor([[0, 1]]))  # X = [[1, 2], [3, 0]] → XᵀX = [[10, 2], [2, 4]]
    model(torch.tensor([[2]]))  # X = [[0, 1]] → XᵀX = [[0, 0], [0, 1]]
    q, v = grams.grams["base_model.model.q"], grams.grams["base_model.model.v"]
    close(q, [[10.0, 2.0], [2.0, 5.0]])
    assert q is v


def test_fisher_scores_are_the_smoothed_squared_gradient_whatever_the_weight():
    # θ = [2, −1] and θ = [200, −100] give the same scores: g = [3, 4] → g² = [9, 16]
    # step 1: Ī = 0.15·[9, 16] = [1.35, 2.4]; step 2 with g = [1, 0]: Ī = 0.85·[1.35, 2.4] + 0.15·[1, 0] = [1.2975, 2.04]
    # the score is Ī alone (no Ū factor); a LoRA rank unit's, the product of its factors' means
    for scale in (1.0, 100.0):
        param = torch.nn.Parameter(scale * torch.tensor([2.0, -1.0]))
        acc = ImportanceAccumulator([("w", param)], estimator="fisher")
        param.grad = torch.tensor([3.0, 4.0])
        assert acc.update()
        close(acc.element_scores()["w"], [1.35, 2.4])
        param.grad = torch.tensor([1.0, 0.0])
        assert acc.update()
        close(acc.element_scores()["w"], [1.2975, 2.04])
        close(acc.unit_scores("full")["w"], [(1.2975 + 2.04) / 2])
    assert acc.report()["estimator"] == "fisher"


def test_an_input_changed_in_place_between_two_modules_is_multiplied_again():
    model, grams = two_heads_collector(double_between=True)
    model(torch.tensor([[0, 1]]))  # X = [[1, 2], [3, 0]] → XᵀX = [[10, 2], [2, 4]]; v reads 2X: 4 × that
    close(grams.grams["base_model.model.q"], [[10.0, 2.0], [2.0, 4.0]])
    close(grams.grams["base_model.model.v"], [[40.0, 8.0], [8.0, 16.0]])
