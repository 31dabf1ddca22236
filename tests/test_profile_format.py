"""The profile file users hand us (README "Profile file format"): what is refused and said, what is read and written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kifmerge.errors import InvalidInputError, NotFoundError
from kifmerge.profiles import (
    accumulate_elements,
    from_unit_scores,
    normalise,
    normalise_elements,
    read_elements,
    read_grams,
    read_profile,
    write_profile,
)
from kifmerge.units import lora_rank_layout

META = {"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"}
# two LoRA modules of rank 2 (A: [2, 3], B: [3, 2]); the layout's groups are "m.p" and "m.q", 2 units each
SHAPES = {f"m.{p}.lora_{f}.weight": (2, 3) if f == "A" else (3, 2) for p in ("p", "q") for f in ("A", "B")}
LAYOUT = lora_rank_layout(SHAPES)


def profile(tmp_path: Path, tensors: dict, meta: dict | None = None) -> Path:
    """A profile file written by hand, as an outside tool would."""
    path = tmp_path / "p.safetensors"
    save_file({name: t.clone() for name, t in tensors.items()}, str(path), metadata=META if meta is None else meta)
    return path


GOOD = {"m.p": torch.tensor([0.5, 0.0]), "m.q": torch.tensor([2.0, 1.0])}


def test_a_good_profile_reads_as_float32_scores_in_layout_order(tmp_path):
    path = profile(tmp_path, {name: t.to(torch.float64) for name, t in GOOD.items()})  # float64 in the file
    flat = read_profile(path, LAYOUT)
    assert flat.dtype == torch.float32
    assert flat.tolist() == [0.5, 0.0, 2.0, 1.0]


BAD = [  # (label, tensors or None for a junk file, metadata or None for the good one, what the refusal says)
    ("not safetensors", None, None, r"p\.safetensors is not a safetensors file"),
    ("no metadata", GOOD, {}, r"lacks metadata format='kifmerge-profile' version='1'"),
    ("another version", GOOD, {**META, "version": "2"}, r"lacks metadata format='kifmerge-profile' version='1'"),
    ("another unit", GOOD, {**META, "unit": "tensor"}, r"scores 'tensor' units but the checkpoint has 'lora-rank' units"),
    ("one group missing", {"m.q": GOOD["m.q"]}, None, r"has no scores for m\.p \(1 groups missing\)"),
    ("both groups missing", {"m.z": GOOD["m.q"]}, None, r"has no scores for m\.p \(2 groups missing\)"),
    ("one extra group", {**GOOD, "m.z": GOOD["m.q"]}, None, r"scores m\.z, which the checkpoint does not have \(1 extra\)"),
    ("two extra groups", {**GOOD, "m.y": GOOD["m.q"], "m.z": GOOD["m.q"]}, None, r"scores m\.y, which the checkpoint does not have \(2 extra\)"),
    ("too short", {**GOOD, "m.q": torch.tensor([1.0])}, None, r"m\.q has \[1\] scores, expected 1-D of length 2"),
    ("2-D with the right count", {**GOOD, "m.q": torch.tensor([[1.0, 2.0]])}, None, r"m\.q has \[1, 2\] scores, expected 1-D of length 2"),
    ("NaN", {**GOOD, "m.q": torch.tensor([1.0, float("nan")])}, None, r"m\.q holds NaN, infinite or non-float scores"),
    ("integers", {**GOOD, "m.q": torch.tensor([1, 2])}, None, r"m\.q holds NaN, infinite or non-float scores"),
    ("beyond float32", {**GOOD, "m.q": torch.tensor([1e300, 1.0], dtype=torch.float64)}, None, r"m\.q holds NaN, infinite or non-float scores \(or beyond float32's range\)"),
    ("negative", {**GOOD, "m.q": torch.tensor([1.0, -0.5])}, None, r"m\.q holds negative scores \(importance scores are >= 0\)"),
]


@pytest.mark.parametrize("tensors,meta,match", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_a_bad_profile_is_refused_saying_what_is_wrong(tmp_path, tensors, meta, match):
    if tensors is None:
        path = tmp_path / "p.safetensors"
        path.write_bytes(b"junk")
    else:
        path = profile(tmp_path, tensors, meta)
    with pytest.raises(InvalidInputError, match=match):
        read_profile(path, LAYOUT)


def test_a_profile_that_is_not_there_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=r"profile file not found: .*absent\.safetensors"):
        read_profile(tmp_path / "absent.safetensors", LAYOUT)


def test_write_profile_stores_float32_scores_and_grams_as_the_format_says(tmp_path):
    path = tmp_path / "out.safetensors"
    # G = [[1, 2, 3], [2, 4, 5], [3, 5, 6]]: its upper triangle row by row is 1 2 3 | 4 5 | 6
    gram = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]], dtype=torch.float64)
    grams = {"m.p": gram, "m.q": 2 * torch.eye(3, dtype=torch.float64)}
    write_profile(path, torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=torch.float64), LAYOUT, grams=grams)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {**META, "gram-precision": "float32"}  # summed in float32 (a reader trusts them)
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    assert {name: t.dtype for name, t in stored.items()} == dict.fromkeys(["m.p", "m.q", "gram:m.p", "gram:m.q"], torch.float32)
    assert stored["m.q"].tolist() == [2.0, 1.0]
    assert stored["gram:m.p"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert stored["gram:m.q"].tolist() == [2.0, 0.0, 0.0, 2.0, 0.0, 2.0]
    back = read_grams(path, ["m.p", "m.q"])
    assert back["m.p"].tolist() == gram.tolist() and back["m.q"].tolist() == (2 * torch.eye(3)).tolist()


def test_modules_that_saw_the_same_inputs_store_their_gram_once(tmp_path):
    path = tmp_path / "out.safetensors"
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    other = torch.tensor([[2.0, 1.0], [1.0, 3.5]])
    write_profile(path, torch.zeros(4), LAYOUT, grams={"m.p": gram.clone(), "m.q": gram.clone()})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["gram-shared"] == '{"m.q": "m.p"}'
        assert sorted(k for k in handle.keys() if k.startswith("gram:")) == ["gram:m.p"]
    back = read_grams(path, ["m.p", "m.q"])
    assert back["m.q"].tolist() == gram.tolist() and back["m.q"] is back["m.p"]
    write_profile(path, torch.zeros(4), LAYOUT, grams={"m.p": gram, "m.q": other})  # one entry apart: both stored
    with safe_open(str(path), framework="pt") as handle:
        assert "gram-shared" not in handle.metadata()
    assert read_grams(path, ["m.p", "m.q"])["m.q"].tolist() == other.tolist()


def test_a_gram_that_is_symmetric_but_for_rounding_packs_as_its_symmetric_mean(tmp_path):
    path = tmp_path / "out.safetensors"
    lopsided = torch.tensor([[1.0, 2.0], [2.5, 4.0]])  # G₀₁ = 2, G₁₀ = 2.5 → both 2.25
    write_profile(path, torch.zeros(4), LAYOUT, grams={"m.p": lopsided, "m.q": torch.eye(2)})
    assert read_grams(path, ["m.p", "m.q"])["m.p"].tolist() == [[1.0, 2.25], [2.25, 4.0]]


def test_grams_count_only_when_every_module_has_a_finite_square_one(tmp_path):
    eye = torch.eye(3)
    assert read_grams(profile(tmp_path, {**GOOD, "gram:m.p": eye}), ["m.p", "m.q"]) is None, "one module of two: none"
    assert read_grams(profile(tmp_path, GOOD), ["m.p", "m.q"]) is None
    # full matrices, as profiles before 2026-12-06 stored them, still read
    assert read_grams(profile(tmp_path, {**GOOD, "gram:m.p": eye, "gram:m.q": eye}), ["m.p", "m.q"])["m.q"].tolist() == eye.tolist()
    # 4 values are no triangle (1, 3, 6, 10, ...)
    for bad in (torch.ones(3, 4), torch.ones(4), torch.ones(1, 1, 1), torch.tensor([[1.0, float("inf")], [0.0, 1.0]]),
                torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([1, 0, 1])):
        with pytest.raises(InvalidInputError, match=r"the Gram matrix of m\.q is not a finite square matrix"):
            read_grams(profile(tmp_path, {**GOOD, "gram:m.p": eye, "gram:m.q": bad}), ["m.p", "m.q"])


def test_a_gram_matrix_narrower_than_its_modules_input_is_refused_by_name(tmp_path):
    path = profile(tmp_path, {**GOOD, "gram:m.p": torch.eye(3), "gram:m.q": torch.tensor([1.0, 0.0, 1.0])})
    assert read_grams(path, ["m.p", "m.q"], {"m.p": 3, "m.q": 2})["m.q"].shape == (2, 2)
    with pytest.raises(InvalidInputError, match=r"the Gram matrix of m\.q is 2 × 2, but the module reads 3 input features"):
        read_grams(path, ["m.p", "m.q"], {"m.p": 3, "m.q": 3})


@pytest.mark.parametrize("shared,match", [
    ("not json", r"metadata 'gram-shared' is not a JSON mapping of module names"),
    ('["m.q"]', r"metadata 'gram-shared' is not a JSON mapping of module names"),
    ('{"m.q": 1}', r"metadata 'gram-shared' is not a JSON mapping of module names"),
    ('{"m.q": "m.z"}', r"the Gram matrix of m\.q is shared with m\.z, which has none"),
    ('{"m.q": "m.q"}', r"the Gram matrix of m\.q is both stored and shared"),
    ('{"m.p": "m.q"}', r"the Gram matrix of m\.p is both stored and shared"),
])
def test_a_bad_gram_sharing_map_is_refused_by_name(tmp_path, shared, match):
    path = profile(tmp_path, {**GOOD, "gram:m.p": torch.tensor([1.0, 0.0, 1.0])}, {**META, "gram-shared": shared})
    with pytest.raises(InvalidInputError, match=match):
        read_grams(path, ["m.p", "m.q"])


def test_element_scores_count_only_when_every_tensor_has_fitting_ones(tmp_path):
    ones = {f"element:{name}": torch.ones(shape, dtype=torch.float16) for name, shape in SHAPES.items()}
    first = next(iter(SHAPES))                                           # m.p.lora_A.weight, [2, 3]
    assert read_elements(profile(tmp_path, {**GOOD, f"element:{first}": ones[f"element:{first}"]}), SHAPES) is None, \
        "scores for one tensor of four count as none"
    read = read_elements(profile(tmp_path, {**GOOD, **ones}), SHAPES)
    assert read[first].dtype == torch.float32 and read[first].tolist() == [[1.0] * 3] * 2
    for bad, shape in ((torch.ones(3, 2), "[3, 2]"), (torch.full((2, 3), -1.0), "[2, 3]"),
                       (torch.full((2, 3), float("nan")), "[2, 3]")):
        with pytest.raises(InvalidInputError, match=re.escape(f"element scores of {first} do not fit the tensor (shape {shape})")):
            read_elements(profile(tmp_path, {**GOOD, **ones, f"element:{first}": bad.to(torch.float16)}), SHAPES)


def test_normalise_is_float32_and_holds_the_widest_float32_range():
    # (x − low) / (high − low) with low −3e38, high 3e38: high − low = 6e38 overflows float32, not float64
    assert normalise(torch.tensor([-3e38, 0.0, 3e38])).tolist() == [0.0, 0.5, 1.0]
    constant = normalise(torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert constant.dtype == torch.float32 and constant.tolist() == [0.0, 0.0]


def test_element_normalisation_to_mean_one_survives_tiny_huge_and_few_scores():
    # total 0.4 over 2 elements: scale 2 / 0.4 = 5 → [0.5, 1.5] (a total below 1 is still a signal)
    torch.testing.assert_close(normalise_elements({"a": torch.tensor([0.1, 0.3])})["a"], torch.tensor([0.5, 1.5]))
    # 3e38 + 3e38 overflows a float32 sum; in float64 it is 6e38, scale 2 / 6e38 → [1, 1]
    torch.testing.assert_close(normalise_elements({"a": torch.tensor([3e38, 3e38])})["a"], torch.tensor([1.0, 1.0]))
    # subnormal 1·2⁻¹⁴⁹ and 3·2⁻¹⁴⁹: scale 2 / (4·2⁻¹⁴⁹) = 2¹⁴⁸, beyond float32 → [0.5, 1.5] only in float64
    tiny = torch.tensor([2.0**-149, 3 * 2.0**-149], dtype=torch.float32)
    assert normalise_elements({"a": tiny})["a"].tolist() == [0.5, 1.5]
    # no signal: all ones, float32 whatever came in
    uniform = normalise_elements({"a": torch.zeros(2, dtype=torch.float16)})["a"]
    assert uniform.dtype == torch.float32 and uniform.tolist() == [1.0, 1.0]
    # a float64 subnormal total (1e-320 over 2 elements): mean 5e-321, its inverse would overflow to inf
    # (then [inf, nan]); divided by the mean: [1e-320 / 5e-321, 0] = [2, 0]
    assert normalise_elements({"a": torch.tensor([1e-320, 0.0], dtype=torch.float64)})["a"].tolist() == [2.0, 0.0]
    # 3e38 + 1e38 = 4e38 in float64 (inf in float32, which would read as no signal): mean 2e38 → [1.5, 0.5]
    assert normalise_elements({"a": torch.tensor([3e38, 1e38])})["a"].tolist() == [1.5, 0.5]
    # float16 scores (as element scores are stored) divided in float64, then rounded once to float32:
    # [1, 2, 4], mean 7/3 → [3/7, 6/7, 12/7]; divided in float16 they would come out 0.4287, 0.857, 1.714
    halves = normalise_elements({"a": torch.tensor([1.0, 2.0, 4.0], dtype=torch.float16)})["a"]
    assert halves.tolist() == torch.tensor([3 / 7, 6 / 7, 12 / 7], dtype=torch.float32).tolist()
    # an infinite score says nothing comparable: no signal, all ones (not NaN)
    assert normalise_elements({"a": torch.tensor([float("inf"), 1.0])})["a"].tolist() == [1.0, 1.0]
    # no elements at all: nothing to return, no division by a zero count
    assert normalise_elements({}) == {}


def test_an_outlier_element_is_clipped_at_32000_so_it_stores_in_float16(tmp_path):
    # one scored element among 40 000: mean 1 makes it 40 000, clipped to 32 000 (float16 holds it exactly)
    scores = torch.zeros(40_000)
    scores[0] = 1.0
    assert normalise_elements({"a": scores})["a"][0].item() == 32000.0
    layout = lora_rank_layout({"m.lora_A.weight": (1, 20_000), "m.lora_B.weight": (20_000, 1)})
    elements = {"m.lora_A.weight": scores[:20_000].reshape(1, 20_000), "m.lora_B.weight": scores[20_000:].reshape(20_000, 1)}
    path = tmp_path / "out.safetensors"
    write_profile(path, torch.tensor([1.0]), layout, elements=elements)
    assert read_elements(path, {n: tuple(t.shape) for n, t in elements.items()})["m.lora_A.weight"][0, 0].item() == 32000.0


def test_a_line_of_one_task_averages_its_element_scores_with_the_second_tasks():
    line = {"a": torch.tensor([1.0, 3.0])}                               # mean 2 → [0.5, 1.5]
    new = {"a": torch.tensor([3.0, 1.0])}                                # mean 2 → [1.5, 0.5]
    # one task held: (1·[0.5, 1.5] + [1.5, 0.5]) / 2 = [1, 1]; a line of none counts as one
    assert accumulate_elements(line, new, 1)["a"].tolist() == [1.0, 1.0]
    assert accumulate_elements(line, new, 0)["a"].tolist() == [1.0, 1.0]


def test_unit_scores_nobody_measured_score_zero_and_all_come_out_float32():
    measured = {"m.q": torch.tensor([0.25, 0.5], dtype=torch.float64), "m.frozen": torch.tensor([9.0])}
    flat = from_unit_scores(measured, LAYOUT)                            # m.p unmeasured → 0, 0; m.frozen dropped
    assert flat.dtype == torch.float32 and flat.tolist() == [0.0, 0.0, 0.25, 0.5]
