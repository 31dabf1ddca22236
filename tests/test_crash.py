"""Crash safety: `add-task`, `fuse`, `learn`, `export` and `gc` run as real processes and are
killed with SIGKILL at named points of their write paths (KIFMERGE_FAULT_POINT, see
kifmerge/faults.py), including between two blocks of a shard being written
(`fuse.block-written#N`); never after a measured delay, which lands elsewhere on a busier or a
quieter machine. After every kill the registry must verify clean, hold the change whole or not
at all, re-run to the same result, and gc back to no garbage.

CI runs the cheap commands at every point and `learn` at two; `-m slow` runs the full matrix."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, Cli, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups

FAULT = "KIFMERGE_FAULT_POINT"


@dataclass(frozen=True)
class Case:
    command: str                 # a key of `commands()`
    point: str                   # a fault point name (NAME or NAME#N)
    committed: bool | None       # the change is whole after this point (None: either)

    @property
    def id(self) -> str:
        return f"{self.command}-{self.point}"


ADD_POINTS = [("weights.file-stored", False), ("weights.file-stored#2", False), ("weights.manifest-stored", False),
              ("task.weights-stored", False), ("add-task.staged", False), ("catalog.begun", False),
              ("task.row", False), ("catalog.before-commit", False), ("catalog.committed", True)]
FUSE_POINTS = [("fuse.shards-written", False), ("weights.file-stored", False), ("weights.manifest-stored", False),
               ("fuse.weights-stored", False), ("fuse.staged", False), ("catalog.before-commit", False),
               ("catalog.committed", True)]
CI_CASES = [
    *(Case("add-task", p, c) for p, c in ADD_POINTS),
    *(Case("fuse", p, c) for p, c in FUSE_POINTS),
    Case("fuse-new-line", "fuse.line-row", False),
    Case("export", "export.weights-copied", False), Case("export", "export.card-written", False),
    Case("export", "export.renamed", True),
    Case("gc", "gc.removed", None), Case("gc", "gc.before-event", None),
    Case("learn", "train.step", False), Case("learn", "learn.task-row", False),
    Case("fuse", "fuse.block-written#3", False),  # mid-shard: 3 of the adapter's 8 tensors written
]
SLOW_CASES = [
    *(Case("learn", p, c) for p, c in [("train.step#2", False), ("train.checkpoint-saved", False), ("train.done", False),
                                       ("task.weights-stored", False), ("learn.task-staged", False),
                                       ("fuse.weights-stored", False), ("learn.version-staged", False),
                                       ("catalog.before-commit", False), ("catalog.committed", True)]),
    Case("fuse-new-line", "catalog.begun", False), Case("fuse-new-line", "catalog.committed", True),
    Case("export-merged", "export.merged", False), Case("export-merged", "export.renamed", True),
    # every block of the fused adapter (8 tensors, one block each): killed after the first, inside
    # and after the last, before the shard is renamed into place (a new line's first fuse writes none)
    *(Case("fuse", f"fuse.block-written#{n}", False) for n in (1, 2, 4, 5, 6, 7, 8)),
    *(Case("learn", f"fuse.block-written#{n}", False) for n in (1, 4, 8)),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir) -> dict:
    """A registry with a base, tasks t1/t2 and line `main`@v1, plus the inputs of every command;
    each case runs on its own copy."""
    root = tmp_path_factory.mktemp("crash")
    cli = Cli(root / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    files = {}
    for i, hot in ((1, {0, 1, 2}), (2, {2, 3, 4}), (3, {5, 6})):
        ckpt = make_lora(llama_dir, root / f"t{i}", seed=i, targets=LORA_TARGETS)
        files[f"t{i}"] = ckpt
        files[f"p{i}"] = write_profile(root / f"p{i}.safetensors", designed_scores(unit_groups(ckpt, "lora"), hot, 1.0)[0], "lora-rank")
    cli("add-task", "t1", files["t1"], "--base", "llama", "--profile", files["p1"])
    cli("add-task", "t2", files["t2"], "--base", "llama", "--profile", files["p2"])
    cli("fuse", "t1", "--into", "main")
    files["data"] = write_jsonl(root / "parity.jsonl", task_records("parity", 8))
    return {"root": root, "registry": cli.registry, "files": files, "reference": {}}


def commands(world: dict, out: Path) -> dict[str, list[str]]:
    f = world["files"]
    return {
        "add-task": ["add-task", "t3", str(f["t3"]), "--base", "llama", "--profile", str(f["p3"])],
        "fuse": ["fuse", "t2", "--into", "main"],
        "fuse-new-line": ["fuse", "t2", "--into", "side"],
        "export": ["export", "main", str(out)],
        "export-merged": ["export", "main", str(out), "--merged"],
        "gc": ["gc", "--grace", "0"],
        "learn": ["learn", "t4", "--data", str(f["data"]), "--into", "main", "--max-steps", "2", "--batch-size", "4"],
    }


def add_garbage(registry: Path) -> None:
    """What killed commands leave behind: a staging folder, a staged file, an unreferenced blob."""
    (registry / "tmp" / "work-killed" / "checkpoint").mkdir(parents=True)
    (registry / "tmp" / "work-killed" / "checkpoint" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (registry / "tmp" / "blob-killed").write_bytes(b"half a blob")
    for data in (b"an unreferenced blob", b"another one"):
        sha = hashlib.sha256(data).hexdigest()
        (registry / "blobs" / sha[:2]).mkdir(exist_ok=True)
        (registry / "blobs" / sha[:2] / sha[2:]).write_bytes(data)


def rows(registry: Path, blobs: bool = True) -> dict:
    """The catalog's content, minus timestamps and the audit log (and blob shas for training,
    whose float sums need not repeat bit for bit)."""
    with closing(sqlite3.connect(registry / "kifmerge.db")) as db:
        def q(sql):
            return sorted(db.execute(sql if blobs else sql.replace(", weights", "").replace(", scores", "")).fetchall())
        return {"tasks": q("select name, kind, weights from tasks"), "profiles": q("select task, scores from profiles"),
                "lines": q("select name, base, kind from lines"),
                "versions": q("select line, number, parent, task, method from versions")}


def audit(registry: Path) -> dict:
    """Rows and the events that record them are written in one transaction: counts agree."""
    with closing(sqlite3.connect(registry / "kifmerge.db")) as db:
        one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        return {"tasks": (one("select count(*) from tasks"), one("select count(*) from events where action = 'task.add'")),
                "versions": (one("select count(*) from versions"), one("select count(*) from events where action = 'fuse'")),
                "lines": (one("select count(*) from lines"), one("select count(*) from events where action = 'line.create'"))}


def run_killed(registry: Path, args: list[str], case: Case) -> int:
    env = {**os.environ, "KIFMERGE_REGISTRY": str(registry), FAULT: case.point}
    done = subprocess.run([sys.executable, "-m", "kifmerge", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"never reached {case.point}: exit {done.returncode}\n{done.stderr}"
    return done.returncode


def tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())} if folder.exists() else {}


def check_consistent(cli: Cli) -> None:
    """verify, list and history agree: every version listed is whole, numbers are gapless."""
    assert cli.json("verify")["ok"]
    versions = cli.json("list", "versions")
    for line in cli.json("list", "lines"):
        history = cli.json("history", line["name"])
        assert [v["number"] for v in history] == list(range(1, len(history) + 1))
        assert history == [v for v in versions if v["line"] == line["name"]]
        assert line["head"] == (f"v{len(history)}" if history else None)
    assert len(versions) == sum(len(cli.json("history", line["name"])) for line in cli.json("list", "lines"))
    assert all(a == b for a, b in audit(cli.registry).values())


def check_gc_cleans(cli: Cli) -> None:
    """gc --dry-run names exactly what gc then removes; afterwards no staging file and no
    unreferenced blob is left, and the registry still verifies."""
    would = cli.json("gc", "--dry-run", "--grace", "0")["removed"]
    assert cli.json("gc", "--grace", "0")["removed"] == would
    assert list((cli.registry / "tmp").iterdir()) == []
    kept = cli.json("gc", "--dry-run", "--grace", "0")
    assert kept["removed"] == [] and kept["kept_blobs"] == len(list((cli.registry / "blobs").glob("*/*")))
    stamps = {p.relative_to(cli.registry / "stamps") for p in (cli.registry / "stamps").glob("*/*")}
    assert stamps <= {p.relative_to(cli.registry / "blobs") for p in (cli.registry / "blobs").glob("*/*")}, \
        "a removed blob's stamp goes with it"
    assert cli.json("verify")["ok"]


def crash_and_recover(world: dict, case: Case, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(world["registry"], registry)
    if case.command == "gc":
        add_garbage(registry)
    out = tmp_path / "out"
    args = commands(world, out)[case.command]
    cli = Cli(registry)

    blobs = case.command != "learn"
    before = rows(registry, blobs)
    if case.command not in world["reference"]:  # the same command, not killed, on another copy
        reference = world["root"] / f"reference-{case.command}"
        shutil.copytree(registry, reference)
        Cli(reference)(*commands(world, reference.with_name(reference.name + "-out"))[case.command])
        world["reference"][case.command] = rows(reference, blobs), tree(reference.with_name(reference.name + "-out"))
    after, expected_out = world["reference"][case.command]

    run_killed(registry, args, case)

    state = rows(registry, blobs)
    assert state in (before, after), "a half-written change"
    if case.committed is not None and before != after:
        assert (state == after) == case.committed, f"after {case.point} the change should {'' if case.committed else 'not '}be recorded"
    check_consistent(cli)
    if case.command.startswith("export"):
        assert tree(out) in ({}, expected_out), "a partial export folder"

    if state == before or case.command in ("export", "export-merged", "gc"):
        cli(*args)  # re-running the command succeeds
    elif case.command == "add-task":
        assert "already exists" in cli(*args, code=6).stderr
    elif case.command == "learn":  # the same inputs: the version it made, not a second training
        assert cli.json(*args)["reused"] is True
    else:  # a committed fuse re-run is refused: it would fuse the task a second time
        assert "already in line" in cli(*args, code=6).stderr
    assert rows(registry, blobs) == after
    check_consistent(cli)
    if case.command.startswith("export"):
        assert tree(out) == expected_out
        assert not list(out.parent.glob(".out.kifmerge-tmp-*")), "the killed export's build folder is gone"
    check_gc_cleans(cli)


def distinct(cases: list[Case]) -> int:
    return len({c.id for c in cases})


def test_the_matrix_is_big_enough():
    # (45: the 25 kills after a measured delay are gone, replaced by the named block points)
    assert distinct(CI_CASES) >= 20 and distinct(CI_CASES + SLOW_CASES) >= 45


@pytest.mark.parametrize("case", CI_CASES, ids=[c.id for c in CI_CASES])
def test_killed_command_leaves_a_consistent_registry(world, case, tmp_path):
    crash_and_recover(world, case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c.id for c in SLOW_CASES])
def test_killed_command_leaves_a_consistent_registry_slow(world, case, tmp_path):
    crash_and_recover(world, case, tmp_path)


def test_fault_point_is_inert_unless_named(tmp_path, monkeypatch):
    """The hook must never fire in normal use (another point's name, or an unreached hit count)."""
    from kifmerge import faults

    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(FAULT, "some.other-point")
    faults.fault_point("catalog.committed")
    monkeypatch.setenv(FAULT, "catalog.committed#3")
    faults.fault_point("catalog.committed")
    faults.fault_point("catalog.committed")
    assert faults._hits["catalog.committed"] == 2
