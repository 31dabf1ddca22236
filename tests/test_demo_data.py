"""The demo's data ships with the repository (fast, no model): examples/demo.py resolves its
files inside the checkout and they load with load_records; the vendored files are the ones
examples/data/README.md lists; the demo's line and task names are not the quick start's."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
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
    folder = REPO / "examples" / "data" / "long_sequence"
    rows = re.findall(r"^\| `(\w+/\w+\.jsonl\.gz)` \| (\d+) \| ([\d,]+) \| [\d,]+ \| `([0-9a-f]{64})` \|$",
                      (REPO / "examples" / "data" / "README.md").read_text(), re.M)
    listed = {name: (int(count), int(size.replace(",", "")), sha) for name, count, size, sha in rows}
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(listed) == on_disk and len(on_disk) == 8
    for name, (count, size, sha) in listed.items():
        raw = (folder / name).read_bytes()
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, sha), name
        assert len(load_records(folder / name)) == count, name
