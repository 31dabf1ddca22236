"""Property tests of the fusion rules and profile arithmetic (hypothesis): whatever the
profiles and parameters, a fused unit lies between its old and new values, identical inputs
come back unchanged, the static rule's four cases partition the units, and normalisation
never produces NaN."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kifmerge.fusion.rules import blend, important_units, kif_adaptive, kif_static, linear
from kifmerge.profiles import accumulate, normalise

EXAMPLES = settings(max_examples=60)
finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
unit_score = st.floats(0, 1, allow_nan=False, width=32)


@st.composite
def profiles(draw, n: int) -> torch.Tensor:
    """A normalised profile of n units, with the degenerate shapes (all zero, constant,
    one hot unit, ties) drawn as often as random ones."""
    shape = draw(st.sampled_from(["random", "zeros", "constant", "one-hot", "ties"]))
    if shape == "zeros":
        return torch.zeros(n)
    if shape == "constant":
        return torch.full((n,), draw(unit_score))
    if shape == "one-hot":
        out = torch.zeros(n)
        out[draw(st.integers(0, n - 1))] = 1.0
        return out
    values = draw(st.lists(unit_score if shape == "random" else st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32)


@st.composite
def fusion_case(draw):
    """Old and new profiles, old and new weights of one tensor whose unit axis holds n units,
    and the coefficients of a randomly chosen rule with random valid parameters."""
    n = draw(st.integers(1, 24))
    p_old, p_new = draw(profiles(n)), draw(profiles(n))
    axis = draw(st.sampled_from([0, 1, None]))
    other = draw(st.integers(1, 4))
    shape = {0: (n, other), 1: (other, n), None: (other, 3)}[axis]
    if axis is None:  # the whole tensor is one unit
        p_old, p_new = p_old[:1], p_new[:1]
    size = math.prod(shape)
    w_old = torch.tensor(draw(st.lists(finite32, min_size=size, max_size=size))).reshape(shape)
    w_new = torch.tensor(draw(st.lists(finite32, min_size=size, max_size=size))).reshape(shape)
    rule = draw(st.sampled_from(["kif", "kif-adaptive", "linear"]))
    if rule == "kif":
        w_both = draw(unit_score)
        coefficients = kif_static(p_old, p_new, top=draw(st.floats(0.01, 1.0)), both=(w_both, 1.0 - w_both),
                                  neither=draw(unit_score))
    elif rule == "kif-adaptive":
        coefficients = kif_adaptive(p_old, p_new, tau=draw(st.floats(0.01, 10.0)))
    else:
        coefficients = linear(p_old, p_new, alpha=draw(unit_score))
    return rule, w_old, w_new, coefficients, axis


@EXAMPLES
@given(fusion_case())
def test_every_fused_value_lies_between_old_and_new(case):
    """The rules only interpolate: no unit is pushed outside the segment [old, new]."""
    rule, w_old, w_new, (c_new, c_old), axis = case
    assert bool(((c_new >= 0) & (c_new <= 1) & (c_old >= 0) & (c_old <= 1)).all()), rule
    torch.testing.assert_close(c_new + c_old, torch.ones_like(c_new), rtol=0, atol=1e-6)
    fused = blend(w_old, w_new, c_new, c_old, axis)
    low, high = torch.minimum(w_old, w_new), torch.maximum(w_old, w_new)
    # float32 rounding of the c·w sums, nothing more: relative, plus the subnormal range's absolute step
    slack = 1e-6 * torch.maximum(w_old.abs(), w_new.abs()) + torch.finfo(torch.float32).tiny
    assert bool(((fused >= low - slack) & (fused <= high + slack)).all()), (rule, w_old, w_new, fused)


@EXAMPLES
@given(fusion_case(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fusing_identical_weights_returns_them(case, dtype):
    """Old = new: every rule returns the weights unchanged, in their dtype (a unit's two
    coefficients sum to 1); exactly for half-precision weights."""
    rule, _, w_new, (c_new, c_old), axis = case
    weights = w_new.to(dtype)
    fused = blend(weights, weights, c_new, c_old, axis)
    assert fused.dtype == dtype
    if dtype == torch.float32:  # a rounding step at most, or float32's smallest step for subnormal weights
        torch.testing.assert_close(fused, weights, rtol=2e-6, atol=torch.finfo(torch.float32).tiny, msg=rule)
    else:  # computed in float32 and rounded back: exact
        assert torch.equal(fused, weights), rule


@EXAMPLES
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(profiles(n), profiles(n))), st.floats(0.01, 1.0), unit_score, unit_score)
def test_static_rule_four_cases_partition_the_units(pair, top, w_both, neither):
    """Each unit falls in exactly one of both / old only / new only / neither and gets that
    case's coefficients; no more than the top fraction of a profile counts as important."""
    p_old, p_new = pair
    c_new, c_old = kif_static(p_old, p_new, top=top, both=(w_both, 1.0 - w_both), neither=neither)
    old_hot, new_hot = important_units(p_old, top), important_units(p_new, top)
    cases = {"both": (old_hot & new_hot, (w_both, 1.0 - w_both)), "old only": (old_hot & ~new_hot, (0.0, 1.0)),
             "new only": (~old_hot & new_hot, (1.0, 0.0)), "neither": (~old_hot & ~new_hot, (neither, 1.0 - neither))}
    membership = torch.stack([mask for mask, _ in cases.values()]).sum(0)
    assert bool((membership == 1).all())
    for name, (mask, (want_new, want_old)) in cases.items():
        assert bool((c_new[mask] == torch.tensor(want_new, dtype=torch.float32)).all()), name
        assert bool((c_old[mask] == torch.tensor(want_old, dtype=torch.float32)).all()), name
    bound = math.ceil(top * (len(p_old) - 1) - 1e-9)
    assert int(old_hot.sum()) <= bound and int(new_hot.sum()) <= bound


@EXAMPLES
@given(st.integers(1, 40).flatmap(profiles), st.floats(0.01, 1.0), st.floats(0.01, 10.0))
def test_identical_profiles_never_take_one_side(profile, top, tau):
    """Same importance on both sides: the static rule never picks old only or new only, the
    adaptive rule weighs both sides equally."""
    c_new, _ = kif_static(profile, profile, top=top)
    assert not bool(((c_new == 0) | (c_new == 1)).any())
    c_new, c_old = kif_adaptive(profile, profile, tau=tau)
    assert bool((c_new == 0.5).all() and (c_old == 0.5).all())


raw_scores = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=50)


@EXAMPLES
@given(st.one_of(raw_scores, st.integers(1, 50).map(lambda n: [0.0] * n),
                 st.tuples(st.integers(1, 50), st.floats(allow_nan=False, allow_infinity=False, width=32)).map(lambda t: [t[1]] * t[0])))
def test_normalise_never_produces_nan(values):
    """Any finite scores, all-zero and constant ones included (and ranges wider than float32
    holds): the result is in [0, 1], constant profiles become zeros, extremes map to 0 and 1."""
    scores = torch.tensor(values, dtype=torch.float32)
    out = normalise(scores)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert bool(((out >= 0) & (out <= 1)).all())
    if bool(scores.max() > scores.min()):
        assert out[scores.argmin()] == 0 and out[scores.argmax()] == 1
    else:
        assert bool((out == 0).all())


def raw_profile(n: int):
    """n non-negative raw scores: random up to 2^127 (near float32's max), all zero, or constant."""
    score = st.floats(0, 2.0 ** 127, allow_nan=False, width=32)
    return st.one_of(st.lists(score, min_size=n, max_size=n), st.just([0.0] * n), score.map(lambda v: [v] * n))


@EXAMPLES
@given(st.integers(1, 50).flatmap(lambda n: st.tuples(raw_profile(n), raw_profile(n))), unit_score)
def test_accumulated_profile_never_produces_nan(pair, w_new):
    """Accumulating any two non-negative profiles (zeros, constants, huge scores) gives a
    normalised profile: finite, in [0, 1]."""
    p_old, p_new = (torch.tensor(v, dtype=torch.float32) for v in pair)
    out = accumulate(p_old, p_new, (w_new, 1.0 - w_new))
    assert bool(torch.isfinite(out).all()) and bool(((out >= 0) & (out <= 1)).all())
