"""`kifmerge run PLAN`: validation before any compute, a full run, skipping finished steps,
and resuming a plan killed halfway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llama_dir) -> dict[str, Path]:
    """Two LoRA tasks with profiles and a small dev file, as an outside pipeline has them."""
    folder = tmp_path_factory.mktemp("plan-inputs")
    out = {"base": llama_dir, "dev": write_jsonl(folder / "dev.jsonl", task_records("parity", 6)),
           "train": write_jsonl(folder / "train.jsonl", task_records("vowel", 16))}
    for seed in (1, 2):
        adapter = make_lora(llama_dir, folder / f"t{seed}", seed, LORA_TARGETS)
        scores = designed_scores(unit_groups(adapter, "lora"), {seed}, 1.0)[0]
        out[f"t{seed}"] = adapter
        out[f"p{seed}"] = write_profile(folder / f"p{seed}.safetensors", scores, "lora-rank")
    return out


def write_plan(folder: Path, inputs: dict[str, Path], steps: list[dict] | None = None, **top) -> Path:
    plan = {"line": "main", "base": {"name": "llama", "path": str(inputs["base"])}, "eval": {"max_examples": 4, "max_new_tokens": 2},
            "steps": steps if steps is not None else [
                {"add-task": {"task": "t1", "checkpoint": str(inputs["t1"]), "profile": str(inputs["p1"])}},
                {"fuse": {"task": "t1"}},
                {"add-task": {"task": "t2", "checkpoint": str(inputs["t2"]), "profile": str(inputs["p2"])}},
                {"fuse": {"task": "t2", "fuse": {"method": "ties", "density": 0.4}}},
                {"eval": {"data": {"parity": str(inputs["dev"])}}},
            ], **top}
    import yaml

    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def test_dry_run_checks_and_estimates_without_touching_anything(cli, tmp_path, inputs):
    plan = write_plan(tmp_path, inputs)
    before = cli.json("list", "tasks")
    result = cli.json("run", plan, "--dry-run")
    assert [s["kind"] for s in result["steps"]] == ["add-task", "fuse", "add-task", "fuse", "eval"]
    assert all(s["status"] == "pending" and len(s["fingerprint"]) == 64 for s in result["steps"])
    adapter = result["steps"][0]["estimate"]["weights_bytes"]
    assert adapter > 0
    # v1 is t1's weights as they are (no new blob); v2 adds an adapter of the same layout
    assert [result["steps"][i]["estimate"]["weights_bytes"] for i in (1, 3)] == [0, adapter]
    assert result["steps"][4]["subject"] == "main@v2" and result["steps"][4]["estimate"]["examples"] == {"parity": 4}
    assert cli.json("list", "tasks") == before == [] and result["pending"] == 5


def test_dry_run_sizes_a_new_lines_fuses_of_a_task_already_registered(cli, tmp_path, inputs):
    cli("base", "add", "llama", inputs["base"])
    cli("add-task", "t1", inputs["t1"], "--base", "llama", "--profile", inputs["p1"])
    adapter = sum(f.stat().st_size for f in inputs["t1"].glob("*.safetensors"))
    plan = write_plan(tmp_path, inputs, steps=[
        {"fuse": {"task": "t1"}},
        {"add-task": {"task": "t2", "checkpoint": str(inputs["t2"]), "profile": str(inputs["p2"])}},
        {"fuse": {"task": "t2"}}])
    steps = cli.json("run", plan, "--dry-run")["steps"]
    assert [s["estimate"]["weights_bytes"] for s in steps] == [0, adapter, adapter]


@pytest.mark.parametrize("change,code,message", [
    (lambda p: p["steps"][1]["fuse"].update(methd="ties"), 4, "steps[1].fuse.methd: unknown key"),
    (lambda p: p.update(lines="x"), 4, "lines: unknown key"),
    (lambda p: p["steps"][1]["fuse"].update(fuse={"method": "nope"}), 4, "steps[1].fuse: option method"),
    (lambda p: p["steps"][0]["add-task"].update(checkpoint="/nowhere"), 3, "steps[0].add-task: checkpoint not found"),
    (lambda p: p["steps"][1]["fuse"].update(task="ghost"), 3, "steps[1].fuse: task 'ghost' is neither"),
    (lambda p: p["steps"][4]["eval"].update(ref="main@v3"), 3, "steps[4].eval: main@v3 will not exist"),
    (lambda p: p["steps"].append({"fuse": {"task": "t1"}, "eval": {"data": {}}}), 4, "exactly one of"),
    (lambda p: p["steps"][2]["add-task"].update(task="t1"), 4, "made twice"),
    (lambda p: p["steps"][0]["add-task"].update(task="bad/name"), 2, "invalid task name"),
    (lambda p: p["steps"][0]["add-task"].update(gram=True), 4, "gram needs calibrate"),
])
def test_invalid_plans_fail_fast_with_one_line(cli, tmp_path, inputs, change, code, message):
    import yaml

    path = write_plan(tmp_path, inputs)
    plan = yaml.safe_load(path.read_text())
    change(plan)
    path.write_text(yaml.safe_dump(plan))
    result = cli("run", path, code=code)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert cli.json("list", "tasks") == [], "nothing ran"


def test_run_then_rerun_skips_finished_steps(cli, tmp_path, inputs):
    plan = write_plan(tmp_path, inputs)
    first = cli.json("run", plan)
    assert first["done"] == 5 and first["pending"] == 0
    history = cli.json("history", "main")
    assert [(v["task"], v["method"]) for v in history] == [("t1", "initial"), ("t2", "ties")]
    assert history[1]["params"]["density"] == 0.4
    second = cli.json("run", plan)
    assert [s["status"] for s in second["steps"]] == ["done"] * 5 and all("result" not in s for s in second["steps"])
    assert cli.json("history", "main") == history
    # a TOML plan with the same content is the same plan: same fingerprints, nothing to do
    toml = tmp_path / "plan.toml"
    toml.write_text(_as_toml(plan))
    assert [s["fingerprint"] for s in cli.json("run", toml, "--dry-run")["steps"]] == [s["fingerprint"] for s in second["steps"]]


def test_a_killed_plan_resumes_at_the_step_that_did_not_finish(tmp_path, inputs):
    """SIGKILL inside the second fuse (before its commit), then after the commit of the
    second add-task but before the plan recorded it: each rerun does only what is missing."""
    plan = write_plan(tmp_path, inputs, steps=[
        {"add-task": {"task": "t1", "checkpoint": str(inputs["t1"]), "profile": str(inputs["p1"])}},
        {"fuse": {"task": "t1"}},
        {"add-task": {"task": "t2", "checkpoint": str(inputs["t2"]), "profile": str(inputs["p2"])}},
        {"fuse": {"task": "t2"}},
    ])
    env = {**os.environ, "KIFMERGE_REGISTRY": str(tmp_path / "registry")}

    def run(*extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kifmerge", "run", str(plan), *extra], capture_output=True, text=True,
                              env={**env, **({"KIFMERGE_FAULT_POINT": fault} if fault else {})})

    killed = run(fault="plan.step-done#3")  # the second add-task is committed, its plan.step event is not
    assert killed.returncode == -9, killed.stderr
    killed = run(fault="fuse.staged#1")  # this run's first fuse is step 3's: killed before it commits
    assert killed.returncode == -9, killed.stderr
    assert "step 2: add-task t2 — already done, skipped" in killed.stderr
    done = run("--json")
    assert done.returncode == 0, done.stderr
    assert [s["status"] for s in json.loads(done.stdout)["steps"]] == ["done"] * 4
    assert done.stderr.count("already done, skipped") == 3
    history = json.loads(subprocess.run([sys.executable, "-m", "kifmerge", "history", "main", "--json"], env=env,
                                        capture_output=True, text=True).stdout)
    assert [v["task"] for v in history] == ["t1", "t2"]
    verify = subprocess.run([sys.executable, "-m", "kifmerge", "verify"], env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _as_toml(path: Path) -> str:
    import yaml

    plan = yaml.safe_load(path.read_text())

    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f'{k} = {value(v)}' for k, v in plan.items() if k != "steps"]
    for step in plan["steps"]:
        (kind, body), = step.items()
        lines += ["", "[[steps]]", f'"{kind}" = {value(body)}']
    return "\n".join(lines) + "\n"


def test_a_plan_of_learn_steps_trains_fuses_and_evaluates(cli, tmp_path, inputs):
    plan = write_plan(tmp_path, inputs, steps=[
        {"learn": {"task": "vowel", "data": str(inputs["train"])}},
        {"learn": {"task": "vowel2", "data": str(inputs["train"]), "train": {"seed": 7}, "fuse": {"method": "linear"}}},
        {"eval": {"ref": "main@v1", "data": {"parity": str(inputs["dev"])}}},
    ], train={"max_steps": 2, "batch_size": 4, "max_length": 48, "lora_r": 2})
    estimate = cli.json("run", plan, "--dry-run")["steps"][0]["estimate"]
    assert estimate["examples"] == 16 and estimate["weights_bytes"] == 2 * 2 * (2 * 32 + 32 + 16) * 4  # r·(in+out)·4 B, q+v, 2 layers
    shown = cli("run", plan).stdout  # the table says what each step made
    assert "main@v1" in shown and "main@v2" in shown and "parity 0." in shown, shown
    history = cli.json("history", "main")
    assert [(v["task"], v["method"]) for v in history] == [("vowel", "initial"), ("vowel2", "linear")]
    assert cli.json("show", "vowel2")["trained_from"] == "main@v1"
    assert cli.json("run", plan)["pending"] == 0


def test_a_plan_calibrates_gram_matrices_for_regmean(cli, tmp_path, inputs):
    steps = [{"add-task": {"task": f"t{n}", "checkpoint": str(inputs[f"t{n}"]), "calibrate": str(inputs["train"]),
                           "calibrate_batches": 1, "gram": True}} for n in (1, 2)]
    steps = [steps[0], {"fuse": {"task": "t1"}}, steps[1], {"fuse": {"task": "t2", "fuse": {"method": "regmean"}}}]
    result = cli.json("run", write_plan(tmp_path, inputs, steps))
    assert [s["status"] for s in result["steps"]] == ["done"] * 4
    assert cli.json("show", "main@v2")["method"] == "regmean"
    # `gram: false` is the step without it: plans written before the field keep their identities
    plain = [{"add-task": {"task": "t1", "checkpoint": str(inputs["t1"]), "calibrate": str(inputs["train"])}}]
    off = [{"add-task": {**plain[0]["add-task"], "gram": False}}]
    on = [{"add-task": {**plain[0]["add-task"], "gram": True}}]
    prints = [cli.json("run", write_plan(tmp_path, inputs, s, line="other"), "--dry-run")["steps"][0]["fingerprint"]
              for s in (plain, off, on)]
    assert prints[0] == prints[1] != prints[2]


def test_a_plan_base_path_must_still_name_the_registered_base(cli, tmp_path, inputs, t5_dir):
    """With the base registered already, the plan's `path` is checked, not ignored: a folder that does not
    exist, or another model, fails the plan before any step runs."""
    import yaml

    cli("base", "add", "llama", inputs["base"])
    path = write_plan(tmp_path, inputs)
    assert cli.json("run", path, "--dry-run")["pending"] == 5, "the registered base's own folder is fine"
    for where, code, message in ((tmp_path / "nowhere", 3, "not found"), (t5_dir, 2, "is not the model registered as 'llama'")):
        plan = yaml.safe_load(path.read_text())
        plan["base"]["path"] = str(where)
        path.write_text(yaml.safe_dump(plan))
        result = cli("run", path, code=code)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert cli.json("list", "tasks") == [], "nothing ran"
