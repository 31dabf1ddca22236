"""End to end through the CLI: register, fuse two tasks, export, and compare every unit with
the KIF rules computed by hand, for LoRA rank units and full-FT tensor units, on a tiny
Llama-style causal LM and a tiny T5."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import LORA_TARGETS, T5_TARGETS, make_full, make_lora, model_class, write_profile

OLD_HOT, NEW_HOT = {0, 1, 2}, {2, 3, 4}  # unit 2 in both, 0-1 old only, 3-4 new only, rest neither
LORA_SUFFIX = ".lora_A.weight"


def unit_groups(checkpoint: Path, kind: str) -> list[tuple[str, int]]:
    """(group, units) in the profile format's terms, sorted by group name."""
    file = checkpoint / ("adapter_model.safetensors" if kind == "lora" else "model.safetensors")
    with safe_open(file, "pt") as handle:
        if kind == "lora":
            return sorted((k[: -len(LORA_SUFFIX)], handle.get_slice(k).get_shape()[0]) for k in handle.keys() if k.endswith(LORA_SUFFIX))
        return sorted((k, 1) for k in handle.keys())


def designed_scores(groups: list[tuple[str, int]], hot: set[int], scale: float) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Raw scores where exactly the `hot` flat units stand out; also the flat vector."""
    flat = [(1.0 + 0.1 * i) if i in hot else 0.4 * ((i * 7) % 11) / 11 for i in range(sum(n for _, n in groups))]
    scores, start = {}, 0
    for name, count in groups:
        scores[name] = [scale * v for v in flat[start:start + count]]
        start += count
    return scores, torch.tensor(flat) * scale


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def expected_static(index: int) -> tuple[float, float]:
    old, new = index in OLD_HOT, index in NEW_HOT
    return {(True, True): (0.3, 0.7), (True, False): (0.0, 1.0), (False, True): (1.0, 0.0), (False, False): (0.5, 0.5)}[(old, new)]


def unit_slices(groups: list[tuple[str, int]], kind: str, key: str) -> tuple[int, int, int | None]:
    """(first flat unit, unit count, unit axis) of a weight key."""
    start = 0
    for name, count in groups:
        if kind == "lora" and key.startswith(name + ".lora_"):
            return start, count, 0 if key.endswith(LORA_SUFFIX) else 1
        if kind == "full" and key == name:
            return start, 1, None
        start += count
    raise KeyError(key)


def hand_fused(old: dict, new: dict, groups, kind: str, coefficients) -> dict[str, torch.Tensor]:
    out = {}
    for key, w_new in new.items():
        start, count, axis = unit_slices(groups, kind, key)
        fused = torch.empty_like(w_new)
        for unit in range(count):
            c_new, c_old = coefficients(start + unit)
            if axis is None:
                fused = c_new * w_new + c_old * old[key]
            elif axis == 0:
                fused[unit] = c_new * w_new[unit] + c_old * old[key][unit]
            else:
                fused[:, unit] = c_new * w_new[:, unit] + c_old * old[key][:, unit]
        out[key] = fused
    return out


def weights_of(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    return load_file(folder / ("adapter_model.safetensors" if kind == "lora" else "model.safetensors"))


def apply_lora_by_hand(base_dir: Path, adapter: dict[str, torch.Tensor], scaling: float):
    model = model_class(base_dir).from_pretrained(base_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in adapter.items():
            if key.endswith(LORA_SUFFIX):
                module = key[len("base_model.model."): -len(LORA_SUFFIX)]
                b = adapter[key.replace("lora_A", "lora_B")]
                params[module + ".weight"] += scaling * (b @ a)
    return model.eval()


def logits(model, seq2seq: bool) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 2, 41, 9, 60, 11]])
    with torch.no_grad():
        if seq2seq:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


CASES = [("llama", "lora"), ("llama", "full"), ("t5", "lora"), ("t5", "full")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_fuse_two_tasks_follows_kif_rules_and_exports_loadable(cli, tmp_path, request, arch, kind):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    targets = LORA_TARGETS if arch == "llama" else T5_TARGETS
    make = (lambda out, seed: make_lora(base_dir, out, seed, targets)) if kind == "lora" else \
        (lambda out, seed: make_full(base_dir, out, seed))
    task1, task2 = make(tmp_path / "task1", 1), make(tmp_path / "task2", 2)
    groups = unit_groups(task1, kind)
    n_units = sum(n for _, n in groups)
    scores1, p1 = designed_scores(groups, OLD_HOT, scale=3.0)
    scores2, p2 = designed_scores(groups, NEW_HOT, scale=7.0)
    unit = "lora-rank" if kind == "lora" else "tensor"
    write_profile(tmp_path / "p1.safetensors", scores1, unit)
    write_profile(tmp_path / "p2.safetensors", scores2, unit)
    top = str(3 / n_units)  # exactly the three designed units stand out in each profile

    cli("base", "add", arch, base_dir)
    cli("add-task", "t1", task1, "--base", arch, "--profile", tmp_path / "p1.safetensors")
    cli("add-task", "t2", task2, "--base", arch, "--profile", tmp_path / "p2.safetensors", "--line", "main")

    v1 = cli.json("fuse", "t1", "--into", "main", "--method", "kif", "--top", top)
    assert (v1["version"], v1["method"], v1["parent"]) == ("main@v1", "initial", None)
    cli("export", "main@v1", tmp_path / "v1")
    w1, w_task1, w_task2 = weights_of(tmp_path / "v1", kind), weights_of(task1, kind), weights_of(task2, kind)
    assert w1.keys() == w_task1.keys() and all(torch.equal(w1[k], w_task1[k]) for k in w1)

    v2 = cli.json("fuse", "t2", "--into", "main", "--method", "kif", "--top", top)
    assert (v2["version"], v2["method"], v2["parent"]) == ("main@v2", "kif", "v1")
    cli("export", "main", tmp_path / "v2")
    w2 = weights_of(tmp_path / "v2", kind)
    expected = hand_fused(w1, w_task2, groups, kind, expected_static)
    assert w2.keys() == expected.keys()
    for key in w2:
        torch.testing.assert_close(w2[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    cases = {expected_static(i) for i in range(n_units)}
    assert len(cases) == 4, "the designed profiles must exercise all four static cases"

    acc = load_file(tmp_path / "v2" / "kifmerge-profile.safetensors")
    flat = torch.cat([acc[name] for name, _ in groups])
    torch.testing.assert_close(flat, normalise(0.3 * normalise(p2) + 0.7 * normalise(p1)))

    # kif-adaptive on a second line: softmax over the two normalised scores at tau
    tau = 0.4
    cli("fuse", "t1", "--into", "adaptive")
    assert cli.json("fuse", "t2", "--into", "adaptive", "--method", "kif-adaptive", "--tau", str(tau))["method"] == "kif-adaptive"
    cli("export", "adaptive", tmp_path / "adaptive")
    q1, q2 = normalise(p1), normalise(p2)

    def softmax_rule(i: int) -> tuple[float, float]:
        e_new, e_old = math.exp(q2[i].item() / tau), math.exp(q1[i].item() / tau)
        return e_new / (e_new + e_old), e_old / (e_new + e_old)

    adaptive = weights_of(tmp_path / "adaptive", kind)
    for key, value in hand_fused(w1, w_task2, groups, kind, softmax_rule).items():
        torch.testing.assert_close(adaptive[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # the export loads with peft / transformers and computes what the fused weights say
    seq2seq = arch == "t5"
    if kind == "lora":
        from peft import PeftModel

        config = json.loads((tmp_path / "v2" / "adapter_config.json").read_text())
        by_hand = logits(apply_lora_by_hand(base_dir, w2, config["lora_alpha"] / config["r"]), seq2seq)
        base_model = model_class(base_dir).from_pretrained(base_dir)
        torch.testing.assert_close(logits(PeftModel.from_pretrained(base_model, tmp_path / "v2").eval(), seq2seq), by_hand, rtol=1e-4, atol=1e-5)
        cli("export", "main@v2", tmp_path / "v2-merged", "--merged")
        merged = model_class(base_dir).from_pretrained(tmp_path / "v2-merged").eval()
        torch.testing.assert_close(logits(merged, seq2seq), by_hand, rtol=1e-4, atol=1e-5)
    else:
        by_hand_model = model_class(base_dir).from_pretrained(base_dir)
        by_hand_model.load_state_dict(w2, strict=False)
        exported = model_class(base_dir).from_pretrained(tmp_path / "v2").eval()
        torch.testing.assert_close(logits(exported, seq2seq), logits(by_hand_model.eval(), seq2seq))

    card = (tmp_path / "v2" / "README.md").read_text()
    assert "t1, t2" in card and "kif" in card and "library_name:" in card and "base_model:" not in card  # local base: no hub id
    history = cli.json("history", "main")
    assert [h["task"] for h in history] == ["t1", "t2"]


def test_sharded_output_for_large_full_models(cli, tmp_path, llama_dir):
    """A fuse whose output exceeds --shard-size writes hub-style shards plus an index, in --dtype."""
    task1, task2 = make_full(llama_dir, tmp_path / "f1", 1), make_full(llama_dir, tmp_path / "f2", 2)
    groups = unit_groups(task1, "full")
    for i in range(2):
        write_profile(tmp_path / f"p{i}.safetensors", designed_scores(groups, {i}, 1.0)[0], "tensor")
    cli("base", "add", "llama", llama_dir)
    cli("add-task", "f1", task1, "--base", "llama", "--profile", tmp_path / "p0.safetensors")
    cli("add-task", "f2", task2, "--base", "llama", "--profile", tmp_path / "p1.safetensors")
    cli("fuse", "f1", "--into", "line")
    assert cli.json("fuse", "f2", "--into", "line", "--shard-size", "20KB", "--dtype", "bfloat16")["params"]["dtype"] == "bfloat16"
    out = tmp_path / "sharded"
    cli("export", "line", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).stat().st_size <= 20_000 + 16_000 for s in shards), "a shard only exceeds the size by one tensor"
    with safe_open(out / shards[0], "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    model = model_class(llama_dir).from_pretrained(out, dtype="auto")
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.bfloat16
    assert "--shard-size" in cli("fuse", "f2", "--into", "line", "--shard-size", "big", code=2).stderr


def test_copied_base_survives_its_folder(cli, tmp_path, llama_dir):
    """`base add --copy` keeps the base's files in the registry: export --merged still works
    after the original folder is gone, while a referenced-only base says what is wrong."""
    folder = tmp_path / "movable"
    shutil.copytree(llama_dir, folder)
    cli("base", "add", "kept", folder, "--copy")
    adapter = make_lora(folder, tmp_path / "a", 1, LORA_TARGETS)
    groups = unit_groups(adapter, "lora")
    profile = write_profile(tmp_path / "p.safetensors", designed_scores(groups, {0}, 1.0)[0], "lora-rank")
    cli("add-task", "t", adapter, "--base", "kept", "--profile", profile)
    cli("fuse", "t", "--into", "line")
    shutil.rmtree(folder)
    cli("export", "line", tmp_path / "merged", "--merged")
    assert model_class(llama_dir).from_pretrained(tmp_path / "merged").config.model_type == "llama"

    moved = tmp_path / "elsewhere"
    shutil.copytree(llama_dir, moved)
    cli("base", "add", "fragile", moved)
    cli("add-task", "t2", adapter, "--base", "fragile", "--profile", profile)
    cli("fuse", "t2", "--into", "fragile-line")
    shutil.rmtree(moved)
    result = cli("export", "fragile-line", tmp_path / "x", "--merged", code=5)
    assert "missing or changed" in result.stderr and "--copy" in result.stderr


def test_sharded_inputs_round_trip_to_a_three_shard_model(cli, tmp_path, llama_dir):
    """Base and tasks saved as several shards each (index + files) are registered, fused block
    by block into exactly three output shards, and the export loads with `from_pretrained`
    holding, tensor by tensor, the rule applied by hand to the unsharded weights."""
    from huggingface_hub import split_torch_state_dict_into_shards

    base_model = model_class(llama_dir).from_pretrained(llama_dir)
    base_model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir / name).exists():
            shutil.copy(llama_dir / name, tmp_path / "base" / name)
    tasks = {}
    for seed in (1, 2):
        model = model_class(llama_dir).from_pretrained(llama_dir)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(tmp_path / f"s{seed}", max_shard_size="40KB")
        tasks[seed] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert len(list((tmp_path / f"s{seed}").glob("model-*.safetensors"))) >= 3, "the inputs are sharded"
    groups = sorted((k, 1) for k in json.loads((tmp_path / "s1" / "model.safetensors.index.json").read_text())["weight_map"])
    scores_old, _ = designed_scores(groups, {0, 1}, 1.0)
    scores_new, _ = designed_scores(groups, {1, 2}, 1.0)
    write_profile(tmp_path / "p1.safetensors", scores_old, "tensor")
    write_profile(tmp_path / "p2.safetensors", scores_new, "tensor")
    cli("base", "add", "sharded", tmp_path / "base")
    cli("add-task", "s1", tmp_path / "s1", "--base", "sharded", "--profile", tmp_path / "p1.safetensors")
    cli("add-task", "s2", tmp_path / "s2", "--base", "sharded", "--profile", tmp_path / "p2.safetensors")
    cli("fuse", "s1", "--into", "sh")
    total = sum(v.numel() * v.element_size() for v in tasks[2].values())
    size_kb = next(kb for kb in range(total // 4000, total // 1000)
                   if len(split_torch_state_dict_into_shards(tasks[2], max_shard_size=kb * 1000).filename_to_tensors) == 3)
    cli("fuse", "s2", "--into", "sh", "--method", "kif", "--shard-size", f"{size_kb}KB")
    out = tmp_path / "export"
    cli("export", "sh", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    fused = model_class(llama_dir).from_pretrained(out).state_dict()
    from kifmerge.fusion.rules import blend, kif_static

    names = [g for g, _ in groups]
    c_new, c_old = kif_static(normalise(torch.tensor([scores_old[n][0] for n in names])),
                              normalise(torch.tensor([scores_new[n][0] for n in names])))
    for i, name in enumerate(names):
        expected = blend(tasks[1][name], tasks[2][name], c_new[i:i + 1], c_old[i:i + 1], None)
        assert torch.equal(fused[name], expected), name
