"""Integrity: `kifmerge verify --deep` re-hashes every blob and checks every stored profile
against the unit layout of its weights, so a single flipped byte in any blob of any kind, or a
profile row pointing at the wrong scores, is reported (exit 5, one line naming blob and row)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, Cli, make_full, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups

# every kind of blob a registry holds; the test fails when one of them is not covered
KINDS = {
    "manifest", "base copy: model.safetensors", "base copy: config.json", "base copy: tokenizer",
    "lora task: adapter_model.safetensors", "lora task: adapter_config.json",
    "full task: model.safetensors", "full task: config.json",
    "fused version: adapter_model.safetensors", "task profile", "version profile", "evaluation predictions",
}


@pytest.fixture(scope="module")
def stocked(tmp_path_factory, llama_dir) -> Cli:
    """A registry holding every blob kind: a copied base, LoRA and full tasks with profiles, a
    fused (not just copied) version, its accumulated profile, and stored eval predictions."""
    tmp = tmp_path_factory.mktemp("integrity")
    cli = Cli(tmp / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir, "--copy")
    for i, hot in ((1, {0, 1, 2}), (2, {5, 6, 7})):
        adapter = make_lora(llama_dir, tmp / f"a{i}", i, LORA_TARGETS)
        profile = write_profile(tmp / f"p{i}.safetensors", designed_scores(unit_groups(adapter, "lora"), hot, 1.0)[0], "lora-rank")
        cli("add-task", f"t{i}", adapter, "--base", "llama", "--profile", profile)
        cli("fuse", f"t{i}", "--into", "main")
    full = make_full(llama_dir, tmp / "full", 3)
    groups = unit_groups(full, "full")
    cli("add-task", "f1", full, "--base", "llama", "--profile",
        write_profile(tmp / "pf.safetensors", {k: [float(j % 5)] for j, (k, _) in enumerate(groups)}, "tensor"))
    data = write_jsonl(tmp / "parity.jsonl", task_records("parity", 4))
    cli("eval", "main@v2", "--data", f"parity={data}", "--max-examples", "2", "--max-new-tokens", "2")
    return cli


def blob_kinds(registry: Path) -> dict[str, set[str]]:
    """sha → the kinds of blob it is, read from the catalog and the weight manifests."""
    db = sqlite3.connect(registry / "kifmerge.db")
    kinds: dict[str, set[str]] = {}

    def add(sha, kind):
        kinds.setdefault(sha, set()).add(kind)

    def manifest(sha, owner):
        add(sha, "manifest")
        for name, blob in json.loads(((registry / "blobs" / sha[:2] / sha[2:]).read_text()))["files"].items():
            add(blob, f"{owner}: {'tokenizer' if 'token' in name else name}")

    for (sha,) in db.execute("select weights from bases where weights is not null"):
        manifest(sha, "base copy")
    for sha, kind in db.execute("select weights, kind from tasks"):
        manifest(sha, f"{kind} task")
    for (sha,) in db.execute("select scores from profiles"):
        add(sha, "task profile")
    for sha, profile, parent in db.execute("select weights, profile, parent from versions"):
        manifest(sha, "fused version" if parent else "first version")
        add(profile, "version profile")
    for (sha,) in db.execute("select predictions from evaluations"):
        add(sha, "evaluation predictions")
    db.close()
    return kinds


def flip(path: Path, position: int) -> bytes:
    """Flip one byte in a (read-only, 0444) blob; returns the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[position] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return original


def restore(path: Path, original: bytes) -> None:
    path.write_bytes(original)
    path.chmod(0o444)


def test_a_healthy_registry_verifies_deep(stocked):
    report = stocked.json("verify", "--deep")
    tasks_with_profiles = sum(1 for t in stocked.json("list", "tasks") if t["profile"])
    assert report["ok"] and report["deep"]
    assert report["profiles_checked"] == tasks_with_profiles + len(stocked.json("list", "versions")) == 5
    assert report["blobs_checked"] == len(blob_kinds(stocked.registry))


def test_one_flipped_byte_in_any_blob_is_detected(stocked):
    """Every blob in the store, each corrupted in turn (a byte in the middle, then the last
    byte): `verify --deep` exits 5 with one line naming the blob and a row that needs it."""
    kinds = blob_kinds(stocked.registry)
    assert set().union(*kinds.values()) >= KINDS, sorted(KINDS - set().union(*kinds.values()))
    detected = set()
    for sha, labels in sorted(kinds.items()):
        path = stocked.registry / "blobs" / sha[:2] / sha[2:]
        for position in (path.stat().st_size // 2, -1):
            original = flip(path, position)
            try:
                result = stocked("verify", "--deep", "--json", code=5)
            finally:
                restore(path, original)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("kifmerge: error:"), result.stderr
            assert sha[:12] in lines[0] and "corrupt" in lines[0] and "needed by " in lines[0], (labels, lines[0])
            problems = json.loads(result.stdout)["problems"]
            assert [(p["blob"], p["problem"]) for p in problems] == [(sha, "corrupt")], (labels, problems)
        detected |= labels
    assert detected >= KINDS
    assert stocked.json("verify", "--deep")["ok"]  # every blob was restored


def test_a_profile_row_pointing_at_the_wrong_scores_is_found_only_by_deep(stocked):
    """A profile blob that is intact but scores another layout (here: the full task's scores
    recorded for a LoRA task): plain verify cannot see it, --deep names the row."""
    db = sqlite3.connect(stocked.registry / "kifmerge.db")
    (good,) = db.execute("select scores from profiles where task = 't1'").fetchone()
    (other,) = db.execute("select scores from profiles where task = 'f1'").fetchone()
    with db:
        db.execute("update profiles set scores = ? where task = 't1'", [other])
    try:
        assert stocked.json("verify")["ok"]
        result = stocked("verify", "--deep", "--json", code=5)
        assert "unit layout" in result.stderr and "profiles:t1.scores" in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
        assert [p["needed_by"] for p in json.loads(result.stdout)["problems"]] == [["profiles:t1.scores"]]
    finally:
        with db:
            db.execute("update profiles set scores = ? where task = 't1'", [good])
        db.close()
    assert stocked.json("verify", "--deep")["ok"]


def test_plain_verify_finds_a_missing_and_a_changed_blob(stocked):
    """The cheap check still catches what happens in practice: a deleted blob, a rewritten one."""
    sha = stocked.json("show", "t2")["profile"]["scores"]
    path = stocked.registry / "blobs" / sha[:2] / sha[2:]
    original = flip(path, 0)
    try:
        result = stocked("verify", code=5)
        assert sha[:12] in result.stderr and "corrupt" in result.stderr
        path.unlink()
        result = stocked("verify", code=5)
        assert sha[:12] in result.stderr and "missing" in result.stderr and "profiles:t2.scores" in result.stderr
    finally:
        restore(path, original)
    assert stocked.json("verify")["ok"]


def test_a_base_changed_in_place_is_noticed_and_a_nan_base_is_refused(cli, tmp_path, llama_dir):
    """The fingerprint covers config and tensor headers only; `base add` also records each weight file's sha256,
    so weights rewritten in place (same names and shapes) stop every command that reads the base (exit 5, one
    line) instead of silently changing what an immutable version exports. A file only touched is re-hashed and
    passes; a base copied into the registry falls back to its copy. A base holding NaN is refused."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder, copied = tmp_path / "base", tmp_path / "copied"
    shutil.copytree(llama_dir, folder)
    shutil.copytree(llama_dir, copied)
    cli("base", "add", "llama", folder)
    cli("base", "add", "kept", copied, "--copy")
    adapter = make_lora(llama_dir, tmp_path / "a", 1, LORA_TARGETS)
    for base in ("llama", "kept"):
        cli("add-task", f"t-{base}", adapter, "--base", base)
        cli("fuse", f"t-{base}", "--into", f"line-{base}")
    assert [b["weights_recorded"] for b in cli.json("list", "bases")] == [True, True]
    assert cli.json("verify")["bases_checked"] == 1, "the copied base is covered by the blob checks"
    cli("export", "line-llama", tmp_path / "before", "--merged")
    weights = folder / "model.safetensors"
    os.utime(weights)  # touched, not changed: re-hashed, still the registered weights
    cli("export", "line-llama", tmp_path / "touched", "--merged")
    assert cli.json("verify", "--deep")["ok"]

    for base_folder in (folder, copied):
        tensors = load_file(base_folder / "model.safetensors")
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] * 1.5
        save_file(tensors, base_folder / "model.safetensors", metadata={"format": "pt"})
    for args in (["export", "line-llama", tmp_path / "after", "--merged"], ["eval", "line-llama", "--data", f"p={write_jsonl(tmp_path / 'p.jsonl', task_records('parity', 2))}"],
                 ["verify"], ["verify", "--deep"]):
        refused = cli(*args, code=5)
        assert "base llama: weight file model.safetensors changed" in refused.stderr, (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "after").exists()
    cli("export", "line-kept", tmp_path / "kept", "--merged")  # read from the registry's copy
    assert torch.equal(load_file(tmp_path / "kept" / "model.safetensors")[name],
                       load_file(tmp_path / "before" / "model.safetensors")[name])

    nan = tmp_path / "nan"
    shutil.copytree(llama_dir, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors[name][0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    refused = cli("base", "add", "nan", nan, code=4)
    assert "NaN or infinite" in refused.stderr and "nan" not in {b["name"] for b in cli.json("list", "bases")}
