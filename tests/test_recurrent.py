"""Recurrent-KIF (`train --recurrent N`, kifmerge/recurrent.py): the fusion weights and the
global top-20 % masks on hand-written numbers, one fusion cycle against values worked out by
hand, and a two-task line trained through the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from safetensors.torch import load_file

from conftest import task_records, write_jsonl
from test_training import stored, task_weights

from kifmerge.recurrent import RecurrentFusionCallback, fused, recurrent_weights, top_fraction_masks


def test_fusion_weights_of_the_four_cases_and_the_fused_value():
    #                        both   inner  outer  neither
    inner = torch.tensor([[True, True], [False, False]])
    outer = torch.tensor([[True, False], [True, False]])
    w_in, w_out = recurrent_weights(inner, outer)
    assert w_in.dtype == w_out.dtype == torch.float32
    assert torch.equal(w_in, torch.tensor([[0.4, 1.0], [0.0, 0.5]]))
    assert torch.equal(w_out, torch.tensor([[0.6, 0.0], [1.0, 0.5]]))
    theta_t = torch.ones(2, 2)
    delta_in = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    delta_out = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    # both: 1 + 0.4·2 + 0.6·10 = 7.8; inner only: 1 + 4 = 5; outer only: 1 + 30 = 31; neither: 1 + 0.5·8 + 0.5·40 = 25
    assert torch.allclose(fused(theta_t, delta_in, delta_out, w_in, w_out), torch.tensor([[7.8, 5.0], [31.0, 25.0]]))


def test_masks_keep_the_top_fifth_of_all_elements_under_one_threshold():
    big = torch.arange(100.0, 120.0).reshape(4, 5)           # 20 elements, 100 … 119
    small = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])           # 5 elements, all below every big one
    masks = top_fraction_masks({"big": big, "small": small})  # ⌈0.2 · 25⌉ = 5 kept, all of them big's
    assert masks["big"].shape == (4, 5) and masks["big"].dtype == torch.bool
    assert torch.equal(masks["big"], big >= 115) and not masks["small"].any()  # a per-tensor 20 % would keep 0.5
    masks = top_fraction_masks({"a": torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])})
    assert masks["a"].tolist() == [False] * 4 + [True] and masks["b"].tolist() == [False] * 4 + [True]  # 9 and 5
    assert not top_fraction_masks({"a": torch.zeros(10)})["a"].any(), "a zero score is no evidence of importance"


def test_one_cycle_fuses_inner_and_outer_updates_element_by_element():
    """Five weights, top 40 % (two elements per loop). The inner step moves θ_t = 1 to θ_k with
    gradients that make elements 0 and 1 the inner loop's important ones; the outer loss pulls
    only elements 1 (up) and 2 (down), so they are the outer loop's. One AdamW step moves each of
    them by lr = 0.1 against its gradient's sign (its first step is lr·g/|g|)."""
    weight = torch.nn.Parameter(torch.ones(5))
    theta_k = torch.tensor([2.0, 3.0, 1.5, 1.25, 1.0])
    target = theta_k + torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0])
    callback = RecurrentFusionCallback({"w": weight}, iter(lambda: {}, None), lambda batch: ((weight - target) ** 2).sum(),
                                       every=4, outer_steps=1, lr=0.1, beta1=0.85, beta2=0.85, top=0.4)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    with torch.no_grad():
        weight.copy_(theta_k)
    weight.grad = torch.tensor([5.0, 5.0, 0.01, 0.01, 0.01])  # |θ·g| = 10, 15, 0.015, 0.0125, 0.01
    callback.on_optimizer_step(None, None, None)
    weight.grad = None
    callback.on_step_end(None, SimpleNamespace(global_step=3), None)
    assert torch.equal(weight.detach(), theta_k), "no cycle before the 4th step"
    callback.on_step_end(None, SimpleNamespace(global_step=4), None)
    # Δ_in = θ_k − 1 = [1, 2, 0.5, 0.25, 0]; Δ_out = [0, +0.1, −0.1, 0, 0]
    # 0 inner only: 1 + 1 = 2;  1 both: 1 + 0.4·2 + 0.6·0.1 = 1.86;  2 outer only: 1 − 0.1 = 0.9
    # 3 neither: 1 + 0.5·0.25 = 1.125;  4 neither: 1
    assert torch.allclose(weight.detach(), torch.tensor([2.0, 1.86, 0.9, 1.125, 1.0]), atol=1e-6)
    assert weight.grad is None and callback.fusions == 1
    assert callback.inner.steps == 0 and not callback.inner.ipt["w"].any(), "the inner scores start afresh"
    assert callback.outer.steps == 1 and callback.outer.ipt["w"][1] > 0, "the outer scores are kept"
    assert torch.equal(callback.theta_t["w"], weight.detach()), "the next cycle starts from the fused weights"


@pytest.fixture
def two_task_line(cli, tmp_path, llama_dir):
    """Line `main` holding a parity task (1 step); returns the data file of a second task (16 records)."""
    parity = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 16))
    cli("base", "add", "llama", llama_dir)
    cli("learn", "parity", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "1")
    return write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 16, seed=1))


def test_recurrent_training_through_the_cli(cli, two_task_line):
    vowel = two_task_line
    cli("train", "t2", "--data", vowel, "--line", "main", "--max-steps", "8", "--replay", "0.2", "--recurrent", "4", "--gram")
    shown = cli.json("show", "t2")
    config, metrics = shown["training_config"], shown["metrics"]
    assert config["recurrent"] == 4 and config["outer_steps"] == 4 and config["replay"]["examples"] == 4  # 16 · 0.2 / 0.8
    assert metrics["recurrent"] == {"every": 4, "outer_steps": 4, "top": 0.2, "fusions": 2, "buffer": 4,
                                    "skipped_non_finite": 0}
    assert metrics["examples"]["train"] == 16, "the replayed examples are the outer buffer, not training examples"
    assert metrics["importance"]["steps"] == 8, "the task's profile is fed by the 8 training steps only"
    assert shown["profile"]["scores"]
    # the same inner trajectory (same data, seed and order) without the outer loop and the fusions
    cli("train", "t3", "--data", vowel, "--line", "main", "--max-steps", "8", "--gram")
    plain = cli.json("show", "t3")
    assert "recurrent" not in plain["metrics"] and plain["training_config"]["recurrent"] == 0
    recurrent_weights_, plain_weights = task_weights(cli, shown["weights"]), task_weights(cli, plain["weights"])
    assert recurrent_weights_.keys() == plain_weights.keys()
    assert any(not torch.equal(recurrent_weights_[k], plain_weights[k]) for k in plain_weights)
    # the first layer's inputs do not depend on the adapter: its Gram matrices match only if the
    # replay steps' forward passes were left out of them, as they are of the importance profile
    first = [k for k in plain_weights if ".layers.0.self_attn." in k and "lora_A" in k]
    grams = [{k: v for k, v in load_file(stored(cli, run["profile"]["scores"])).items() if k.startswith("gram:")}
             for run in (shown, plain)]
    firsts = [k for k in grams[1] if ".layers.0.self_attn." in k]
    assert first and len(firsts) == 1  # q and v read the same input: one stored matrix, which v shares
    assert all(torch.allclose(grams[0][k], grams[1][k]) for k in firsts)
    result = cli("train", "t4", "--data", vowel, "--line", "main", "--max-steps", "1", "--replay", "0.01", "--recurrent", "1",
                 code=4)  # 16 · 0.01 / 0.99 rounds to 0
    assert "replays none" in result.stderr and "t4" not in [t["name"] for t in cli.json("list", "tasks")]


@pytest.mark.parametrize("extra, needle", [
    (("--recurrent", "4"), "--recurrent needs --replay"),
    (("--recurrent", "4", "--mode", "full", "--replay", "0.2"), "--mode lora only"),
    (("--recurrent", "4", "--replay", "0.2", "--resume"), "cannot be resumed"),  # its cycle state is not checkpointed
    (("--recurrent", "4", "--replay", "0.2", "--fp16"), "does not support --fp16"),
    (("--recurrent", "4", "--replay", "0.2", "--max-steps", "3"), "exceeds --max-steps 3"),
    (("--outer-steps", "2",), "--outer-steps applies to --recurrent N only"),
])
def test_recurrent_options_that_cannot_work_are_refused(cli, tmp_path, extra, needle):
    data = write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 4))
    result = cli("train", "t", "--data", data, "--line", "main", "--base", "llama", *extra, code=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
