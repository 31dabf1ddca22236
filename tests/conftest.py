"""Tiny models built in code and saved, so the real `from_pretrained` paths run; checkpoints
and profiles written the way an outside tool would write them."""

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


VOCAB = 160
WORDS = ("apple banana cherry grape lemon mango melon olive peach pear plum river stone cloud storm "
         "red blue green yellow black white small large fast slow yes no even odd one two three four five "
         "six seven eight nine ten word number colour size answer is the a of what which does it start with vowel "
         "classify fruit weather").split()


def task_records(kind: str, n: int, seed: int = 0) -> list[dict]:
    """Small synthetic text-to-text tasks in the benchmark's {input, output} format."""
    import random

    rng = random.Random(seed)
    numbers = "one two three four five six seven eight nine ten".split()
    out = []
    for _ in range(n):
        if kind == "parity":
            k = rng.randrange(10)
            out.append({"input": f"Is the number {numbers[k]} even or odd?\n\nAnswer:", "output": "odd" if k % 2 == 0 else "even"})
        else:
            word = rng.choice(WORDS[:15])
            out.append({"input": f"Does the word {word} start with a vowel? Answer yes or no.\n\nAnswer:",
                        "output": "yes" if word[0] in "aeiou" else "no"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer trained on the synthetic tasks' words, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(WORDS)] * 4 + [r["input"] + " " + r["output"] for r in task_records("parity", 50) + task_records("vowel", 50)]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[EOS]", "[BOS]", "[UNK]"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]",
                                      bos_token="[BOS]", unk_token="[UNK]")
    wrapped.save_pretrained(folder)


def build_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def build_t5(folder: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


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
