"""Safe re-runs of pipeline steps, through the CLI: fusing a task the line already holds is
refused (exit 6) unless --again; a task trained from an older version than the line's head is
reported (`stale_start`, and a warning in human mode) and fused all the same; `learn` run again
with the same inputs returns the version it made (`reused: true`) instead of training again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, Cli, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups


# what the default fuses `world`'s tasks by: they were added without Gram matrices, so regmean falls back
FUSED_BY_DEFAULT = "ties"


def add_tasks(cli: Cli, tmp_path: Path, llama_dir: Path, tasks: dict[str, str | None], first_seed: int = 1) -> None:
    """LoRA tasks with designed profiles; the value is the line whose head they were trained from."""
    tmp_path.mkdir(exist_ok=True)
    for seed, (task, line) in enumerate(tasks.items(), start=first_seed):
        adapter = make_lora(llama_dir, tmp_path / task, seed, LORA_TARGETS)
        profile = write_profile(tmp_path / f"{task}.safetensors",
                                designed_scores(unit_groups(adapter, "lora"), {seed, seed + 3}, 1.0)[0], "lora-rank")
        cli("add-task", task, adapter, "--base", "llama", "--profile", profile, *(["--line", line] if line else []))


@pytest.fixture
def world(cli, tmp_path, llama_dir) -> Cli:
    """Base `llama`, tasks t1 and t2 (no recorded start), line `main` = v1 (t1)."""
    cli("base", "add", "llama", llama_dir)
    add_tasks(cli, tmp_path, llama_dir, {"t1": None, "t2": None})
    cli("fuse", "t1", "--into", "main")
    return cli


def test_fusing_a_task_the_line_holds_is_refused_unless_again(world):
    cli = world
    refused = cli("fuse", "t1", "--into", "main", code=6)
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("kifmerge: error: ")
    assert "already in line 'main' (fused as main@v1)" in refused.stderr and "--again" in refused.stderr
    report = json.loads(cli("fuse", "t1", "--into", "main", "--json", code=6).stdout)
    assert report == {"error": "conflict", "reason": "already-fused", "task": "t1", "line": "main", "version": "main@v1",
                      "exit_code": 6, "message": refused.stderr.strip().removeprefix("kifmerge: error: ")}

    v2 = cli.json("fuse", "t2", "--into", "main")
    assert (v2["version"], v2["stale_start"]) == ("main@v2", None)
    assert "fused as main@v2" in cli("fuse", "t2", "--into", "main", code=6).stderr, "a retried step"
    assert "fused as main@v1" in cli("fuse", "t1", "--into", "main", code=6).stderr, "older versions count too"
    assert [v["number"] for v in cli.json("history", "main")] == [1, 2], "nothing was written"

    again = cli.json("fuse", "t2", "--into", "main", "--again")
    assert (again["version"], again["parent"], again["task"], again["method"]) == ("main@v3", "v2", "t2", FUSED_BY_DEFAULT)
    fuses = [e for e in cli.json("history", "main", "--events") if e["action"] == "fuse"]
    assert [e["details"].get("again") for e in fuses] == [None, None, "main@v2"]

    # a rollback to v1 takes t2 out of what the head holds: fusing it is a new step again
    cli("rollback", "main", "--to", "v1")
    assert cli.json("fuse", "t2", "--into", "main")["version"] == "main@v5"
    assert "fused as main@v5" in cli("fuse", "t2", "--into", "main", code=6).stderr
    # another line is another line
    assert cli.json("fuse", "t2", "--into", "side")["version"] == "side@v1"


def test_a_concurrent_fuse_of_the_same_task_lands_once(world, monkeypatch):
    """The check runs again inside the commit's transaction: the same fuse landing while ours
    computed (a retried job racing the original) makes ours fail with exit 6, not fuse twice."""
    from kifmerge.services import fusing

    cli, real_stage = world, fusing.stage_version

    def stage_then_the_original_lands(reg, task_row, *args, **kwargs):
        staged = real_stage(reg, task_row, *args, **kwargs)
        if not stage_then_the_original_lands.done:
            stage_then_the_original_lands.done = True
            monkeypatch.setattr(fusing, "stage_version", real_stage)
            Cli(cli.registry)("fuse", "t2", "--into", "main")
        return staged

    stage_then_the_original_lands.done = False
    monkeypatch.setattr(fusing, "stage_version", stage_then_the_original_lands)
    assert "fused as main@v2" in cli("fuse", "t2", "--into", "main", code=6).stderr
    assert [(v["number"], v["task"]) for v in cli.json("history", "main")] == [(1, "t1"), (2, "t2")]
    assert cli.json("verify")["ok"]


def test_a_task_trained_from_an_older_version_is_reported_and_fused(world, tmp_path, llama_dir):
    cli = world
    add_tasks(cli, tmp_path / "more", llama_dir, {"a": "main", "b": "main", "c": "main", "d": "main"}, 3)  # from main@v1
    fresh = cli.json("fuse", "a", "--into", "main")
    assert fresh["version"] == "main@v2" and fresh["stale_start"] is None, "trained from the head: not stale"

    stale = cli.json("fuse", "b", "--into", "main")
    assert stale["version"] == "main@v3" and stale["method"] == FUSED_BY_DEFAULT
    assert stale["stale_start"] == {"trained_from": "main@v1", "head": "main@v2"}
    event = [e for e in cli.json("history", "main", "--events") if e["action"] == "fuse"][-1]
    assert event["details"]["stale_start"] == {"trained_from": "main@v1", "head": "main@v2"}

    human = cli("fuse", "c", "--into", "main", "--method", "ties")
    warnings = [line for line in human.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "trained from main@v1, not from the head main@v3" in warnings[0]
    assert "two task vectors against the base" in warnings[0]
    assert cli.json("show", "main@v4")["params"]["reference"] == "base", "the baselines measure from the base"
    assert "warning" not in cli("fuse", "a", "--into", "other").stderr

    # a head that holds the start's weights again (rollback to v1) is no stale start
    cli("rollback", "main", "--to", "v1")
    assert cli.json("fuse", "d", "--into", "main")["stale_start"] is None
    assert "stale_start" not in cli.json("rollback", "main", "--to", "v1")


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return {"parity": write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 8)),
            "vowel": write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 8, seed=1)),
            "other": write_jsonl(tmp_path / "other.jsonl", task_records("vowel", 8, seed=2))}


def test_learn_again_with_the_same_inputs_reuses_its_version(cli, llama_dir, data, monkeypatch):
    cli("base", "add", "llama", llama_dir)
    steps = ["--max-steps", "2", "--batch-size", "4"]
    parity = ["learn", "parity", "--data", data["parity"], "--into", "main", "--base", "llama", *steps]
    vowel = ["learn", "vowel", "--data", data["vowel"], "--into", "main", *steps]
    v1 = cli.json(*parity)
    v2 = cli.json(*vowel)
    assert (v1["version"], v1["reused"], v2["version"], v2["reused"]) == ("main@v1", False, "main@v2", False)

    from kifmerge import training

    def no_training(*args, **kwargs):
        raise AssertionError("a reused learn must not train")

    monkeypatch.setattr(training, "run_training", no_training)
    again = cli.json(*vowel)
    assert again["reused"] is True and again["stale_start"] is None
    assert {k: again[k] for k in ("version", "parent", "task", "method", "params")} == \
        {k: v2[k] for k in ("version", "parent", "task", "method", "params")}
    assert again["trained"] == v2["trained"]
    assert cli.json(*parity)["version"] == "main@v1", "an earlier step of the line, re-run"
    human = cli(*vowel)
    assert "already learned into main@v2" in human.stderr and "nothing was trained" in human.stderr
    assert [v["number"] for v in cli.json("history", "main")] == [1, 2]

    # the same name with other inputs: refused, saying what differs
    other_data = cli("learn", "vowel", "--data", data["other"], "--into", "main", *steps, code=6).stderr
    assert "already exists, trained on other data" in other_data and "choose another task name" in other_data
    other_steps = cli("learn", "vowel", "--data", data["vowel"], "--into", "main", "--max-steps", "3", "--batch-size", "4",
                      code=6).stderr
    assert "trained with other options (--max-steps: 2 ≠ 3)" in other_steps
    other_lr = cli(*vowel, "--lr", "0.01", code=6).stderr
    assert "--lr: 0.0003 ≠ 0.01" in other_lr
    assert "other fuse options" in cli(*vowel, "--non-diagonal", "0.5", code=6).stderr  # the default rule's own parameter
    assert "line 'elsewhere' does not hold it" in cli("learn", "vowel", "--data", data["vowel"], "--into", "elsewhere",
                                                      "--base", "llama", *steps, code=6).stderr
    assert cli.json(*vowel, "--lr", "0.0003")["reused"], "the default learning rate, given explicitly"

    # rolled back: the line no longer holds the task, and the task keeps its name
    cli("rollback", "main", "--to", "v1")
    rolled = cli(*vowel, code=6).stderr
    assert "does not hold it" in rolled and "kifmerge fuse vowel --into main" in rolled
    assert [v["number"] for v in cli.json("history", "main")] == [1, 2, 3]


def test_learn_refuses_a_name_taken_by_a_task_it_did_not_make(world, tmp_path):
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 8))
    stderr = world("learn", "t2", "--data", data, "--into", "main", "--max-steps", "1", code=6).stderr
    assert "task 't2' already exists (registered with add-task, not learned)" in stderr
