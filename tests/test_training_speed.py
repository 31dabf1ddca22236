"""The training step's and evaluation's shortcuts compute what the plain way computes: the answer
window asked for by index, packed rows, a shared prompt prefix, generation stopped after the
longest label, linear weights cast once for bfloat16."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORDS, task_records


def varied_records(n: int) -> list[dict]:
    """Prompts of different lengths (so a batch has padding to save) and one- or two-word answers."""
    records = task_records("parity", n) + task_records("vowel", n, seed=3)
    for i, record in enumerate(records):
        record["input"] = " ".join(WORDS[: 3 * (i % 5)]) + " " + record["input"]
        if i % 3 == 0:
            record["output"] += " " + WORDS[i % 7]
    return records


def lora_model(llama_dir):
    from transformers import set_seed

    from kifmerge.options import TrainOptions
    from kifmerge.modeling import build_model

    set_seed(0)
    model = build_model(llama_dir, json.loads((llama_dir / "config.json").read_text()), TrainOptions(), None)
    with torch.no_grad():  # non-zero B, so every LoRA factor has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def loss_and_grads(model, batch):
    from kifmerge.training import answer_loss

    loss = answer_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def encoded(llama_dir, records, max_length=64):
    from kifmerge.data import Encoder
    from kifmerge.modeling import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    return tokenizer, [Encoder(tokenizer, False, max_length)(r) for r in records]


def test_pack_rows_packs_only_when_it_saves_work():
    from kifmerge.data import pack_rows

    assert pack_rows([10, 10, 10, 10], 0.01) is None  # no padding: nothing to save
    rows = pack_rows([30, 10, 12, 8], 0.01)  # 10 + 12 + 8 fill a row as wide as the 30
    assert sorted(sorted(row) for row in rows) == [[0], [1, 2, 3]]
    assert len(pack_rows([30, 10, 12, 8], 0.0)) == 1  # attention free: one row, no padding at all
    assert pack_rows([30, 28, 29, 27], 0.01) is None  # any packing is wider than it saves


def test_packed_rows_and_the_index_window_give_the_padded_loss_and_gradients(llama_dir):
    from kifmerge.data import Collator
    from kifmerge.modeling import packing_cost, packs_sequences

    model = lora_model(llama_dir)
    tokenizer, features = encoded(llama_dir, varied_records(4))
    assert packs_sequences(model) and packing_cost(model) > 0
    full = Collator(tokenizer.pad_token_id, False, window=False)(features)      # every position's logits
    window = Collator(tokenizer.pad_token_id, False)(features)                  # the answer window, by index
    packed = Collator(tokenizer.pad_token_id, False, pack=0.0)(features)        # fewer rows, no padding to the longest
    assert "answer_targets" in packed and packed["input_ids"].shape[0] < len(features)
    assert packed["input_ids"].numel() < window["input_ids"].numel()
    expected_loss, expected = loss_and_grads(model, full)
    for batch in (window, packed):
        loss, grads = loss_and_grads(model, batch)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_mixes_packed_sequences_is_not_packed(llama_dir, monkeypatch):
    from kifmerge import training

    model = lora_model(llama_dir)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))  # positions ignored
    assert not training.packs_sequences(model)


PREFIX = "Read the word and answer the question about it with one word, as in the examples before. "


def test_generation_with_a_shared_prefix_and_a_label_limit_answers_as_before(llama_dir):
    from transformers import AutoModelForCausalLM

    from kifmerge.evaluation import generate_answers, longest_answer
    from kifmerge.modeling import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    records = [{**r, "input": PREFIX + r["input"]} for r in varied_records(5)]
    prompts, references = [r["input"] for r in records], [r["output"] for r in records]
    settings = {"seq2seq": False, "max_new_tokens": 6, "max_length": 64, "batch_size": 3}
    plain = generate_answers(model, tokenizer, prompts, share_prefix=False, **settings)
    assert generate_answers(model, tokenizer, prompts, **settings) == plain
    limit = longest_answer(tokenizer, prompts, references, False) + 1
    assert limit < 6
    limited = generate_answers(model, tokenizer, prompts, references=references, **settings)
    one_by_one = [generate_answers(model, tokenizer, [p], share_prefix=False, **{**settings, "max_new_tokens": 6})[0]
                  for p in prompts[:3]]
    assert one_by_one == plain[:3]  # each row computes what it would alone
    for short, long in zip(limited, plain, strict=True):  # the same greedy tokens, cut after the longest label
        assert long.startswith(short)
        assert len(tokenizer(" " + short, add_special_tokens=False)["input_ids"]) <= limit


def test_bf16_generation_casts_linear_weights_once_and_puts_them_back(llama_dir):
    from transformers import AutoModelForCausalLM

    from kifmerge.modeling import cast_linear_weights

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.tie_weights()
    before = {n: p for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        restore = cast_linear_weights(model, torch.bfloat16)
        assert model.lm_head.weight.dtype == torch.bfloat16 and model.get_input_embeddings().weight.dtype == torch.float32
        cast = model(input_ids=ids).logits
        restore()
    assert torch.equal(cast, expected)
    assert {n: p for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("bf16", [False, True])
def test_generation_in_bf16_with_cast_weights_matches_autocast_alone(llama_dir, monkeypatch, bf16):
    from transformers import AutoModelForCausalLM

    from kifmerge import evaluation, modeling
    from kifmerge.modeling import load_tokenizer

    tokenizer = load_tokenizer(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    prompts = [PREFIX + r["input"] for r in varied_records(3)]
    settings = {"seq2seq": False, "max_new_tokens": 4, "max_length": 64, "batch_size": 4, "bf16": bf16}
    cast = evaluation.generate_answers(model, tokenizer, prompts, **settings)
    calls = []  # the stand-in records its calls: under bf16 the comparison is with autocast alone, and
    # without bf16 the weights are never cast (the two runs are then the same code, as they should be)
    monkeypatch.setattr(modeling, "cast_linear_weights", lambda model, dtype, **kw: calls.append(dtype) or (lambda: None))
    assert evaluation.generate_answers(model, tokenizer, prompts, **settings) == cast
    assert calls == ([torch.bfloat16] if bf16 else [])
