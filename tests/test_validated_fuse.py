"""Validation examples stored with a task (`--val`), the fuse that chooses its α on them
(`--method validated`) and the quality gate (`--max-regression`), through the CLI."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import LORA_TARGETS, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups

PROBE = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def two_tasks(cli, tmp_path, llama_dir):
    """Base `llama`, task `old` (v1 of line `main`) and task `new`, each with validation
    examples; returns the two adapters' tensors."""
    cli("base", "add", "llama", llama_dir)
    tensors = {}
    for seed, name in ((1, "old"), (2, "new")):
        ckpt = make_lora(llama_dir, tmp_path / name, seed, LORA_TARGETS)
        profile = write_profile(tmp_path / f"{name}.safetensors", designed_scores(unit_groups(ckpt, "lora"), {0}, 1.0)[0], "lora-rank")
        val = write_jsonl(tmp_path / f"{name}-val.jsonl", task_records("parity" if name == "old" else "vowel", 6, seed=seed))
        cli("add-task", name, ckpt, "--base", "llama", "--profile", profile, "--val", val)
        tensors[name] = load_file(ckpt / "adapter_model.safetensors")
    cli("fuse", "old", "--into", "main")
    return tensors


def fake_scores(monkeypatch, tensors):
    """Score a candidate by the α it mixes (read off one tensor): the old task keeps 1 − α, the new
    task reaches min(1, 2α). Over α ∈ {0.2, 0.6, 0.9} the means are 0.6, 0.7 and 0.55."""
    from kifmerge.services import validation

    old, new = tensors["old"][PROBE].float(), tensors["new"][PROBE].float()

    def score(self, state, sets):
        alpha = float(((state[PROBE].float() - old) * (new - old)).sum() / ((new - old) ** 2).sum())
        values = {"old": round(1 - alpha, 6), "new": round(min(1.0, 2 * alpha), 6)}
        return {name: values[name] for name in sets}

    monkeypatch.setattr(validation.CandidateScorer, "score", score)


def test_validation_examples_are_stored_with_the_task(cli, two_tasks, tmp_path):
    stored = cli.json("show", "new")
    assert stored["validation"]["records"] == 6
    assert stored["validation"]["source"] == str((tmp_path / "new-val.jsonl").resolve())
    assert cli.json("verify")["ok"]


def test_validated_fuse_chooses_the_alpha_with_the_best_mean_and_records_why(cli, two_tasks, monkeypatch):
    fake_scores(monkeypatch, two_tasks)
    version = cli.json("fuse", "new", "--into", "main", "--method", "validated", "--grid", "0.2,0.6,0.9")
    params = version["params"]
    assert version["method"] == "validated" and params["alpha"] == 0.6
    assert params["selection"]["mean"] == {"0.2": 0.6, "0.6": 0.7, "0.9": 0.55}
    assert params["selection"]["scores"]["0.9"] == {"old": 0.1, "new": 1.0}
    # the version is exactly `linear` at the chosen α
    assert cli.json("fuse", "old", "--into", "check")["version"] == "check@v1"
    cli("fuse", "new", "--into", "check", "--method", "linear", "--alpha", "0.6")
    assert cli.json("show", "check@v2")["weights"] == cli.json("show", "main@v2")["weights"]


def test_max_regression_refuses_a_version_that_costs_an_earlier_task_too_much(cli, two_tasks, monkeypatch, tmp_path):
    """linear α 0.5 takes the old task from 1.0 (head) to 0.5: a 50-point drop."""
    fake_scores(monkeypatch, two_tasks)
    blobs_before = sorted(p.name for p in (cli.registry / "blobs").rglob("*") if p.is_file())
    refused = cli("fuse", "new", "--into", "main", "--method", "linear", "--max-regression", "10", code=6)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("kifmerge: error")]
    assert len(errors) == 1 and "task 'old' would drop 50.0 points" in errors[0] and "nothing was written" in errors[0]
    assert [v["number"] for v in cli.json("history", "main")] == [1]
    assert sorted(p.name for p in (cli.registry / "blobs").rglob("*") if p.is_file()) == blobs_before
    passed = cli.json("fuse", "new", "--into", "main", "--method", "linear", "--max-regression", "60")
    assert passed["params"]["max_regression"]["drops"] == {"old": 50.0}


def test_validated_fuse_scores_candidates_as_eval_scores_the_version(cli, two_tasks, tmp_path):
    """No fake: the tiny model generates. The score recorded for the chosen α on the new task's
    validation examples is what `kifmerge eval` gives the stored version on them."""
    version = cli.json("fuse", "new", "--into", "main", "--method", "validated", "--grid", "0.3,0.7")
    selection = version["params"]["selection"]
    assert set(selection["scores"]) == {"0.3", "0.7"} and version["params"]["alpha"] in (0.3, 0.7)
    evaluated = cli.json("eval", "main", "--data", f"new={tmp_path / 'new-val.jsonl'}", "--max-new-tokens", "64")
    assert evaluated["results"]["new"]["exact_match"] == pytest.approx(selection["scores"][str(version["params"]["alpha"])]["new"])


def line_of_two_outside_tasks(cli, tmp_path, llama_dir) -> None:
    """Tasks `l1` (v1 of line `main`) and `l2`, LoRA adapters registered with a unit profile only
    (no element scores, no validation examples)."""
    cli("base", "add", "llama", llama_dir)
    for seed in (1, 2):
        ckpt = make_lora(llama_dir, tmp_path / f"l{seed}", seed, LORA_TARGETS)
        profile = write_profile(tmp_path / f"p{seed}.safetensors", designed_scores(unit_groups(ckpt, "lora"), {0}, 1.0)[0], "lora-rank")
        cli("add-task", f"l{seed}", ckpt, "--base", "llama", "--profile", profile)
    cli("fuse", "l1", "--into", "main")


def test_validated_fuses_need_validation_examples_and_a_lora_line(cli, tmp_path, llama_dir):
    line_of_two_outside_tasks(cli, tmp_path, llama_dir)
    missing = cli("fuse", "l2", "--into", "main", "--method", "validated", code=4)
    assert "has validation examples" in missing.stderr and "--val FILE" in missing.stderr
    assert "--grid" in cli("fuse", "l2", "--into", "main", "--method", "validated", "--grid", "0.5,2", code=2).stderr
    assert "--max-regression" in cli("fuse", "l2", "--into", "main", "--max-regression", "-1", code=2).stderr
    bad = write_jsonl(tmp_path / "empty.jsonl", [])
    assert cli("add-task", "l3", tmp_path / "l2", "--base", "llama", "--profile", tmp_path / "p2.safetensors",
               "--val", bad, code=4).stderr.count("\n") == 1
    assert json.loads(cli("list", "tasks", "--json").stdout)[-1]["name"] == "l2", "a refused task is not registered"


def test_learn_stores_validation_and_its_gate_leaves_neither_task_nor_version(cli, tmp_path, llama_dir, monkeypatch):
    """`learn --val` stores the examples; `learn --max-regression` that refuses the fuse records
    neither the trained task nor a version (one line, exit 6)."""
    from kifmerge.services import validation

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "p.jsonl", task_records("parity", 8))
    val = write_jsonl(tmp_path / "p-val.jsonl", task_records("parity", 4, seed=3))
    cli("learn", "first", "--data", data, "--into", "main", "--base", "llama", "--max-steps", "2", "--val", val)
    assert cli.json("show", "first")["validation"]["records"] == 4
    calls = iter([{"first": 1.0}, {"first": 0.25}])  # the head, then the fused candidate: a 75-point drop
    monkeypatch.setattr(validation.CandidateScorer, "score", lambda self, state, sets: next(calls))
    refused = cli("learn", "second", "--data", data, "--into", "main", "--max-steps", "2", "--max-regression", "5", code=6)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("kifmerge: error")]
    assert len(errors) == 1 and "task 'first' would drop 75.0 points" in errors[0]
    assert [t["name"] for t in cli.json("list", "tasks")] == ["first"]
    assert [v["number"] for v in cli.json("history", "main")] == [1]
