"""Element-level importance (kif-element): the scores `kifmerge train` stores with a LoRA
task's profile, their accumulation in a line, and the importance-weighted interpolation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import task_records, write_jsonl


def test_element_weights_on_hand_computed_scores():
    from kifmerge.fusion.rules import element_weights

    line = torch.tensor([1.0, 0.0, 3.0, 0.0])
    new = torch.tensor([1.0, 4.0, 1.0, 0.0])
    # p = 1: 1/(1+1), 4/(4+0), 1/(1+3), neither scored → 0.5
    torch.testing.assert_close(element_weights(line, new, power=1.0), torch.tensor([0.5, 1.0, 0.25, 0.5]))
    # p = 0.5: √1/(√1+√1), 2/(2+0), 1/(1+√3) = 0.3660, 0.5
    torch.testing.assert_close(element_weights(line, new, power=0.5), torch.tensor([0.5, 1.0, 0.366025, 0.5]))
    # p = 0: a plain average wherever anything was scored
    torch.testing.assert_close(element_weights(line, new, power=0.0), torch.full((4,), 0.5))


def test_element_scores_normalise_to_mean_one_and_accumulate_as_a_running_mean():
    from kifmerge.profiles import accumulate_elements, normalise_elements

    scores = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[6.0, 0.0]])}       # mean 2 → ÷ 2
    normalised = normalise_elements(scores)
    torch.testing.assert_close(normalised["a"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(normalised["b"], torch.tensor([[3.0, 0.0]]))
    assert normalise_elements({"a": torch.zeros(3)})["a"].tolist() == [1.0, 1.0, 1.0], "no signal: uniform"
    line = {"a": torch.tensor([1.0, 3.0])}                                           # mean 2 → [0.5, 1.5]
    new = {"a": torch.tensor([4.0, 0.0])}                                            # mean 2 → [2, 0]
    # the line held 3 tasks: (3·[0.5, 1.5] + [2, 0]) / 4
    torch.testing.assert_close(accumulate_elements(line, new, 3)["a"], torch.tensor([0.875, 1.125]))


def test_train_stores_element_scores_and_kif_element_interpolates_by_them(cli, tmp_path, llama_dir):
    """Two tasks trained with `kifmerge train`: the profile holds one float16 score per adapter
    element (mean 1), `read_profile` still reads the unit scores, and v2 by kif-element is
    `v1 + w ⊙ (task − v1)` with w from the line's and the task's scores; the version's profile
    carries the running mean of the element scores."""
    from kifmerge.fusion.rules import element_weights
    from kifmerge.profiles import ELEMENT, accumulate_elements, read_elements
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    for name, kind in (("t1", "parity"), ("t2", "vowel")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", task_records(kind, 16, seed=1))
        cli("train", name, "--data", data, "--line", "main", "--base", "llama", "--max-steps", "3", "--lr", "1e-2")
        if name == "t1":
            cli("fuse", "t1", "--into", "main")
    version = cli.json("fuse", "t2", "--into", "main", "--method", "kif-element", "--power", "1")
    assert version["params"]["power"] == 1.0 and 0 < version["params"]["elements"]["new_weight_mean"] < 1

    reg = Registry.open(cli.registry)
    task = {row["name"]: row for row in reg.catalog.rows("tasks")}
    profiles = {row["task"]: reg.blobs.open_verified(row["scores"]) for row in reg.catalog.rows("profiles")}
    v1, v2 = (reg.catalog.rows("versions", "line = ? AND number = ?", ["main", n])[0] for n in (1, 2))
    weights = {n: load_file(reg.weights(task[n]["weights"]).files["adapter_model.safetensors"]) for n in ("t1", "t2")}
    shapes = {name: tuple(t.shape) for name, t in weights["t1"].items()}
    raw = load_file(profiles["t2"])
    assert {k for k in raw if k.startswith(ELEMENT)} == {ELEMENT + name for name in shapes}
    assert all(raw[ELEMENT + name].dtype == torch.float16 for name in shapes)
    line_scores = read_elements(reg.blobs.open_verified(v1["profile"]), shapes)
    task_scores = read_elements(profiles["t2"], shapes)
    assert sum(float(t.sum()) for t in task_scores.values()) / sum(t.numel() for t in task_scores.values()) == pytest.approx(1, rel=1e-2)
    fused = load_file(reg.weights(v2["weights"]).files["adapter_model.safetensors"])
    for name, old in weights["t1"].items():
        w = element_weights(line_scores[name], task_scores[name], power=1.0)
        torch.testing.assert_close(fused[name], old + w * (weights["t2"][name] - old), msg=name)
    accumulated = read_elements(reg.blobs.open_verified(v2["profile"]), shapes)
    expected = accumulate_elements(line_scores, task_scores, 1)
    for name in shapes:  # stored in float16, renormalised to mean 1
        torch.testing.assert_close(accumulated[name], expected[name], atol=2e-3, rtol=2e-3)


def test_kif_element_without_element_scores_is_a_plain_average_and_says_so(cli, tmp_path, llama_dir):
    """A task registered with a unit-only profile fused by kif-element: every element
    weighted ½ — the same weights as `--method linear` — with one warning line on stderr, and the
    version records why. The reference version is fused by linear into a second line."""
    from test_validated_fuse import line_of_two_outside_tasks

    line_of_two_outside_tasks(cli, tmp_path, llama_dir)
    fused = cli("fuse", "l2", "--into", "main", "--method", "kif-element", "--json")
    assert fused.stderr.count("kifmerge: warning: kif-element: task 'l2'") == 1, fused.stderr
    version = cli.json("show", "main@v2")
    assert version["method"] == "kif-element" and "no element scores" in version["params"]["elements"]["fallback"]
    cli("fuse", "l1", "--into", "plain")
    cli("fuse", "l2", "--into", "plain", "--method", "linear", "--alpha", "0.5")
    from kifmerge.registry import Registry

    reg = Registry.open(cli.registry)
    ours, plain = (load_file(reg.weights(reg.catalog.version(line, 2)["weights"]).files["adapter_model.safetensors"])
                   for line in ("main", "plain"))
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_a_calibrated_task_has_element_scores_and_fuses_by_kif_element(cli, tmp_path, llama_dir):
    """`add-task --calibrate` records element scores as training does, so a checkpoint trained
    elsewhere can be fused by kif-element into a line trained here."""
    from conftest import LORA_TARGETS, make_lora

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 16, seed=1))
    cli("train", "here", "--data", data, "--line", "main", "--base", "llama", "--max-steps", "2", "--lora-r", "4")
    cli("fuse", "here", "--into", "main")
    outside = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    cli("add-task", "outside", outside, "--base", "llama", "--calibrate", data, "--calibrate-batches", "2")
    version = cli.json("fuse", "outside", "--into", "main", "--method", "kif-element")
    assert version["params"]["elements"]["elements"] > 0


def test_a_task_without_element_scores_does_not_erase_the_lines(cli, tmp_path, llama_dir):
    """A line trained here (element scores), then an outside task with a unit profile only: that
    fuse is a plain average, and the line keeps its element scores for the next fuse."""
    from conftest import LORA_TARGETS, make_lora, write_profile
    from test_fuse_export import designed_scores, unit_groups

    from kifmerge.profiles import read_elements
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 16, seed=1))
    cli("train", "here", "--data", data, "--line", "main", "--base", "llama", "--max-steps", "2", "--lora-r", "4")
    cli("fuse", "here", "--into", "main")
    outside = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    profile = write_profile(tmp_path / "p.safetensors", designed_scores(unit_groups(outside, "lora"), {0}, 1.0)[0], "lora-rank")
    cli("add-task", "outside", outside, "--base", "llama", "--profile", profile)
    assert "fallback" in cli.json("fuse", "outside", "--into", "main", "--method", "kif-element")["params"]["elements"]
    reg = Registry.open(cli.registry)
    shapes = {name: tuple(t.shape) for name, t in load_file(reg.weights(reg.catalog.version("main", 1)["weights"])
                                                            .files["adapter_model.safetensors"]).items()}
    v1, v2 = (read_elements(reg.blobs.open_verified(reg.catalog.version("main", n)["profile"]), shapes) for n in (1, 2))
    assert v2 is not None and all(torch.equal(v1[name], v2[name]) for name in v1), "carried over as they were"


def test_learn_refuses_an_ambiguous_seed_and_plans_take_the_clis_merge_seed(cli, tmp_path):
    from kifmerge import api
    from kifmerge.errors import UsageError

    with pytest.raises(UsageError, match="merge_seed"):
        api.learn("t", tmp_path / "d.jsonl", "main", seed=3, registry=cli.registry)
    from kifmerge.options import FuseParams
    from kifmerge.services.planning import _fuse_kwargs
    from kifmerge.plans import FuseStep, Plan

    plan = Plan.model_validate({"line": "main", "fuse": {"merge_seed": 5}, "steps": [{"fuse": {"task": "t"}}]})
    step = plan.steps[0].body
    assert isinstance(step, FuseStep) and FuseParams(**_fuse_kwargs(plan, step)).seed == 5
