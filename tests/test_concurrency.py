"""Concurrency: 16 `kifmerge` processes writing one registry at once (add-task, fuse into one
shared line, fuse into their own lines). No "database is locked" reaches the user, every
fuse lands (a fuse whose line moved meanwhile is fused again onto the new head), version
numbers are unique and gapless, and the registry verifies clean."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import types

import pytest

from conftest import LORA_TARGETS, Cli, make_lora, write_profile
from test_fuse_export import designed_scores, unit_groups

from kifmerge.options import FuseParams

WRITERS = 16


def test_sixteen_concurrent_writers(tmp_path, llama_dir):
    cli = Cli(tmp_path / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    checkpoints = []
    for i in range(2):
        ckpt = make_lora(llama_dir, tmp_path / f"a{i}", seed=i, targets=LORA_TARGETS)
        profile = write_profile(tmp_path / f"p{i}.safetensors", designed_scores(unit_groups(ckpt, "lora"), {i, i + 3}, 1.0)[0], "lora-rank")
        checkpoints.append((ckpt, profile))
    shared = [f"s{i}" for i in range(6)]       # fused into one line, none of them first
    own = [f"o{i}" for i in range(4)]          # each fused into a line of its own
    for i, task in enumerate(shared + own):
        ckpt, profile = checkpoints[i % 2]
        cli("add-task", task, ckpt, "--base", "llama", "--profile", profile)
    jobs = [["fuse", task, "--into", "shared"] for task in shared]
    jobs += [["fuse", task, "--into", f"line-{task}"] for task in own]
    jobs += [["add-task", f"new{i}", str(checkpoints[i % 2][0]), "--base", "llama", "--profile", str(checkpoints[i % 2][1])]
             for i in range(WRITERS - len(jobs))]
    assert len(jobs) == WRITERS

    env = {**os.environ, "KIFMERGE_REGISTRY": str(cli.registry)}
    env.pop("KIFMERGE_FAULT_POINT", None)
    processes = [subprocess.Popen([sys.executable, "-m", "kifmerge", *job, "--json"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    results = [(job, *p.communicate(timeout=300), p.returncode) for job, p in zip(jobs, processes)]
    for job, out, err, code in results:
        assert code == 0, f"{' '.join(job)}: exit {code}: {err}"
        assert "locked" not in err

    fused = [json.loads(out) for job, out, _, _ in results if job[0] == "fuse"]
    history = cli.json("history", "shared")
    assert [v["number"] for v in history] == list(range(1, len(shared) + 1)), "unique and gapless"
    assert [v["parent"] for v in history] == [None] + [f"v{n}" for n in range(1, len(shared))]
    assert sorted(v["task"] for v in history) == sorted(shared), "every fuse landed once"
    assert sorted(r["version"] for r in fused if r["line"] == "shared") == [f"shared@v{n}" for n in range(1, 7)]
    assert [v["method"] for v in history] == ["initial"] + ["ties"] * (len(shared) - 1), \
        "the default (regmean), which falls back to ties: tasks added without Gram matrices"
    for task in own:
        assert [(v["number"], v["task"]) for v in cli.json("history", f"line-{task}")] == [(1, task)]
    assert {t["name"] for t in cli.json("list", "tasks")} >= {f"new{i}" for i in range(WRITERS - 10)}
    assert cli.json("verify")["ok"]


def test_fuse_rebases_onto_a_line_that_moved(tmp_path, llama_dir, monkeypatch):
    """Deterministic version of the race: another fuse lands between staging and commit; ours
    is computed again on the new head and becomes the next version. When the line keeps
    moving for REBASE_ATTEMPTS tries, it fails with exit 6 and a message to run it again."""
    from kifmerge.services import fusing

    cli = Cli(tmp_path / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    for i, task in enumerate(("t1", "t2", "t3", "t4")):
        ckpt = make_lora(llama_dir, tmp_path / task, seed=i, targets=LORA_TARGETS)
        cli("add-task", task, ckpt, "--base", "llama", "--profile",
            write_profile(tmp_path / f"{task}.safetensors", designed_scores(unit_groups(ckpt, "lora"), {i}, 1.0)[0], "lora-rank"))
    cli("fuse", "t1", "--into", "main")
    real_stage, staged_on = fusing.stage_version, []

    def stage_then_someone_fuses(reg, task_row, *args, **kwargs):
        staged = real_stage(reg, task_row, *args, **kwargs)
        if task_row["name"] != "t2":
            return staged
        staged_on.append(staged.row["parent"])
        if len(staged_on) == 1:
            Cli(cli.registry)("fuse", "t3", "--into", "main")  # lands first: main@v2
        return staged

    monkeypatch.setattr(fusing, "stage_version", stage_then_someone_fuses)
    done = cli("fuse", "t2", "--into", "main", "--json")
    result = json.loads(done.stdout)
    assert staged_on == [1, 2] and result["version"] == "main@v3" and result["parent"] == "v2"
    assert done.stderr.count("task 't2' has no Gram matrices") == 1, "the fallback is said once, not per rebase"
    assert [v["task"] for v in cli.json("history", "main")] == ["t1", "t3", "t2"]

    def line_always_moves(reg, task_row, *args, **kwargs):
        staged = real_stage(reg, task_row, *args, **kwargs)
        staged.row["number"] -= 1  # as if staged on an older head every time
        return staged

    monkeypatch.setattr(fusing, "stage_version", line_always_moves)
    monkeypatch.setattr(fusing, "REBASE_ATTEMPTS", 3)
    error = cli("fuse", "t4", "--into", "main", code=6).stderr
    assert "moved" in error and "run the command again" in error
    assert len(cli.json("history", "main")) == 3
    assert cli.json("verify")["ok"]


def test_a_warning_of_a_staging_that_refused_is_still_said():
    """The fallback a refused fuse took (e.g. --max-regression refusing after the default fell back)."""
    import warnings

    from kifmerge.errors import FallbackWarning
    from kifmerge.services.fusing import warnings_once

    warned: set[str] = set()
    with pytest.warns(FallbackWarning, match="fused by ties"), pytest.raises(RuntimeError):
        with warnings_once(warned):
            warnings.warn("regmean (the default): fused by ties", FallbackWarning)
            raise RuntimeError("refused")
    assert warned == {"regmean (the default): fused by ties"}


def test_locked_database_is_retried(tmp_path, llama_dir, monkeypatch):
    """SQLite gives up at once (or after the busy timeout) while another connection holds the
    write lock; the catalog retries with backoff, so a short lock never fails the command."""
    from kifmerge.registry import catalog

    cli = Cli(tmp_path / "registry")
    cli("init")
    monkeypatch.setattr(catalog, "BUSY_TIMEOUT_MS", 1)  # make SQLite itself give up at once
    holder = sqlite3.connect(cli.registry / "kifmerge.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waits = []

    def backoff(seconds: float) -> None:  # the catalog's wait before a retry: the holder commits during the first
        waits.append(seconds)
        if len(waits) == 1:
            holder.execute("COMMIT")

    monkeypatch.setattr(catalog, "time", types.SimpleNamespace(sleep=backoff))
    cli("base", "add", "llama", llama_dir)  # its transaction finds the lock held, waits, and retries
    assert len(waits) == 1 and 0 < waits[0] <= 0.02, "one retry after a jittered backoff of at most 20 ms"
    holder.close()
    assert [b["name"] for b in cli.json("list", "bases")] == ["llama"]

    holder = sqlite3.connect(cli.registry / "kifmerge.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(catalog, "LOCK_ATTEMPTS", 3)
    error = cli("base", "add", "other", llama_dir, code=6).stderr
    assert "locked" in error and "run the command again" in error
    holder.execute("ROLLBACK")
    holder.close()
