"""`kifmerge profile show`: most / least important units of a task's profile and of a line's
accumulated profile, the layer × module grid, and the heatmap."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import LORA_TARGETS, make_full, make_lora, write_profile
from kifmerge.services.profiling import layer_module_grid, split_layer


def lora_groups(r: int = 4) -> list[str]:
    return sorted(f"base_model.model.model.layers.{layer}.self_attn.{m}" for layer in range(2) for m in LORA_TARGETS)


@pytest.fixture
def lora_line(cli, tmp_path, llama_dir):
    """Task `t1` whose unit layers.1.v_proj[2] scores highest and layers.0.q_proj[0] lowest,
    fused into `main` (v1), then `t2` (v2)."""
    groups = lora_groups()
    scores = {g: [0.1 + 0.01 * i + 0.1 * j for i in range(4)] for j, g in enumerate(groups)}
    scores[groups[0]][0] = 0.0
    scores["base_model.model.model.layers.1.self_attn.v_proj"][2] = 9.0
    cli("base", "add", "llama", llama_dir)
    for task, seed in (("t1", 1), ("t2", 2)):
        adapter = make_lora(llama_dir, tmp_path / task, seed, LORA_TARGETS)
        write_profile(tmp_path / f"{task}.safetensors", scores if task == "t1" else {g: [1.0, 2.0, 3.0, 4.0] for g in groups},
                      "lora-rank")
        cli("add-task", task, adapter, "--base", "llama", "--profile", tmp_path / f"{task}.safetensors")
        cli("fuse", task, "--into", "main")
    return cli


def test_task_profile_top_and_bottom(lora_line):
    shown = lora_line.json("profile", "show", "t1", "--top", "3")
    assert shown["type"] == "task" and shown["unit"] == "lora-rank" and shown["units"] == 16 and shown["groups"] == 4
    assert shown["top"][0]["unit"] == "base_model.model.model.layers.1.self_attn.v_proj[2]"
    assert shown["top"][0]["score"] == 1.0 and shown["top"][0]["raw"] == 9.0
    assert shown["bottom"][0]["unit"] == "base_model.model.model.layers.0.self_attn.q_proj[0]"
    assert shown["bottom"][0]["score"] == 0.0 and len(shown["top"]) == len(shown["bottom"]) == 3
    assert [r["score"] for r in shown["top"]] == sorted((r["score"] for r in shown["top"]), reverse=True)
    grid = shown["grid"]
    assert grid["rows"] == ["0", "1"] and grid["columns"] == ["self_attn.q_proj", "self_attn.v_proj"]
    cell = grid["values"][1][1]  # layer 1, v_proj: mean of its 4 normalised rank units
    assert cell == pytest.approx(sum((0.1 + 0.01 * i + 0.3) / 9.0 for i in (0, 1, 3)) / 4 + 0.25)
    text = lora_line("profile", "show", "t1", "--top", "2").stdout
    assert "most important" in text and "layers.1.self_attn.v_proj[2]" in text


def test_line_profile_by_version_alias_and_bare_line(lora_line):
    """`LINE@vN` is a version; a bare name that is no task is the line's newest version."""
    v1 = lora_line.json("profile", "show", "main@v1", "--top", "1")
    assert v1["type"] == "version" and v1["version"] == "main@v1" and v1["task"] == "t1"
    assert v1["top"][0]["unit"].endswith("layers.1.self_attn.v_proj[2]")  # v1 is t1 as it is
    head = lora_line.json("profile", "show", "main", "--top", "1")
    assert head["version"] == "main@v2"
    assert lora_line.json("profile", "show", "main", "--line", "--top", "1")["version"] == "main@v2"
    lora_line("alias", "set", "main@v1", "champion")
    assert lora_line.json("profile", "show", "main@champion", "--top", "1")["version"] == "main@v1"


def test_full_profile_heatmap_and_errors(cli, tmp_path, llama_dir):
    from safetensors import safe_open

    checkpoint = make_full(llama_dir, tmp_path / "full", 1)
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        names = sorted(handle.keys())
    write_profile(tmp_path / "full.safetensors", {n: [float(i)] for i, n in enumerate(names)}, "tensor")
    cli("base", "add", "llama", llama_dir)
    cli("add-task", "f", checkpoint, "--base", "llama", "--profile", tmp_path / "full.safetensors")
    out = tmp_path / "heat.png"
    shown = cli.json("profile", "show", "f", "--png", out)
    assert shown["unit"] == "tensor" and shown["top"][0]["unit"] == names[-1] and shown["bottom"][0]["unit"] == names[0]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["png"] == str(out)
    grid = shown["grid"]
    assert grid["rows"] == ["0", "1", "other"]
    assert "self_attn.q_proj.weight" in grid["columns"] and "lm_head.weight" in grid["columns"]
    other = grid["values"][2]
    assert other[grid["columns"].index("lm_head.weight")] is not None and other[grid["columns"].index("self_attn.q_proj.weight")] is None
    missing = cli("profile", "show", "nothing", code=3).stderr
    assert "no task or line named 'nothing'" in missing and missing.count("\n") == 1
    assert "--top" in cli("profile", "show", "f", "--top", "0", code=2).stderr


def test_split_layer_names():
    assert split_layer("base_model.model.model.layers.11.mlp.down_proj") == ("11", "mlp.down_proj")
    assert split_layer("encoder.block.1.layer.0.SelfAttention.q.weight") == ("encoder.1", "layer.0.SelfAttention.q.weight")
    assert split_layer("transformer.h.3.attn.c_attn.weight") == ("3", "attn.c_attn.weight")
    assert split_layer("model.embed_tokens.weight") == ("other", "model.embed_tokens.weight")
    import numpy as np

    grid = layer_module_grid({"decoder.block.0.x": np.array([1.0]), "encoder.block.10.x": np.array([0.5, 0.0]),
                              "encoder.block.2.x": np.array([0.2]), "shared.weight": np.array([0.3])})
    assert grid["rows"] == ["decoder.0", "encoder.2", "encoder.10", "other"]
    assert grid["values"] == [[1.0, None], [0.2, None], [0.25, None], [None, 0.3]]


def test_a_task_added_without_a_profile_fuses_by_the_default_and_keeps_the_line_profile(cli, tmp_path, llama_dir):
    """`add-task` with neither --profile nor --calibrate (a checkpoint trained elsewhere, no data at
    hand): the default rule (regmean) falls back to ties, which reads no profile, so the fuse goes through. The task counts as
    all-equal scores, which leave the line's accumulated profile as it was, and the version says so."""
    cli("base", "add", "llama", llama_dir)
    first = make_lora(llama_dir, tmp_path / "a", 1, LORA_TARGETS)
    scores = {g: [float(i + 1), 0.0, 0.5, 2.0] for i, g in enumerate(lora_groups())}
    cli("add-task", "a", first, "--base", "llama", "--profile", write_profile(tmp_path / "a.safetensors", scores, "lora-rank"))
    cli("fuse", "a", "--into", "main")
    cli("add-task", "b", make_lora(llama_dir, tmp_path / "b", 2, LORA_TARGETS), "--base", "llama")

    fused = cli.json("fuse", "b", "--into", "main")
    assert fused["version"] == "main@v2"
    shown = cli.json("show", "main@v2")
    assert shown["method"] == "ties" and "task 'b' has no Gram matrices" in shown["params"]["fallback"]
    assert shown["params"]["task_profile"] == "none: the line's importance scores carried over unchanged"
    v1, v2 = (cli.json("profile", "show", f"main@v{n}", "--top", "100") for n in (1, 2))
    assert [(u["unit"], u["score"]) for u in v2["top"]] == [(u["unit"], u["score"]) for u in v1["top"]]
    # a line that begins with such a task starts from all-equal scores, and its v1 says so
    cli("fuse", "b", "--into", "other")
    assert cli.json("show", "other@v1")["params"]["task_profile"] == "none: the line starts with all-equal scores"
    # a rule that reads profiles still refuses, and names the ones that do not
    result = cli("fuse", "b", "--into", "main", "--method", "kif", "--again", code=4)
    assert "no importance profile, which --method kif reads" in result.stderr
    # a unit rule reading such a line's all-equal scores cannot tell its units apart: it says so, once
    fused = cli("fuse", "a", "--into", "other", "--method", "kif")
    assert fused.stderr.count("other@v1's unit scores are all equal") == 1, fused.stderr
    assert "cannot tell which units matter" in cli.json("show", "other@v2")["params"]["line_profile"]
    assert "all equal" not in cli("fuse", "a", "--into", "main", "--method", "kif", "--again").stderr
    cli("fuse", "b", "--into", "third")
    assert "all equal" not in cli("fuse", "a", "--into", "third", "--method", "linear").stderr, \
        "a rule that does not weigh by the scores has nothing to say"


def test_a_trained_profile_shows_its_units_not_its_element_scores_or_gram_matrices(cli, tmp_path, llama_dir):
    """`train --gram` stores element scores and Gram matrices in the same file as the unit scores;
    only the unit scores are units (2 layers × q, v × rank 4 = 16, not the 1,000s of elements)."""
    from conftest import task_records, write_jsonl

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 8))
    cli("train", "t", "--data", data, "--line", "main", "--base", "llama", "--max-steps", "1", "--lora-r", "4", "--gram")
    shown = cli.json("profile", "show", "t", "--top", "20")
    assert (shown["groups"], shown["units"]) == (4, 16)
    # what else it holds, so a user sees which rules can read it: 8 LoRA factors, 4 modules (2 stored, 2 shared)
    assert (shown["element_scores"], shown["gram_matrices"]) == (8, 4)
    assert "also holds element scores for 8 tensors (kif-element) and Gram matrices for 4 modules (regmean)" in \
        " ".join(cli("profile", "show", "t").stdout.split())  # as wrapped to the terminal's width
    assert {entry["group"] for entry in shown["top"]} <= set(lora_groups())
    assert sorted(shown["grid"]["columns"]) == ["self_attn.q_proj", "self_attn.v_proj"] and len(shown["grid"]["rows"]) == 2
