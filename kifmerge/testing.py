"""Tiny models and synthetic tasks built in code, for the tests and benchmarks: no download,
a few seconds on a CPU. The models are saved with `save_pretrained`, so the real
`from_pretrained` paths run on them. torch, transformers and tokenizers are imported inside the
functions: importing this module costs nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 160
WORDS = ("apple banana cherry grape lemon mango melon olive peach pear plum river stone cloud storm "
         "red blue green yellow black white small large fast slow yes no even odd one two three four five "
         "six seven eight nine ten word number colour size answer is the a of what which does it start with vowel "
         "classify fruit weather").split()
NUMBERS = "one two three four five six seven eight nine ten".split()


def task_records(kind: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of a small synthetic text-to-text task in kifmerge's {input, output} format:
    `parity` (is a number word even or odd) or any other kind: `vowel` (does a word start with a vowel)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "parity":
            k = rng.randrange(10)
            out.append({"input": f"Is the number {NUMBERS[k]} even or odd?\n\nAnswer:", "output": "odd" if k % 2 == 0 else "even"})
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
    """A 2-layer Llama-style causal LM (hidden size 32, random weights) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def build_t5(folder: Path, seed: int = 0) -> Path:
    """A 2-layer T5 (d_model 32, random weights) and its tokenizer: the seq2seq paths."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
