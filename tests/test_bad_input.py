"""Bad input: each case is one clear line on stderr with its documented exit code, and the
registry's listings are unchanged afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import LORA_TARGETS, T5_TARGETS, build_llama, make_lora, write_profile
from test_fuse_export import designed_scores, unit_groups


@pytest.fixture
def world(cli, tmp_path, llama_dir, t5_dir):
    """A registry with a base, one fused task, and a set of good and bad files on disk."""
    good = make_lora(llama_dir, tmp_path / "good", 1, LORA_TARGETS)
    groups = unit_groups(good, "lora")
    scores = designed_scores(groups, {0, 1, 2}, 1.0)[0]
    write_profile(tmp_path / "good.safetensors", scores, "lora-rank")
    cli("base", "add", "llama", llama_dir)
    cli("base", "add", "t5", t5_dir)
    cli("add-task", "t1", good, "--base", "llama", "--profile", tmp_path / "good.safetensors")
    cli("fuse", "t1", "--into", "main")
    cli("add-task", "noprofile", make_lora(llama_dir, tmp_path / "np", 3, LORA_TARGETS), "--base", "llama")

    files = {"good": good, "good_profile": tmp_path / "good.safetensors"}
    files["t5_adapter"] = make_lora(t5_dir, tmp_path / "t5a", 2, T5_TARGETS)
    wide = build_llama(tmp_path / "wide-base")
    config = json.loads((wide / "config.json").read_text())
    files["wide_adapter"] = make_lora(_resized_llama(tmp_path, config), tmp_path / "wide", 2, LORA_TARGETS)
    nan = tmp_path / "nan"
    shutil.copytree(good, nan)
    tensors = load_file(nan / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    files["nan_adapter"] = nan
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    files["pickled_adapter"] = pickled
    missing_key = dict(scores)
    missing_key.pop(groups[0][0])
    files["profile_missing"] = write_profile(tmp_path / "p-missing.safetensors", missing_key, "lora-rank")
    files["profile_extra"] = write_profile(tmp_path / "p-extra.safetensors", {**scores, "nope.q_proj": [1.0] * 4}, "lora-rank")
    files["profile_length"] = write_profile(tmp_path / "p-len.safetensors", {**scores, groups[0][0]: [1.0] * 3}, "lora-rank")
    files["profile_unit"] = write_profile(tmp_path / "p-unit.safetensors", scores, "tensor")
    files["profile_nan"] = write_profile(tmp_path / "p-nan.safetensors", {**scores, groups[0][0]: [float("nan")] * 4}, "lora-rank")
    (tmp_path / "p-junk.safetensors").write_bytes(b"junk")
    files["profile_junk"] = tmp_path / "p-junk.safetensors"
    return files


def _resized_llama(tmp_path: Path, config: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")},
                            "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 4})
    folder = tmp_path / "resized"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def snapshot(cli) -> list:
    return [cli.json("list", what) for what in ("tasks", "lines", "versions", "bases")]


BAD = [
    ("missing checkpoint", ["add-task", "x", "{tmp}/absent", "--base", "llama"], 3, "not found"),
    ("missing profile file", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{tmp}/absent.safetensors"], 3, "profile file not found"),
    ("unknown base", ["add-task", "x", "{good}", "--base", "nobase"], 3, "base 'nobase' not found"),
    ("adapter for another architecture", ["add-task", "x", "{t5_adapter}", "--base", "llama"], 4, "another architecture"),
    ("shape mismatch", ["add-task", "x", "{wide_adapter}", "--base", "llama"], 4, "has shape"),
    ("NaN in weights", ["add-task", "x", "{nan_adapter}", "--base", "llama"], 4, "NaN"),
    ("pickle weights", ["add-task", "x", "{pickled_adapter}", "--base", "llama"], 4, "never read"),
    ("profile missing keys", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_missing}"], 4, "no scores for"),
    ("profile extra keys", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_extra}"], 4, "does not have"),
    ("profile wrong length", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_length}"], 4, "expected 1-D of length 4"),
    ("profile wrong unit", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_unit}"], 4, "units"),
    ("profile NaN", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_nan}"], 4, "NaN"),
    ("profile not safetensors", ["add-task", "x", "{good}", "--base", "llama", "--profile", "{profile_junk}"], 4, "not a safetensors"),
    ("duplicate task", ["add-task", "t1", "{good}", "--base", "llama"], 6, "already exists"),
    ("invalid name", ["add-task", "bad/name", "{good}", "--base", "llama"], 2, "invalid task name"),
    ("unknown task", ["fuse", "nosuch", "--into", "main"], 3, "task 'nosuch' not found"),
    ("task without profile, a rule that reads one", ["fuse", "noprofile", "--into", "main", "--method", "kif"], 4,
     "no importance profile, which --method kif reads; fuse it with a rule that reads none (task-arithmetic, ties"),
    ("bad weights option", ["fuse", "t1", "--into", "main", "--weights", "0.3,0.7"], 2, "--weights"),
    ("weights not a mix", ["fuse", "t1", "--into", "main", "--weights", "0.9,0.9,0.5"], 2, "must sum to 1"),
    ("top out of range", ["fuse", "t1", "--into", "main", "--method", "kif", "--top", "1.5"], 2, "top"),
    ("unknown method", ["fuse", "t1", "--into", "main", "--method", "magic"], 2, "method"),
    ("no target modules", ["train", "x", "--data", "{tmp}/none.jsonl", "--line", "main", "--target-modules", ","], 2,
     "--target-modules: name at least one module"),
    ("unknown line", ["history", "nosuch"], 3, "line 'nosuch' not found"),
    ("unknown version", ["export", "main@v9", "{tmp}/out"], 3, "main@v9 not found"),
    ("unknown line export", ["export", "nosuch", "{tmp}/out"], 3, "not found"),
    ("bad reference", ["show", "main@v1@v2"], 2, "LINE@vN"),
    ("unknown alias", ["show", "main@latest"], 3, "no alias 'latest'"),
]


@pytest.mark.parametrize("label,args,code,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_changes_nothing(cli, world, tmp_path, label, args, code, message):
    before = snapshot(cli)
    values = {k: str(v) for k, v in world.items()} | {"tmp": str(tmp_path)}
    result = cli(*[a.format(**values) for a in args], code=code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kifmerge: error:"), result.stderr
    assert message in lines[0]
    assert snapshot(cli) == before
    assert not (tmp_path / "out").exists()


def test_fusing_a_task_into_a_line_of_another_kind_is_refused(cli, world, tmp_path, llama_dir):
    from conftest import make_full

    full = make_full(llama_dir, tmp_path / "full", 4)
    cli("add-task", "f", full, "--base", "llama",
        "--profile", write_profile(tmp_path / "pf.safetensors", {k: [1.0] for k, _ in unit_groups(full, "full")}, "tensor"))
    before = snapshot(cli)
    result = cli("fuse", "f", "--into", "main", code=4)
    assert "holds lora versions" in result.stderr
    assert snapshot(cli) == before


def test_corrupt_blob_is_detected_and_nothing_is_written(cli, world, tmp_path):
    from kifmerge.registry import Registry

    reg = Registry.open(cli.registry)
    weights = reg.manifest(reg.catalog.head("main")["weights"])["files"]["adapter_model.safetensors"]
    reg.close()
    path = cli.registry / "blobs" / weights[:2] / weights[2:]
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(cli)
    result = cli("export", "main", tmp_path / "out", code=5)
    assert "corrupt" in result.stderr and "kifmerge verify" in result.stderr
    assert snapshot(cli) == before and not (tmp_path / "out").exists()


def test_no_registry_says_how_to_create_one(tmp_path):
    from conftest import Cli

    result = Cli(tmp_path / "nowhere")("list", code=3)
    assert "kifmerge init" in result.stderr


def test_registry_location_precedence(tmp_path, monkeypatch):
    """--registry beats KIFMERGE_REGISTRY, which beats ./registry."""
    from typer.testing import CliRunner

    from kifmerge.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--json"]).exit_code == 0
    assert (tmp_path / "registry" / "kifmerge.db").is_file()
    monkeypatch.setenv("KIFMERGE_REGISTRY", str(tmp_path / "from-env"))
    assert json.loads(runner.invoke(app, ["init", "--json"]).stdout)["registry"] == str(tmp_path / "from-env")
    explicit = json.loads(runner.invoke(app, ["init", "--json", "--registry", str(tmp_path / "flag")]).stdout)
    assert explicit["registry"] == str(tmp_path / "flag")


def test_verify_reports_a_damaged_blob(cli, world):
    report = cli.json("verify")
    assert report["ok"] and report["blobs_checked"] >= 5
    sha = cli.json("show", "t1")["profile"]["scores"]
    path = cli.registry / "blobs" / sha[:2] / sha[2:]
    path.unlink()
    result = cli("verify", "--json", code=5)
    assert "missing" in result.stderr and "profiles:t1.scores" in result.stderr
    details = json.loads(result.stdout)
    assert details["problems"] == [{"blob": sha, "problem": "missing", "needed_by": ["profiles:t1.scores"]}]
