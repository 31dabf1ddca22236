"""`kifmerge diff`: per-unit relative change against hand computations, kept / replaced /
blended counts against designed profiles, the steps and tasks in between, --json schema."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import Cli, make_full, write_profile
from test_aliases import HOT, adapter_weights, build_world
from test_fuse_export import designed_scores, unit_groups

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir) -> dict:
    """The aliases world plus v3 = t3 fused (so v1 → v3 spans two kif steps)."""
    world = build_world(tmp_path_factory.mktemp("diff"), llama_dir)
    Cli(world["registry"])("fuse", "t3", "--into", "main", "--method", "kif", "--top", world["top"])
    return world


@pytest.fixture
def cli(world) -> Cli:
    return Cli(world["registry"])  # read-only use: diff writes nothing


def hand_unit_changes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[tuple[str, int], float]:
    """‖ΔW‖/‖W_A‖ per LoRA rank unit: row r of lora_A together with column r of lora_B."""
    out = {}
    for key in a:
        if key.endswith(LORA_A):
            module = key[: -len(LORA_A)]
            a_a, a_b = a[key].double(), b[key].double()
            b_a, b_b = a[module + LORA_B].double(), b[module + LORA_B].double()
            for r in range(a_a.shape[0]):
                diff = (a_b[r] - a_a[r]).pow(2).sum() + (b_b[:, r] - b_a[:, r]).pow(2).sum()
                norm = a_a[r].pow(2).sum() + b_a[:, r].pow(2).sum()
                out[(module, r)] = math.sqrt(diff) / math.sqrt(norm)
    return out


def test_single_fuse_step_numbers_and_fates(cli, world, tmp_path):
    result = cli.json("diff", "main@v1", "main@v2", "--top", "5")
    w1, w2 = adapter_weights(cli, "main@v1", tmp_path / "v1"), adapter_weights(cli, "main@v2", tmp_path / "v2")
    expected = hand_unit_changes(w1, w2)
    units = {(u["module"], u["unit"]): u for u in result["units"]}
    assert units.keys() == expected.keys() and len(units) == 16
    for key, value in expected.items():
        assert units[key]["relative"] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # designed profiles: t1 important {0,1,2}, t2 {2,3,4} (flat unit order = sorted module names × rank)
    assert [s["version"] for s in result["steps"]] == ["v2"]
    assert result["steps"][0]["counts"] == {"kept": 2, "replaced": 2, "blended": 12}
    flat = [(group, r) for group, n in world["groups"] for r in range(n)]
    fates = {flat.index((u["module"], u["unit"])): u["fates"]["v2"] for u in result["units"]}
    assert {i for i, f in fates.items() if f == "kept"} == {0, 1}
    assert {i for i, f in fates.items() if f == "replaced"} == {3, 4}
    assert all(units[flat[i]]["relative"] == 0.0 for i in (0, 1)), "a kept unit keeps its exact values"
    assert all(units[flat[i]]["relative"] > 0.5 for i in (3, 4)), "a replaced unit takes another task's values"
    assert result["tasks"] == [{"version": "v2", "task": "t2", "method": "kif"}]

    # the top K: the K largest relative changes, largest first
    top = [u["relative"] for u in result["top"]]
    assert len(top) == 5 and top == sorted(expected.values(), reverse=True)[:5]
    assert result["summary"]["changed"] == 14 and result["summary"]["unchanged"] == 2
    total = math.sqrt(sum((w2[k].double() - w1[k].double()).pow(2).sum() for k in w1)) / \
        math.sqrt(sum(w1[k].double().pow(2).sum() for k in w1))
    assert result["summary"]["relative"] == pytest.approx(total, rel=1e-9)


def test_json_schema(cli):
    result = cli.json("diff", "main@v1", "main@v3")
    assert set(result) == {"from", "to", "same_line", "kind", "unit", "summary", "steps", "tasks", "modules", "units", "top"}
    assert (result["from"], result["to"], result["same_line"], result["kind"], result["unit"]) == \
        ("main@v1", "main@v3", True, "lora", "lora-rank")
    assert set(result["summary"]) == {"units", "modules", "changed", "unchanged", "relative", "max_relative", "mean_relative"}
    assert all(isinstance(result["summary"][k], int) for k in ("units", "modules", "changed", "unchanged"))
    assert all(isinstance(result["summary"][k], float) for k in ("relative", "max_relative", "mean_relative"))
    for step in result["steps"]:
        assert set(step) == {"version", "number", "parent", "task", "method", "params", "counts"}
        assert isinstance(step["number"], int) and isinstance(step["params"], dict)
    for unit in result["units"] + result["top"]:
        assert set(unit) == {"module", "unit", "id", "relative", "diff_norm", "norm", "fates"}
        assert isinstance(unit["unit"], int) and isinstance(unit["relative"], float) and isinstance(unit["fates"], dict)
    for module in result["modules"]:
        assert set(module) == {"module", "units", "relative", "changed", "counts"}
        assert set(module["counts"]) == {"v2", "v3"}
    assert len(result["top"]) == 10 and len(result["units"]) == 16 and len(result["modules"]) == 4


def test_several_steps_report_counts_per_step(cli, world):
    result = cli.json("diff", "main@v1", "main@v3")
    assert [(s["version"], s["task"], s["method"]) for s in result["steps"]] == [("v2", "t2", "kif"), ("v3", "t3", "kif")]
    # v3: the line's accumulated profile is important at {0,1,2} (t1's units, 0.7 weight); t3 at {5,6,7}
    assert [s["counts"] for s in result["steps"]] == [{"kept": 2, "replaced": 2, "blended": 12},
                                                       {"kept": 3, "replaced": 3, "blended": 10}]
    assert [t["task"] for t in result["tasks"]] == ["t2", "t3"]
    assert all(set(u["fates"]) == {"v2", "v3"} for u in result["units"])
    backwards = cli.json("diff", "main@v3", "main@v1", "--top", "0")
    assert backwards["steps"] == result["steps"] and backwards["top"] == []
    same = cli.json("diff", "main@v2", "main@v2")
    assert same["steps"] == [] and same["summary"]["changed"] == 0 and same["summary"]["relative"] == 0.0


def test_human_output_has_summary_steps_and_top_units(cli):
    out = cli("diff", "main@v1", "main", "--top", "3").stdout
    assert "main@v1" in out and "main@v3" in out and "fuses in between" in out and "top 3 changed units" in out
    assert "kept" in out and "replaced" in out and "blended" in out


def test_rollback_step_has_no_unit_fates(world, tmp_path):
    import shutil

    shutil.copytree(world["registry"], tmp_path / "registry")
    cli = Cli(tmp_path / "registry")
    cli("rollback", "main", "--to", "v1")
    result = cli.json("diff", "main@v1", "main@v4")
    assert result["steps"][-1] | {"params": None} == {"version": "v4", "number": 4, "parent": "v3", "task": None,
                                                       "method": "rollback", "params": None, "counts": None}
    assert result["summary"]["changed"] == 0  # v4 holds v1's weights
    assert "(to v1)" in cli("diff", "main@v3", "main@v4").stdout


def test_full_line_tensor_units(cli, tmp_path, llama_dir):
    """Full fine-tuning: one unit per tensor; fates from designed tensor profiles."""
    full = Cli(tmp_path / "registry")
    full("init")
    full("base", "add", "llama", llama_dir)
    f1, f2 = make_full(llama_dir, tmp_path / "f1", 1), make_full(llama_dir, tmp_path / "f2", 2)
    groups = unit_groups(f1, "full")
    for task, folder, hot in (("f1", f1, HOT["t1"]), ("f2", f2, HOT["t2"])):
        profile = write_profile(tmp_path / f"{task}.safetensors", designed_scores(groups, hot, 2.0)[0], "tensor")
        full("add-task", task, folder, "--base", "llama", "--profile", profile)
    top = str(3 / len(groups))
    full("fuse", "f1", "--into", "line")
    full("fuse", "f2", "--into", "line", "--method", "kif", "--top", top)
    result = full.json("diff", "line@v1", "line@v2")
    assert result["unit"] == "tensor" and result["summary"]["units"] == len(groups)
    assert result["steps"][0]["counts"] == {"kept": 2, "replaced": 2, "blended": len(groups) - 4}
    w1, w2 = load_file(f1 / "model.safetensors"), load_file(f2 / "model.safetensors")
    for index, (name, _) in enumerate(groups):
        unit = next(u for u in result["units"] if u["module"] == name)
        fate = unit["fates"]["v2"]
        assert fate == ("kept" if index in (0, 1) else "replaced" if index in (3, 4) else "blended"), name
        if fate == "kept":
            assert unit["relative"] == 0.0
        if fate == "replaced":
            hand = (w2[name].double() - w1[name].double()).norm() / w1[name].double().norm()
            assert unit["relative"] == pytest.approx(hand.item(), rel=1e-9), name


def test_unit_norms_by_hand_on_tiny_tensors(tmp_path, monkeypatch):
    """Two rank units of one LoRA module and one 1-D tensor unit, numbers worked out by hand;
    a tiny block size makes the large-tensor path read row blocks."""
    from kifmerge import diff
    from kifmerge.units import TensorSlot, UnitLayout

    monkeypatch.setattr(diff, "BLOCK_BYTES", 8 * 3)  # one row of A per block
    a = {"m.lora_A.weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),
         "m.lora_B.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "bias": torch.tensor([3.0, 4.0])}
    b = {"m.lora_A.weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 2.0]]),
         "m.lora_B.weight": torch.tensor([[0.0, 1.0], [0.0, 1.0]]), "bias": torch.tensor([3.0, 4.0]) * 2}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    layout = UnitLayout("mixed", {"bias": 1, "m": 2},
                        {"bias": TensorSlot("bias", None), "m.lora_A.weight": TensorSlot("m", 0), "m.lora_B.weight": TensorSlot("m", 1)})
    files = {"w": tmp_path / "a.safetensors"}, {"w": tmp_path / "b.safetensors"}
    weight_map = {name: "w" for name in a}
    diff_sq, base_sq = diff.unit_norms(files[0], weight_map, files[1], weight_map, layout)
    # bias: Δ = (3, 4) → 25; ‖a‖² = 25.  unit 0 of m: nothing changed; ‖A0‖² + ‖B[:,0]‖² = 1 + 0.
    # unit 1 of m: ΔA1 = (0, 0, 2), ΔB[:,1] = (0, 1) → 4 + 1 = 5; ‖A1‖² + ‖B[:,1]‖² = 4 + 1 = 5.
    assert diff_sq.tolist() == [25.0, 0.0, 5.0] and base_sq.tolist() == [25.0, 1.0, 5.0]
