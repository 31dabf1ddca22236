"""RegMean on LoRA lines: the Gram matrices `train --gram` records with a task's profile, their
sum in a line, and the closed-form merge of the ΔW = B·A updates, re-factored to the line's rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import task_records, write_jsonl


def test_regmean_on_hand_computed_updates_and_grams():
    from kifmerge.fusion.rules import regmean

    # diagonal Grams: each input feature's column is averaged by that feature's energy
    # Σ ΔW_i G_i = [2·3, 0] + [0, 4·3] = [6, 12]; Σ G_i = diag(4, 4) → [1.5, 3]
    merged = regmean([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])],
                     [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))])
    torch.testing.assert_close(merged, torch.tensor([[1.5, 3.0]]))
    # equal Grams: the plain average
    torch.testing.assert_close(regmean([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])], [torch.eye(2)] * 2),
                               torch.tensor([[1.0, 2.0]]))
    # off-diagonals scaled by 0.5: G̃₁ = [[2, .5], [.5, 2]], G̃₂ = I; Σ ΔW G̃ = [2, .5] + [0, 1] = [2, 1.5];
    # Σ G̃ = [[3, .5], [.5, 3]], det 8.75 → [2, 1.5]·[[3, −.5], [−.5, 3]] / 8.75 = [5.25, 3.5] / 8.75
    merged = regmean([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])],
                     [torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.eye(2)], non_diagonal=0.5)
    torch.testing.assert_close(merged, torch.tensor([[0.6, 0.4]]))


def test_train_gram_and_regmean_through_the_cli(cli, tmp_path, llama_dir):
    from kifmerge.fusion.rules import lora_product, regmean
    from kifmerge.profiles import GRAM, read_grams
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    for name, kind in (("t1", "parity"), ("t2", "vowel")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", task_records(kind, 16, seed=2))
        cli("train", name, "--data", data, "--line", "main", "--base", "llama", "--max-steps", "3", "--lr", "1e-2", "--gram")
        if name == "t1":
            cli("fuse", "t1", "--into", "main")
    version = cli.json("fuse", "t2", "--into", "main", "--method", "regmean", "--non-diagonal", "0.7")
    assert version["params"]["non_diagonal"] == 0.7 and 0 <= version["params"]["refactor"]["relative_error"] < 1

    reg = Registry.open(cli.registry)
    task = {row["name"]: row for row in reg.catalog.rows("tasks")}
    profiles = {row["task"]: reg.blobs.open_verified(row["scores"]) for row in reg.catalog.rows("profiles")}
    v1, v2 = (reg.catalog.rows("versions", "line = ? AND number = ?", ["main", n])[0] for n in (1, 2))
    weights = {n: load_file(reg.weights(task[n]["weights"]).files["adapter_model.safetensors"]) for n in ("t1", "t2")}
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in weights["t1"]})
    grams = {n: read_grams(profiles[n], modules) for n in ("t1", "t2")}
    assert all(g[m].shape == (32, 32) and bool(torch.all(torch.diagonal(g[m]) > 0)) for g in grams.values() for m in modules)
    # q and v of a layer read the same input: one packed upper triangle (32·33/2 values) stored for both
    assert {k: v.shape for k, v in load_file(profiles["t2"]).items() if k.startswith(GRAM)} == {
        GRAM + m: (528,) for m in modules if m.endswith("q_proj")}
    with safe_open(str(profiles["t2"]), framework="pt") as handle:
        assert json.loads(handle.metadata()["gram-shared"]) == {m: m.replace("v_proj", "q_proj") for m in modules if m.endswith("v_proj")}
    assert all(torch.equal(g[m], g[m.replace("v_proj", "q_proj")]) for g in grams.values() for m in modules)
    fused = load_file(reg.weights(v2["weights"]).files["adapter_model.safetensors"])
    rank = weights["t1"][f"{modules[0]}.lora_A.weight"].shape[0]
    for module in modules:
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        dense = regmean([lora_product(weights[n][a], weights[n][b]) for n in ("t1", "t2")],
                        [grams["t1"][module], grams["t2"][module]], non_diagonal=0.7)
        u, s, vh = torch.linalg.svd(dense)
        torch.testing.assert_close(lora_product(fused[a], fused[b]), (u[:, :rank] * s[:rank]) @ vh[:rank],
                                   atol=1e-5, rtol=1e-4, msg=module)
    line = read_grams(reg.blobs.open_verified(v2["profile"]), modules)  # the line's: the sum over its tasks
    for module in modules:
        torch.testing.assert_close(line[module], grams["t1"][module] + grams["t2"][module])
    assert read_grams(reg.blobs.open_verified(v1["profile"]), modules) is not None


def test_regmean_needs_gram_matrices(cli, tmp_path, llama_dir):
    cli("base", "add", "llama", llama_dir)
    for name in ("t1", "t2"):
        data = write_jsonl(tmp_path / f"{name}.jsonl", task_records("parity", 8))
        cli("train", name, "--data", data, "--line", "main", "--base", "llama", "--max-steps", "1", "--no-gram")
        if name == "t1":
            cli("fuse", "t1", "--into", "main")
    refused = cli("fuse", "t2", "--into", "main", "--method", "regmean", code=4)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("kifmerge: error")]
    assert len(errors) == 1 and "without --no-gram" in errors[0]
    with pytest.raises(AssertionError):
        cli("fuse", "t2", "--into", "main", "--method", "regmean", "--non-diagonal", "2")


def test_a_checkpoint_trained_elsewhere_gets_gram_matrices_from_calibration(cli, tmp_path, llama_dir):
    """`add-task --calibrate DATA --gram` records the checkpoint's input Gram matrices on that data
    (summed over its tokens, as training sums over its steps), so RegMean fuses it into a line trained here."""
    from conftest import LORA_TARGETS, make_lora

    from kifmerge.profiles import read_grams
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    records = task_records("parity", 4, seed=3)
    twice = write_jsonl(tmp_path / "twice.jsonl", records + records)  # batches 3 and 4 repeat batches 1 and 2
    cli("train", "here", "--data", twice, "--line", "main", "--base", "llama", "--max-steps", "2", "--lora-r", "4", "--gram")
    cli("fuse", "here", "--into", "main")
    outside = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    for name, batches in (("two", "2"), ("four", "4")):
        cli("add-task", name, outside, "--base", "llama", "--calibrate", twice, "--calibrate-batches", batches,
            "--batch-size", "2", "--gram")
    reg = Registry.open(cli.registry)
    profiles = {row["task"]: reg.blobs.open_verified(row["scores"]) for row in reg.catalog.rows("profiles")}
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in load_file(outside / "adapter_model.safetensors")})
    two, four = (read_grams(profiles[n], modules) for n in ("two", "four"))
    for module in modules:  # the same inputs twice over: twice the Gram matrix
        assert bool(torch.all(torch.diagonal(two[module]) > 0))
        torch.testing.assert_close(four[module], 2 * two[module], msg=module)
    version = cli.json("fuse", "four", "--into", "main", "--method", "regmean")
    assert version["method"] == "regmean" and 0 <= version["params"]["refactor"]["relative_error"] < 1
    # calibration records them by default for a LoRA adapter (the default fuse rule reads them); --no-gram does not
    cli("add-task", "default", outside, "--base", "llama", "--calibrate", twice, "--calibrate-batches", "2", "--batch-size", "2")
    default = read_grams(Registry.open(cli.registry).blobs.open_verified(
        Registry.open(cli.registry).catalog.find("profiles", "default")["scores"]), modules)
    assert all(torch.equal(default[m], two[m]) for m in modules)
    cli("add-task", "plain", outside, "--base", "llama", "--calibrate", twice, "--calibrate-batches", "2", "--no-gram")
    refused = cli("fuse", "plain", "--into", "main", "--method", "regmean", code=4)
    assert "add-task --calibrate DATA" in refused.stderr


def test_gram_is_refused_where_it_cannot_record_anything(cli, tmp_path, llama_dir):
    from conftest import LORA_TARGETS, make_full, make_lora

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 8))
    outside = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    result = cli("add-task", "x", outside, "--base", "llama", "--gram", code=2)
    assert "--gram needs --calibrate" in result.stderr
    full = make_full(llama_dir, tmp_path / "full", 4)
    result = cli("add-task", "y", full, "--base", "llama", "--calibrate", data, "--gram", code=2)
    assert "--gram applies to LoRA adapters only" in result.stderr
    result = cli("train", "z", "--data", data, "--line", "main", "--base", "llama", "--mode", "full", "--gram", code=2)
    assert "--gram applies to --mode lora only" in result.stderr
    result = cli("train", "e", "--data", data, "--line", "main", "--base", "llama", "--target-modules", "q_proj,embed_tokens",
                 "--max-steps", "1", code=4)  # peft would save the embedding matrix: refused before training, not after
    assert "embed_tokens is an embedding layer; LoRA on embeddings is not supported" in result.stderr
    assert cli.json("list", "tasks") == []


def test_the_default_is_regmean_and_falls_back_to_ties_where_it_cannot_run(cli, tmp_path, llama_dir):
    """Tasks trained here record Gram matrices by default, so the default fuse is RegMean; a task
    without them (added from elsewhere, no --calibrate … --gram) is fused by TIES, with the reason
    warned once and recorded; asked for by name, regmean refuses instead."""
    from conftest import LORA_TARGETS, make_lora

    cli("base", "add", "llama", llama_dir)
    for name, kind in (("t1", "parity"), ("t2", "vowel")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", task_records(kind, 8, seed=2))
        cli("learn", name, "--data", data, "--into", "main", "--max-steps", "1", "--lora-r", "4",
            *(["--base", "llama"] if name == "t1" else []))
    assert cli.json("show", "main@v2")["method"] == "regmean"
    outside = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    cli("add-task", "outside", outside, "--base", "llama")
    refused = cli("fuse", "outside", "--into", "main", "--method", "regmean", code=4)
    assert "which --method regmean reads" in refused.stderr
    fused = cli("fuse", "outside", "--into", "main", "--json")
    version = json.loads(fused.stdout)
    assert version["method"] == "ties" and "task 'outside' has no Gram matrices (added without --calibrate)" in version["params"]["fallback"]
    assert sum("fused by ties" in line for line in fused.stderr.splitlines()) == 1
    history = cli("history", "main").stdout
    assert "fallback" in history and history.count("regmean") >= 1, "history says which fuse was the default's fallback"


def test_the_default_falls_back_in_a_plan(cli, tmp_path, llama_dir):
    """The default is no reason to refuse a plan: fuse steps over tasks without Gram matrices (a
    profile-free task; one calibrated with `gram: false`) pass its dry run and fuse by TIES,
    recording why; a rule that reads a profile still refuses the profile-free task."""
    import yaml

    from conftest import LORA_TARGETS, make_lora

    cli("base", "add", "llama", llama_dir)
    adapters = {n: make_lora(llama_dir, tmp_path / n, seed, LORA_TARGETS) for seed, n in enumerate(("a", "c"), 1)}
    cli("add-task", "a", adapters["a"], "--base", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 8))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"line": "planned", "base": {"name": "llama", "path": str(llama_dir)}, "steps": [
        {"add-task": {"task": "c", "checkpoint": str(adapters["c"]), "calibrate": str(data), "calibrate_batches": 1,
                      "gram": False}},
        {"fuse": {"task": "a"}},
        {"fuse": {"task": "c"}},
    ]}, sort_keys=False))
    assert cli.json("run", plan, "--dry-run")["pending"] == 3
    kif = plan.read_text().replace("task: a\n", "task: a\n    fuse:\n      method: kif\n")
    (tmp_path / "kif.yaml").write_text(kif.replace("line: planned", "line: kif"))
    assert "has no importance profile" in cli("run", tmp_path / "kif.yaml", "--dry-run", code=4).stderr
    result = cli.json("run", plan)
    assert [s["status"] for s in result["steps"]] == ["done"] * 3
    shown = cli.json("show", "planned@v2")
    assert shown["method"] == "ties" and "task 'c' has no Gram matrices (calibrated with --no-gram" in shown["params"]["fallback"]


def test_learn_run_again_is_reused_whatever_the_default_fused_by(cli, tmp_path, llama_dir):
    """A pipeline re-runs its `learn` steps: the same command returns the version it made, also where
    the default fell back to TIES (a full fine-tuning line; a LoRA line whose head has no Gram
    matrices), and `--gram` is compared by what it does (the default is on for LoRA), not as written."""
    from conftest import LORA_TARGETS, make_lora

    cli("base", "add", "llama", llama_dir)
    data = {k: write_jsonl(tmp_path / f"{k}.jsonl", task_records(k, 8, seed=2)) for k in ("parity", "vowel")}
    budget = ["--max-steps", "1", "--lora-r", "4"]
    for task, kind in (("f1", "parity"), ("f2", "vowel")):
        cli("learn", task, "--data", data[kind], "--into", "full", "--mode", "full", "--max-steps", "1",
            *(["--base", "llama"] if task == "f1" else []))
    again = cli("learn", "f2", "--data", data["vowel"], "--into", "full", "--mode", "full", "--max-steps", "1", "--json")
    first = json.loads(again.stdout)
    assert first["reused"] is True and first["method"] == "ties" and "full fine-tuning" in first["params"]["fallback"]
    assert cli.json("learn", "f2", "--data", data["vowel"], "--into", "full", "--mode", "full", "--max-steps", "1",
                    "--no-gram")["reused"] is True  # off for full either way

    cli("add-task", "outside", make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS), "--base", "llama")
    cli("fuse", "outside", "--into", "mixed")
    learned = cli.json("learn", "l2", "--data", data["parity"], "--into", "mixed", *budget)
    assert learned["method"] == "ties" and "mixed@v1 has no Gram matrices" in learned["params"]["fallback"]
    assert cli.json("learn", "l2", "--data", data["parity"], "--into", "mixed", *budget)["reused"] is True
    assert cli.json("learn", "l2", "--data", data["parity"], "--into", "mixed", *budget, "--gram")["reused"] is True
    refused = cli("learn", "l2", "--data", data["parity"], "--into", "mixed", *budget, "--no-gram", code=6)
    assert "--gram: on ≠ off" in refused.stderr


def test_gram_matrices_are_float32_sums_under_bf16_autocast(llama_dir):
    """--bf16 trains under autocast, which computes a float32 XᵀX in bfloat16 (3 significant
    digits) unless turned off: summed so, SmolLM2's matrices came out indefinite and RegMean's
    merge grew ×20 along their negative directions. The recorded sums equal float64 XᵀX of the
    inputs the modules read, to float32 precision, and are float32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kifmerge.importance import GramCollector

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    collector = GramCollector(model)
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name in collector._linears:
            module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone()))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.randint(0, model.config.vocab_size, (4, 24), generator=generator))
    grams = collector.grams
    assert set(grams) == set(seen) and seen
    for name, inputs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).to(torch.float64)
        assert grams[name].dtype == torch.float32
        torch.testing.assert_close(grams[name].to(torch.float64), x.T @ x, rtol=1e-5, atol=1e-4, msg=name)


def test_gram_matrices_an_older_kifmerge_summed_in_bfloat16_are_not_used(cli, tmp_path, llama_dir):
    """A profile written before the float32 mark by a --bf16 training holds bfloat16 sums: the
    default fuse falls back to TIES and says why, `--method regmean` refuses, and the line keeps
    no Gram matrices from it. The same file from a float32 training is used as before."""
    from safetensors.torch import save_file

    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    data = {k: write_jsonl(tmp_path / f"{k}.jsonl", task_records(k, 8, seed=2)) for k in ("parity", "vowel")}
    budget = ["--max-steps", "1", "--lora-r", "4"]
    cli("learn", "t1", "--data", data["parity"], "--into", "main", "--base", "llama", *budget)
    for task in ("old", "old32"):
        cli("train", task, "--data", data["vowel"], "--line", "main", *budget)
    reg = Registry.open(cli.registry)
    for task, bf16 in (("old", True), ("old32", False)):  # as an older kifmerge left them: no mark
        row = reg.catalog.rows("profiles", "task = ?", [task])[0]
        path = reg.blobs.open_verified(row["scores"])
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = {k: v for k, v in handle.metadata().items() if k != "gram-precision"}
        unmarked = tmp_path / f"{task}.safetensors"
        save_file(tensors, str(unmarked), metadata=metadata)
        config = {**json.loads(reg.catalog.db["tasks"].get(task)["training_config"]), "bf16": bf16}
        with reg.catalog.db.conn:
            reg.catalog.db["profiles"].update(task, {"scores": reg.blobs.put_file(unmarked)})
            reg.catalog.db["tasks"].update(task, {"training_config": json.dumps(config)})

    refused = cli("fuse", "old", "--into", "main", "--method", "regmean", code=4)
    assert "task 'old''s Gram matrices were summed in bfloat16" in refused.stderr and "retrain" in refused.stderr
    fused = cli("fuse", "old", "--into", "main", "--json")
    version = json.loads(fused.stdout)
    assert version["method"] == "ties" and "summed in bfloat16" in version["params"]["fallback"]
    assert "summed in bfloat16" in fused.stderr
    later = cli.json("fuse", "old32", "--into", "main")  # the line holds none now: later fuses fall back too
    assert later["method"] == "ties" and "none usable" in later["params"]["fallback"]
    assert cli.json("fuse", "old32", "--into", "other", "--json")["method"] == "initial"
    cli("learn", "t3", "--data", data["parity"], "--into", "other", *budget)
    assert cli.json("show", "other@v2")["method"] == "regmean", "an unmarked float32 training's matrices are used"


def test_regmean_records_how_much_a_merge_grew_and_warns_when_far_above_either_update(cli, tmp_path, llama_dir):
    """A least-squares average stays near the size of what it averages. Gram matrices that are not the
    inputs' (here: two nearly parallel rank-1 directions, as a hand-edited file might hold) make the
    solve amplify the direction they barely tell apart; the version records the largest growth and its
    module, and the fuse warns in one line. Ordinary matrices (calibrated) record a growth near 1, silently."""
    from safetensors.torch import save_file

    from conftest import LORA_TARGETS, make_lora, write_profile

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", task_records("parity", 8))
    adapters = {n: make_lora(llama_dir, tmp_path / n, seed, LORA_TARGETS) for seed, n in enumerate(("a", "b"), 1)}
    for name in adapters:
        cli("add-task", f"{name}-calibrated", adapters[name], "--base", "llama", "--calibrate", data, "--calibrate-batches", "2")
    cli("fuse", "a-calibrated", "--into", "plain")
    plain = cli("fuse", "b-calibrated", "--into", "plain", "--json")
    refactor = json.loads(plain.stdout)["params"]["refactor"]
    assert 0 < refactor["largest_growth"] < 16 and refactor["largest_growth_module"] and "warning" not in plain.stderr

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in load_file(adapters["a"] / "adapter_model.safetensors")})
    width = load_file(adapters["a"] / "adapter_model.safetensors")[f"{modules[0]}.lora_A.weight"].shape[1]
    first, second = torch.zeros(width), torch.zeros(width)
    first[0], second[0], second[1] = 1.0, 1.0, 1e-3  # nearly parallel: they differ by 1e-3 along feature 1
    for name, direction in (("a", first), ("b", second)):
        gram = torch.outer(direction, direction) + 1e-6 * torch.eye(width)
        profile = write_profile(tmp_path / f"{name}.safetensors", {m: [1.0] * 4 for m in modules}, "lora-rank")
        tensors = load_file(profile) | {f"gram:{m}": gram.clone() for m in modules}
        save_file(tensors, str(profile), metadata={"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"})
        cli("add-task", f"{name}-edited", adapters[name], "--base", "llama", "--profile", profile)
    cli("fuse", "a-edited", "--into", "edited")
    fused = cli("fuse", "b-edited", "--into", "edited", "--non-diagonal", "1", "--json")
    refactor = json.loads(fused.stdout)["params"]["refactor"]
    assert refactor["largest_growth"] > 16 and refactor["largest_growth_module"] in modules
    [warning] = [line for line in fused.stderr.splitlines() if line.startswith("kifmerge: warning:")]
    assert f"{refactor['largest_growth']:.1f}× the larger of the two it merges" in warning and "--method ties" in warning
