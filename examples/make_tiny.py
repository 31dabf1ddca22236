"""Make everything the README quickstart needs, in seconds and without any download:

    python examples/make_tiny.py tiny

writes into `tiny/`
- `model/`: a tiny Llama-style causal LM (2 layers, hidden size 32, random weights) with a
  small BPE tokenizer trained on the tasks' words, as `save_pretrained` writes it;
- `parity.jsonl`, `vowel.jsonl` (training) and `parity-dev.jsonl`, `vowel-dev.jsonl`
  (evaluation): two synthetic tasks in kifmerge's data format, one `{"input", "output"}`
  record per line.

The model is far too small to learn the tasks well; it exists to show the workflow.
Safe to run again: existing files are kept.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = "one two three four five six seven eight nine ten".split()
FRUIT = "apple banana cherry grape lemon mango melon olive peach pear plum orange egg ice umbrella".split()


def records(task: str, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "parity":
            k = rng.randrange(10)
            out.append({"input": f"Is the number {NUMBERS[k]} even or odd?\n\nAnswer:", "output": "odd" if k % 2 == 0 else "even"})
        else:
            word = rng.choice(FRUIT)
            out.append({"input": f"Does the word {word} start with a vowel? Answer yes or no.\n\nAnswer:",
                        "output": "yes" if word[0] in "aeiou" else "no"})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return
    corpus = [r["input"] + " " + r["output"] for task in ("parity", "vowel") for r in records(task, 100, 7)]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=160, special_tokens=["[PAD]", "[EOS]", "[BOS]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                            unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def main(out: str = "tiny") -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    build_model(root / "model")
    for seed, task in enumerate(("parity", "vowel")):
        write_jsonl(root / f"{task}.jsonl", records(task, 64, seed))
        write_jsonl(root / f"{task}-dev.jsonl", records(task, 20, 100 + seed))
    print(f"tiny model in {root / 'model'}; data: " + ", ".join(sorted(p.name for p in root.glob("*.jsonl"))))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A tiny Llama (+ tokenizer) and two small JSONL tasks, in seconds.")
    parser.add_argument("out", nargs="?", default="tiny", help="the folder to write (default: tiny)")
    main(parser.parse_args().out)
