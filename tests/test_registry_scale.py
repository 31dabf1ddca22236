"""The registry at scale (issue 14), at a CI-sized scale: the read commands never import the
deep-learning stack, the index migration upgrades an existing registry in place and keeps its
data, a line's event log is found through the index without catching other lines' events,
and `list` keeps its table short while --json stays complete. Timings live only in
benchmarks/registry_scale.py."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, Cli, make_lora, write_profile
from test_fuse_export import designed_scores, unit_groups

from kifmerge import api
from kifmerge.registry import Registry
from kifmerge.registry.catalog import INDEX_MIGRATIONS, MIGRATIONS, Catalog, migration_set

HEAVY = ("torch", "transformers", "peft", "safetensors.torch")
# not heavy in itself, but it imports pandas and numpy when they are installed (~0.3 s per command)
SLOW_TO_IMPORT = ("sqlite_utils", "pandas")
NEW_INDEXES = {"idx_versions_task", "idx_events_subject", "idx_tasks_created"}
TASKS, LINES, VERSIONS_PER_LINE = 300, 3, 20


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, llama_dir) -> Path:
    """Two real LoRA tasks fused into line `l0` (v1, v2) through the CLI, an alias and its
    move, then copies of those rows (same blobs) up to 300 tasks and 3 lines of 20 versions."""
    folder = tmp_path_factory.mktemp("scaled")
    cli = Cli(folder / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    for seed in (1, 2):
        adapter = make_lora(llama_dir, folder / f"t{seed}", seed, LORA_TARGETS)
        profile = write_profile(folder / f"p{seed}.safetensors", designed_scores(unit_groups(adapter, "lora"), {seed}, 1.0)[0], "lora-rank")
        cli("add-task", f"real{seed}", adapter, "--base", "llama", "--profile", profile, *(["--line", "l0"] if seed == 2 else []))
        cli("fuse", f"real{seed}", "--into", "l0")
    cli("alias", "set", "l0@v1", "champion")
    cli("alias", "set", "l0@v2", "champion")
    reg = Registry.open(folder / "registry")
    catalog = reg.catalog
    task, profile = catalog.get("tasks", "real2", "task"), catalog.get("profiles", "real2", "profile")
    first, second = catalog.version("l0", 1), catalog.version("l0", 2)
    with catalog.transaction():
        for i in range(TASKS - 2):
            catalog.insert("tasks", {**task, "name": f"task{i:04d}", "created": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000+00:00"})
            catalog.insert("profiles", {**profile, "task": f"task{i:04d}"})
            catalog.event("task.add", f"task{i:04d}", {"kind": "lora", "source": task["source"], "profile": "external"})
        number = 0
        for line in range(LINES):
            name = f"l{line}"
            if line:
                catalog.insert("lines", {**catalog.get("lines", "l0", "line"), "name": name})
                catalog.event("line.create", name, {"base": "llama", "kind": "lora"})
            for n in range(1 if line else 3, VERSIONS_PER_LINE + 1):
                template = first if n == 1 else second
                row = {k: v for k, v in template.items() if k != "id"}
                catalog.insert("versions", {**row, "line": name, "number": n, "parent": n - 1 or None, "task": f"task{number:04d}"})
                catalog.event("fuse", f"{name}@v{n}", {"task": f"task{number:04d}", "method": row["method"], "params": row["params"]})
                number += 1
            catalog.set_alias(name, "champion", VERSIONS_PER_LINE // 2)
            catalog.set_alias(name, "champion", VERSIONS_PER_LINE)
    reg.close()
    return folder / "registry"


def imported(registry: Path, *args: str) -> set[str]:
    """The modules one `kifmerge` command imports, in a fresh process (python -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "kifmerge", *args, "--registry", str(registry)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {row.split("|")[-1].strip() for row in done.stderr.splitlines() if row.startswith("import time:")}


@pytest.mark.parametrize("args", [
    ["list"], ["list", "tasks"], ["list", "versions", "--json"], ["list", "lines"], ["history", "l1"],
    ["history", "l1", "--events"], ["show", "task0005"], ["show", "real2"], ["show", "l1"], ["show", "l0@v2"],
    ["show", "l1@champion"], ["alias", "set", "l1@v3", "staging"], ["alias", "list"], ["alias", "rm", "l1@staging"],
], ids=" ".join)
def test_registry_commands_do_not_import_the_deep_learning_stack(scaled, args, tmp_path):
    if args[0] == "alias" and args[1] != "list":  # a write: on a copy of its own, with the alias `rm` removes
        shutil.copytree(scaled, tmp_path / "registry")
        scaled = tmp_path / "registry"
        if args[1] == "rm":
            Cli(scaled)("alias", "set", "l1@v3", "staging")
    modules = imported(scaled, *args)
    assert "kifmerge.cli" in modules
    assert not modules & set(HEAVY), f"`kifmerge {' '.join(args)}` imported {sorted(modules & set(HEAVY))}"
    assert not modules & set(SLOW_TO_IMPORT), f"`kifmerge {' '.join(args)}` imported {sorted(modules & set(SLOW_TO_IMPORT))}"


def test_the_scaled_registry_reads_back_whole_and_verifies(scaled):
    cli = Cli(scaled)
    tasks = cli.json("list", "tasks")
    assert len(tasks) == TASKS and all(t["profile"] for t in tasks)
    assert [t["created"] for t in tasks] == sorted(t["created"] for t in tasks), "oldest first"
    assert len(cli.json("list", "versions")) == LINES * VERSIONS_PER_LINE
    lines = cli.json("list", "lines")
    assert [(line["name"], line["head"], len(line["tasks"]), line["aliases"]) for line in lines] == [
        (f"l{i}", f"v{VERSIONS_PER_LINE}", VERSIONS_PER_LINE, {"champion": f"v{VERSIONS_PER_LINE}"}) for i in range(LINES)]
    assert cli.json("show", "task0003")["fused_into"] == ["l0@v6"]  # l0 starts at v3 (v1, v2: real1, real2)
    assert cli.json("show", "real2")["fused_into"] == ["l0@v2"]
    moves = [e["details"] for e in cli.json("history", "l1", "--events") if e["subject"] == "l1@champion"]
    assert [(m["from"], m["to"]) for m in moves] == [(None, 10), (10, 20)]
    assert cli.json("verify")["ok"]


def test_list_shows_the_last_rows_in_the_table_and_everything_as_json(scaled):
    cli = Cli(scaled)
    table = cli("list", "tasks")
    assert "tasks: only the last 100 shown; --limit 0 shows all" in table.stderr
    assert "task0199" not in table.stdout and "task0200" in table.stdout and "real2" in table.stdout, "the newest tasks"
    assert table.stdout.count("│ task0") == 98
    assert "task0000" in cli("list", "tasks", "--limit", "0").stdout
    assert len(cli.json("list", "tasks")) == TASKS, "--json is complete by default"
    assert [t["name"] for t in cli.json("list", "tasks", "--limit", "3")] == ["task0297", "real1", "real2"]
    assert "shown" not in cli("list", "lines").stderr, "nothing left out, no note"
    assert "shown" not in cli("list", "tasks", "--limit", str(TASKS)).stderr
    assert "only the last 299 shown" in cli("list", "tasks", "--limit", str(TASKS - 1)).stderr
    assert [v["version"] for v in cli.json("list", "versions", "--limit", "2")] == [f"l2@v{VERSIONS_PER_LINE - 1}", f"l2@v{VERSIONS_PER_LINE}"]
    assert [line["name"] for line in cli.json("list", "lines", "--limit", "2")] == ["l1", "l2"]
    assert api.list_items("tasks", limit=2, registry=scaled) == cli.json("list", "tasks")[-2:]
    assert len(cli.json("list")["tasks"]) == TASKS


def test_a_lines_event_log_is_its_own_and_read_through_the_index(tmp_path):
    reg, _ = Registry.init(tmp_path / "r")
    catalog = reg.catalog
    with catalog.transaction():
        for subject in ("m", "m@v1", "m@champion", "m2@v1", "m2", "mA", "m@", "n@v1", "l@v1", "mz@v1"):
            catalog.event("test", subject)
    assert [e["subject"] for e in catalog.line_events("m")] == ["m", "m@v1", "m@champion", "m@"]
    plan = " ".join(str(row) for row in catalog.conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM events WHERE subject = ? OR (subject >= ? AND subject < ?) ORDER BY id", ["m", "m@", "mA"]))
    assert "idx_events_subject" in plan, plan


def _legacy_registry(root: Path) -> None:
    """A registry as kifmerge made it before the index migration, with rows in every table."""
    root.mkdir()
    catalog = Catalog(root)
    catalog.db.enable_wal()
    migration_set().apply(catalog.db, stop_before=min(INDEX_MIGRATIONS))  # the first additive one, and all after it
    with catalog.transaction():
        catalog.insert("bases", {"name": "b", "path": "/x", "architecture": "A", "fingerprint": "f", "created": "t0"})
        for i in range(50):
            catalog.insert("tasks", {"name": f"t{i}", "base": "b", "kind": "lora", "weights": f"w{i}", "created": f"t{i:03d}"})
            catalog.event("task.add", f"t{i}", {"kind": "lora"})
        catalog.insert("lines", {"name": "l", "base": "b", "kind": "lora", "created": "t0"})
        for n in range(1, 11):
            catalog.insert("versions", {"line": "l", "number": n, "task": f"t{n}", "method": "kif", "params": {"top": 0.2},
                                        "weights": f"v{n}", "profile": f"p{n}", "created": f"t{n:03d}"})
            catalog.event("fuse", f"l@v{n}", {"task": f"t{n}"})
        catalog.set_alias("l", "champion", 3)
    catalog.close()
    (root / "blobs").mkdir()


def _snapshot(root: Path) -> tuple[set[str], dict[str, list]]:
    db = sqlite3.connect(root / "kifmerge.db")
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    tables = {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
              for t in ("bases", "tasks", "lines", "versions", "aliases", "events")}
    applied = [row[0] for row in db.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]
    db.close()
    return indexes, {**tables, "_migrations": applied}


@pytest.mark.parametrize("upgrade", ["open", "init"])
def test_the_index_migration_upgrades_an_existing_registry_and_keeps_its_data(tmp_path, upgrade):
    root = tmp_path / "old"
    _legacy_registry(root)
    indexes, before = _snapshot(root)
    assert not indexes & NEW_INDEXES and "m005_indexes" not in before["_migrations"]
    cli = Cli(root)
    if upgrade == "init":
        cli("init")
    history = cli.json("history", "l")  # any command: a registry missing only indexes gets them when opened
    indexes, after = _snapshot(root)
    assert NEW_INDEXES <= indexes
    assert after["_migrations"] == before["_migrations"] + sorted(INDEX_MIGRATIONS) == [fn.__name__ for fn in MIGRATIONS]
    added = len(after["tasks"][0]) - len(before["tasks"][0])  # m006: tasks.validation, NULL on every old row
    assert added == 1 and all(row[-1] is None for row in after["tasks"])
    added = len(after["bases"][0]) - len(before["bases"][0])  # m007: bases.files, NULL: the old base is not checked
    assert added == 1 and all(row[-1] is None for row in after["bases"])
    after_old_columns = {**after, "tasks": [row[:-1] for row in after["tasks"]], "bases": [row[:-1] for row in after["bases"]]}
    assert {k: v for k, v in after_old_columns.items() if k != "_migrations"} == {k: v for k, v in before.items() if k != "_migrations"}
    assert [v["version"] for v in history] == [f"l@v{n}" for n in range(1, 11)]
    assert cli.json("show", "t5")["fused_into"] == ["l@v5"]
    cli("list")
    assert _snapshot(root) == (indexes, after), "applied once"


def test_a_registry_missing_more_than_indexes_still_asks_for_init(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    catalog = Catalog(root)
    migration_set().apply(catalog.db, stop_before="m004_base_hub")
    catalog.close()
    assert "run `kifmerge init` to upgrade it" in Cli(root)("list", code=5).stderr
    Cli(root)("init")
    assert Cli(root).json("list") == {"bases": [], "lines": [], "tasks": []}
