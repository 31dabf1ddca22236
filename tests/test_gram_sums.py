"""Shared Gram buffers (kifmerge/gram_sums.py): modules that read the same inputs keep one sum, and
every module's sum stays bit-equal to a buffer of its own, whatever the order of the calls."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kifmerge.gram_sums import SharedGramSums

MODULES = ["q", "k", "v", "o"]
WIDTH = 3

event = st.one_of(
    st.tuples(st.just("call"), st.sampled_from(MODULES), st.integers(0, 2)),  # a module reads input i
    st.tuples(st.just("mutate"), st.integers(0, 2)),  # input i changed in place (same object, new values)
    st.tuples(st.just("replace"), st.integers(0, 2)),  # input i is a new tensor (the next forward's activation)
    st.tuples(st.just("inference"), st.integers(0, 2)),  # ... made under inference mode: it has no version counter
    st.tuples(st.just("read")),  # the sums read mid-run (a checkpoint)
    st.tuples(st.just("resume")),  # a resumed run: starts from the sums read
)


def gram(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return flat.T @ flat


@settings(max_examples=1000, deadline=None)
@given(st.lists(event, max_size=40), st.integers(0, 2**16))
def test_shared_sums_equal_separate_sums_bit_for_bit(events, seed):
    generator = torch.Generator().manual_seed(seed)

    def fresh() -> torch.Tensor:
        return torch.randn(2, 4, WIDTH, generator=generator)

    inputs = [fresh() for _ in range(3)]
    shared, separate = SharedGramSums(), {}
    for kind, *args in events:
        if kind == "call":
            name, i = args
            x = inputs[i]
            shared.add(name, x, lambda: gram(x))
            separate[name] = separate[name] + gram(x) if name in separate else gram(x)
        elif kind == "mutate":
            with torch.inference_mode(inputs[args[0]].is_inference()):
                inputs[args[0]].mul_(1.5).add_(0.25)
        elif kind == "replace":
            inputs[args[0]] = fresh()
        elif kind == "inference":
            with torch.inference_mode():
                inputs[args[0]] = fresh()
        elif kind == "read":
            sums = shared.sums()
            assert sums.keys() == separate.keys() and all(torch.equal(sums[n], separate[n]) for n in sums)
        else:
            shared.start_from(shared.sums())
    sums = shared.sums()
    assert sums.keys() == separate.keys()
    for name in sums:
        assert torch.equal(sums[name], separate[name]), name


def test_modules_reading_one_input_per_step_keep_one_buffer_and_one_product():
    """The attention pattern: q, k and v read one hidden state per step; o reads another."""
    shared, products = SharedGramSums(), []

    def counted(x):
        products.append(x)
        return gram(x)

    for _ in range(3):
        hidden, attended = torch.randn(5, WIDTH), torch.randn(5, WIDTH)
        for name in ("q", "k", "v"):
            shared.add(name, hidden, lambda: counted(hidden))
        shared.add("o", attended, lambda: counted(attended))
    sums = shared.sums()
    assert sums["q"] is sums["k"] is sums["v"] and sums["o"] is not sums["q"]
    assert len(products) == 6, "one product per distinct input"


def test_a_module_that_stops_reading_the_shared_input_is_split_off_with_its_own_sum():
    shared = SharedGramSums()
    first, second, other = torch.randn(4, WIDTH), torch.randn(4, WIDTH), torch.randn(4, WIDTH)
    for name in ("q", "v"):
        shared.add(name, first, lambda: gram(first))
    shared.add("q", second, lambda: gram(second))
    shared.add("v", other, lambda: gram(other))
    sums = shared.sums()
    assert sums["q"] is not sums["v"]
    assert torch.equal(sums["q"], gram(first) + gram(second))
    assert torch.equal(sums["v"], gram(first) + gram(other))


def test_a_module_first_seen_after_the_first_step_does_not_join_a_group_with_a_sum():
    shared = SharedGramSums()
    first, second = torch.randn(4, WIDTH), torch.randn(4, WIDTH)
    shared.add("q", first, lambda: gram(first))
    shared.add("q", second, lambda: gram(second))
    shared.add("v", second, lambda: gram(second))  # reads q's current input, but q's sum holds `first` too
    sums = shared.sums()
    assert torch.equal(sums["v"], gram(second)) and torch.equal(sums["q"], gram(first) + gram(second))


def test_an_inference_tensor_read_by_one_member_of_a_group_counts_for_it_alone():
    shared = SharedGramSums()
    first = torch.randn(4, WIDTH)
    for name in ("q", "v"):
        shared.add(name, first, lambda: gram(first))
    with torch.inference_mode():
        x = torch.randn(4, WIDTH)
    shared.add("q", x, lambda: gram(x))
    sums = shared.sums()
    assert torch.equal(sums["q"], gram(first) + gram(x)) and torch.equal(sums["v"], gram(first))


def test_inference_tensors_are_never_taken_for_the_input_just_multiplied():
    shared, calls = SharedGramSums(), []
    with torch.inference_mode():
        x = torch.randn(4, WIDTH)
    for name in ("q", "v"):
        shared.add(name, x, lambda: calls.append(name) or gram(x))
    assert calls == ["q", "v"]
    sums = shared.sums()
    assert torch.equal(sums["q"], gram(x)) and torch.equal(sums["v"], gram(x))


def test_a_t5_adapter_records_what_separate_buffers_record_and_shares_only_where_inputs_are_one(t5_dir):
    """T5 with LoRA on q and v: self-attention's q and v read one tensor (one buffer), cross-attention's
    q reads the decoder's states and v the encoder's output (two buffers); every sum equals a plain
    per-module hook's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from kifmerge.importance import GramCollector

    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), LoraConfig(r=2, target_modules=["q", "v"]))
    model.train()
    collector, separate = GramCollector(model), {}

    def reference(name):
        def hook(module, args):
            separate[name] = separate[name] + gram(args[0].detach()) if name in separate else gram(args[0].detach())
        return hook

    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            module.register_forward_pre_hook(reference(name))
    ids = torch.tensor([[3, 4, 5, 1], [6, 7, 1, 0]])
    for _ in range(2):
        model(input_ids=ids, attention_mask=(ids > 0).long(), labels=torch.tensor([[4, 1], [5, 1]])).loss.backward()
    sums = collector.grams
    assert sums.keys() == separate.keys() and all(torch.equal(sums[n], separate[n]) for n in sums)
    cross = [n for n in sums if "EncDecAttention" in n]
    own = [n for n in sums if "SelfAttention" in n]
    assert cross and own
    for q in (n for n in cross if n.endswith(".q")):
        assert sums[q] is not sums[q[:-1] + "v"], "cross-attention: q and v read different inputs"
    for q in (n for n in own if n.endswith(".q")):
        assert sums[q] is sums[q[:-1] + "v"], "self-attention: q and v read one input"
