"""The fusion rules and profile arithmetic as pure tensor functions, without files."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kifmerge.fusion.rules import blend, important_units, kif_adaptive, kif_static
from kifmerge.profiles import accumulate, normalise

scores = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=64).map(lambda v: torch.tensor(v))


def test_static_rule_four_cases_with_defaults():
    # 10 units; top 0.2 → the two highest of each profile are important
    p_old = torch.tensor([0.9, 1.0, 0.1, 0.2, 0.0, 0.3, 0.1, 0.2, 0.0, 0.1])
    p_new = torch.tensor([1.0, 0.0, 0.9, 0.2, 0.1, 0.3, 0.1, 0.2, 0.0, 0.1])
    c_new, c_old = kif_static(p_old, p_new)
    assert c_new[:4].tolist() == [0.30000001192092896, 0.0, 1.0, 0.5]
    assert c_old[:4].tolist() == [0.699999988079071, 1.0, 0.0, 0.5]


@given(scores)
def test_constant_profile_marks_nothing_important(values):
    flat = torch.full_like(values, 0.5)
    assert not important_units(flat, 0.2).any()
    assert torch.equal(normalise(flat), torch.zeros_like(flat))


@settings(max_examples=50)
@given(scores, st.floats(0.05, 1.0))
def test_top_fraction_bounds_the_important_units(values, top):
    hot = important_units(values, top)
    assert int(hot.sum()) <= max(1, round(top * len(values))) + 1
    if hot.any():
        assert values[hot].min() > values[~hot].max() if (~hot).any() else True


@given(scores, st.floats(0.05, 2.0))
def test_adaptive_coefficients_are_a_softmax(values, tau):
    other = values.flip(0)
    c_new, c_old = kif_adaptive(other, values, tau=tau)
    torch.testing.assert_close(c_new + c_old, torch.ones_like(c_new))
    assert bool((c_new[values > other] >= 0.5).all()) and bool((c_new[values < other] <= 0.5).all())


def test_blend_broadcasts_along_the_unit_axis():
    old, new = torch.zeros(3, 4), torch.ones(3, 4)
    rows = blend(old, new, torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0]), axis=0)
    assert rows[:, 0].tolist() == [0.0, 0.5, 1.0]
    cols = blend(old, new, torch.tensor([0.0, 0.25, 0.5, 1.0]), torch.tensor([1.0, 0.75, 0.5, 0.0]), axis=1)
    assert cols[0].tolist() == [0.0, 0.25, 0.5, 1.0]
    whole = blend(old.half(), new.half(), torch.tensor([0.3]), torch.tensor([0.7]), axis=None)
    assert whole.dtype == torch.float16 and torch.allclose(whole.float(), torch.full((3, 4), 0.3), atol=1e-3)


@given(scores)
def test_accumulated_profile_is_normalised(values):
    acc = accumulate(values, values.flip(0))
    assert not torch.isnan(acc).any()
    assert acc.min() >= 0 and acc.max() <= 1


def test_engine_streams_blends_and_refuses_overflow(tmp_path):
    """The streaming engine over real files: per-tensor blend, output in the inputs' dtype,
    and a non-finite result refused with the tensor's name."""
    import pytest
    from safetensors.torch import load_file, save_file

    from kifmerge.errors import InvalidInputError
    from kifmerge.fusion.engine import LazyTensorReader, fuse_streaming
    from kifmerge.fusion.writer import StreamingShardWriter, TensorSpec
    from kifmerge.units import tensor_layout

    old = {"a": torch.full((4, 4), 1.0, dtype=torch.float16), "b": torch.full((8,), 60000.0, dtype=torch.float16)}
    new = {"a": torch.full((4, 4), 3.0, dtype=torch.float16), "b": torch.full((8,), 60000.0, dtype=torch.float16)}
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    layout = tensor_layout({k: tuple(v.shape) for k, v in new.items()})
    readers = [LazyTensorReader({"f": tmp_path / f"{n}.safetensors"}, {k: "f" for k in new}) for n in ("old", "new")]
    out = tmp_path / "out"
    out.mkdir()
    specs = {k: TensorSpec("F16", tuple(v.shape)) for k, v in new.items()}
    writer = StreamingShardWriter(out, specs, max_shard_bytes=20)
    fuse_streaming(*readers, layout, torch.tensor([0.25, 0.5]), torch.tensor([0.75, 0.5]), writer)
    files, weight_map = writer.finish()
    assert len([f for f in files if f.endswith(".safetensors")]) == 2 and set(weight_map) == {"a", "b"}
    fused = {k: v for f in files if f.endswith(".safetensors") for k, v in load_file(files[f]).items()}
    assert fused["a"].dtype == torch.float16 and torch.all(fused["a"] == 1.5) and torch.all(fused["b"] == 60000.0)

    writer = StreamingShardWriter(out / "..", specs, filename_pattern="x{suffix}.safetensors", index_name=None)
    with pytest.raises(InvalidInputError, match="fused tensor b is not finite"):
        fuse_streaming(*readers, layout, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), writer)
    writer.abort()
    assert not list(tmp_path.glob(".x*.partial")), "a refused output leaves no partial shard"


def test_streaming_writer_round_trips_any_order_and_dtype(tmp_path):
    from safetensors import safe_open

    from kifmerge.fusion.writer import SAFETENSORS_DTYPES, StreamingShardWriter, TensorSpec

    tensors = {"w.bf16": torch.randn(3, 5).to(torch.bfloat16), "w.f32": torch.randn(7), "w.i64": torch.arange(6).reshape(2, 3),
               "w.bool": torch.tensor([True, False, True]), "w.scalar": torch.tensor(2.5), "w.t": torch.randn(4, 6).T}
    specs = {k: TensorSpec(SAFETENSORS_DTYPES[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    writer = StreamingShardWriter(tmp_path, specs, max_shard_bytes=64)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    files, weight_map = writer.finish()
    assert set(weight_map) == set(tensors) and "model.safetensors.index.json" in files
    for name, tensor in tensors.items():
        with safe_open(files[weight_map[name]], "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensor), name
