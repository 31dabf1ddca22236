"""Tiny models built in code and saved (kifmerge/testing.py), so the real `from_pretrained` paths
run; checkpoints and profiles written the way an outside tool would write them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from hypothesis import settings
from typer.testing import CliRunner

from kifmerge.cli import app
from kifmerge.testing import WORDS, build_llama, build_t5, task_records, write_jsonl  # noqa: F401  (the tests import them from here)

# Hypothesis profiles. Neither has a per-example deadline (machines here are busy: a deadline is
# a wall-clock threshold). "ci" is derandomized: every run draws the same examples, so a CI result
# does not depend on luck; it is loaded when $CI is set (or with --hypothesis-profile=ci). "dev",
# the default elsewhere, draws new examples each run; a failure prints its seed, and
# `pytest --hypothesis-seed=N tests/test_rules.py` draws the same examples again (or paste the
# printed @reproduce_failure blob above the test).
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

LORA_TARGETS = ["q_proj", "v_proj"]
T5_TARGETS = ["q", "v"]


def model_class(base_dir: Path):
    import transformers

    architecture = json.loads((base_dir / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture)


def make_lora(base_dir: Path, out: Path, seed: int, targets: list[str], r: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved by peft."""
    from peft import LoraConfig, get_peft_model

    model = model_class(base_dir).from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out)
    return out


def make_full(base_dir: Path, out: Path, seed: int) -> Path:
    """A "full fine-tune": every weight of the base nudged by seeded noise."""
    model = model_class(base_dir).from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def write_profile(path: Path, scores: dict[str, list[float]], unit: str) -> Path:
    """A profile file in the documented interchange format, written without kifmerge."""
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}
    save_file(tensors, str(path), metadata={"format": "kifmerge-profile", "version": "1", "unit": unit})
    return path


class Cli:
    """Run the real Typer app in-process against one registry."""

    def __init__(self, registry: Path):
        self.registry = registry
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(app, [*map(str, args), "--registry", str(self.registry)])
        assert result.exit_code == code, f"exit {result.exit_code} (wanted {code})\nstdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    runner = Cli(tmp_path / "registry")
    runner("init")
    return runner


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory) -> Path:
    return build_t5(tmp_path_factory.mktemp("t5") / "base")


@pytest.fixture
def parity_line(cli, tmp_path, llama_dir) -> dict[str, Path]:
    """Base `llama` and a line `main` whose v1 is the parity task learned in 2 steps; returns the
    data files of two tasks, {"parity", "vowel"} (16 records each)."""
    data = {"parity": write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 16)),
            "vowel": write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 16, seed=1))}
    cli("base", "add", "llama", llama_dir)
    cli("learn", "parity", "--data", data["parity"], "--into", "main", "--base", "llama", "--max-steps", "2")
    return data
