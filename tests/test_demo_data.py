"""The demo's data ships with the repository (fast, no model): examples/demo.py resolves its
files inside the checkout and they load with load_records; the vendored files are the ones
examples/data/README.md lists; the demo's line and task names are not the quick start's; the
held-out sequence examples/data/heldout/sequence.json loads with its own validation files."""

from __future__ import annotations

import gzip
import hashlib
import json
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kifmerge.data import load_records

REPO = Path(__file__).resolve().parent.parent


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    with pytest.MonkeyPatch.context() as patch:   # importing must not run main (which would call the CLI)
        patch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("importing examples/demo.py ran a command"))
        return load_module(REPO / "examples" / "demo.py", "kifmerge_demo_under_test")


def test_demo_data_resolves_inside_the_checkout_and_loads(demo):
    assert demo.DATA.is_relative_to(REPO) and demo.DATA.is_dir(), demo.DATA
    assert "shared" not in demo.DATA.relative_to(REPO).parts
    assert demo.TASKS == ["agnews", "dbpedia"]
    for task in demo.TASKS:
        train, dev = demo.train_file(task), demo.dev_file(task)
        assert train.resolve().is_relative_to(REPO) and dev.resolve().is_relative_to(REPO)
        records = load_records(train)
        assert len(records) == 1000 and len(load_records(dev)) == 500
        assert all(r["input"].strip() and r["output"].strip() for r in records)


def test_demo_names_do_not_collide_with_the_quick_starts(demo):
    quickstart = load_module(REPO / "scripts" / "run_quickstart.py", "kifmerge_quickstart_under_test")
    commands = " ".join(quickstart.quickstart_commands())
    lines = set(re.findall(r"--into (\S+)", commands)) | set(re.findall(r"kifmerge (?:history|eval|export|report) (\S+)", commands))
    tasks = set(re.findall(r"kifmerge learn (\S+)", commands))
    assert lines and tasks
    demo_tasks = {f"{demo.LINE}-{task}" for task in demo.TASKS}
    assert demo.LINE not in lines | tasks and not demo_tasks & (lines | tasks)
    # examples/quickstart_tiny.py names its line demo-<time> and its tasks a-<time>, b-<time>
    assert not demo.LINE.startswith(("demo-", "a-", "b-")) and not any(t.startswith(("demo-", "a-", "b-")) for t in demo_tasks)


def test_vendored_files_match_the_data_readme():
    folder = REPO / "examples" / "data"
    readme = (folder / "README.md").read_text()
    rows = re.findall(r"^\| `([\w/-]+\.jsonl\.gz)` \| (\d+) \| ([\d,]+) \| ([\d,]+) \| `([0-9a-f]{64})` \|$", readme, re.M)
    listed = {name: (int(count), int(size.replace(",", "")), int(plain.replace(",", "")), sha)
              for name, count, size, plain, sha in rows}
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jsonl.gz"))
    assert sorted(listed) == on_disk and len(on_disk) == 8 + 9   # long_sequence: 4 tasks × 2; heldout: 3 × 3
    for name, (count, size, plain, sha) in listed.items():
        raw = (folder / name).read_bytes()
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, sha), name
        assert len(gzip.decompress(raw)) == plain, name
        assert len(load_records(folder / name)) == count, name
    total = re.search(r"^\| \*\*total\*\* \| (\d+) \| \*\*([\d,]+)\*\* \| ([\d,]+) \| \|$", readme, re.M)
    assert total and tuple(int(v.replace(",", "")) for v in total.groups()) == tuple(
        sum(row[i] for row in listed.values()) for i in range(3))


def test_the_heldout_sequence_loads_with_its_own_validation_files(monkeypatch):
    """examples/data/heldout/sequence.json, a user's kind of sequence (none of orders 4–6), loads
    through continual.py's reader with train, dev and val for every task; val is disjoint from dev
    and train (by id from dev; by input from train too, as the benchmark numbers ids per split)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))   # continual.py imports `common` from its folder
    had_common = "common" in sys.modules
    spec = importlib.util.spec_from_file_location("kifmerge_continual_under_test", REPO / "benchmarks" / "continual.py")
    continual = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, continual)   # its dataclasses look their module up there
    try:
        spec.loader.exec_module(continual)
    finally:
        if not had_common:
            sys.modules.pop("common", None)
    name, tasks = continual.sequence_from_file(REPO / "examples" / "data" / "heldout" / "sequence.json")
    assert name == "heldout" and [t.name for t in tasks] == ["sst-2", "mnli", "qqp"]
    assert not {t.name for t in tasks} & {"agnews", "amazon", "dbpedia", "yahoo"}
    for task in tasks:
        assert task.val is not None
        train, dev, val = (load_records(f) for f in (task.train, task.dev, task.val))
        assert task.val.resolve().is_relative_to(REPO) and (len(train), len(dev), len(val)) == (1000, 300, 100), task.name
        ids = {f: [json.loads(line)["id"] for line in gzip.decompress(f.read_bytes()).splitlines()]  # load_records keeps no ids
               for f in (task.dev, task.val)}
        assert len(set(ids[task.val])) == len(val) and not set(ids[task.val]) & set(ids[task.dev]), task.name
        val_inputs = {r["input"] for r in val}
        assert not val_inputs & {r["input"] for r in dev} and not val_inputs & {r["input"] for r in train}, task.name
