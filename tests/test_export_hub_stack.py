"""Exports drop into the Hugging Face stack as they are: an adapter folder loads with
`peft.AutoPeftModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
(the base's tokenizer files are copied in), names its base by hub id (+ commit) when the base
has one, else by absolute path; every exported file is mode 0644."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import torch

from conftest import LORA_TARGETS, make_lora, task_records, write_jsonl
from test_hub import COMMIT, HUB_ID, cache_model, offline  # noqa: F401 — `offline` is a fixture

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
IDS = [[2, 17, 33, 41, 9, 60, 11, 5]]


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def make_line(cli, tmp_path: Path, llama_dir: Path, base: str) -> None:
    adapter = make_lora(llama_dir, tmp_path / "adapter-in", 1, LORA_TARGETS)
    calib = write_jsonl(tmp_path / "calib.jsonl", task_records("parity", 4))
    cli("add-task", "t1", adapter, "--base", base, "--calibrate", calib, "--calibrate-batches", "1")
    cli("fuse", "t1", "--into", "line")


def test_adapter_and_merged_exports_load_with_auto_classes(cli, tmp_path, llama_dir):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli("base", "add", "tiny", llama_dir)
    make_line(cli, tmp_path, llama_dir, "tiny")
    out = tmp_path / "adapter"
    result = cli.json("export", "line", out)
    assert result["kind"] == "adapter" and TOKENIZER_FILES <= set(result["files"])
    assert "config.json" not in result["files"], "an adapter folder holds no model config"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == result["base_model_name_or_path"] == str(llama_dir.resolve())
    assert set(modes(out).values()) == {0o644}, modes(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("yes or no").input_ids == AutoTokenizer.from_pretrained(llama_dir)("yes or no").input_ids
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(torch.tensor(IDS)).logits, by_hand(torch.tensor(IDS)).logits)

    merged = tmp_path / "merged"
    result = cli.json("export", "line", merged, "--merged")
    assert result["kind"] == "model" and result["base_model_name_or_path"] is None
    assert TOKENIZER_FILES | {"config.json", "model.safetensors"} <= set(result["files"])
    assert set(modes(merged).values()) == {0o644}, modes(merged)
    AutoTokenizer.from_pretrained(merged)
    full = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(torch.tensor(IDS)).logits, by_hand(torch.tensor(IDS)).logits, rtol=1e-4, atol=1e-5)


def test_an_adapter_of_a_hub_base_names_the_hub_id_and_commit(cli, offline, tmp_path, llama_dir):  # noqa: F811
    """Loaded in a fresh process that sees only the (offline) hub cache: the export names the
    base by hub id and commit, so it loads wherever that model is cached or reachable."""
    cache_model(offline, llama_dir)
    cli("base", "add", "tiny", HUB_ID)
    make_line(cli, tmp_path, llama_dir, "tiny")
    out = tmp_path / "adapter"
    assert cli.json("export", "line", out)["base_model_name_or_path"] == HUB_ID
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (HUB_ID, COMMIT)
    assert set(modes(out).values()) == {0o644}

    script = f"""
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
with torch.no_grad():
    print(model(torch.tensor({IDS})).logits.shape, len(tokenizer("yes or no").input_ids) > 0)
"""
    env = {**os.environ, "HF_HOME": str(offline.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["torch.Size([1,", "8,", "160])", "True"]
