"""Fusion rules as pure tensor functions (no files, no registry), one per method.

Profiles are flat vectors of normalised unit scores in [0, 1]. A rule turns the old and
new profiles into per-unit coefficients `(c_new, c_old)`; `blend` then applies them to
one tensor, broadcasting each unit's coefficient along the tensor's unit axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def important_units(profile: torch.Tensor, top: float) -> torch.Tensor:
    """Units scoring strictly above the (1 − top) quantile of their own profile."""
    if profile.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    threshold = torch.quantile(profile.to(torch.float64), 1.0 - top)
    return profile.to(torch.float64) > threshold


def kif_static(
    p_old: torch.Tensor,
    p_new: torch.Tensor,
    *,
    top: float = 0.2,
    both: tuple[float, float] = (0.3, 0.7),
    neither: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KIF's static rule. both important → both=(w_new, w_old); old only → old;
    new only → new; neither → `neither·new + (1 − neither)·old`."""
    old_hot, new_hot = important_units(p_old, top), important_units(p_new, top)
    c_new = torch.full(p_new.shape, neither, dtype=torch.float32)
    c_old = torch.full(p_new.shape, 1.0 - neither, dtype=torch.float32)
    shared = old_hot & new_hot
    c_new[shared], c_old[shared] = both
    c_new[old_hot & ~new_hot], c_old[old_hot & ~new_hot] = 0.0, 1.0
    c_new[new_hot & ~old_hot], c_old[new_hot & ~old_hot] = 1.0, 0.0
    return c_new, c_old


def kif_adaptive(p_old: torch.Tensor, p_new: torch.Tensor, *, tau: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the two scores at temperature tau: `c_new = e^{P_new/τ} / (e^{P_new/τ} + e^{P_old/τ})`."""
    weights = torch.softmax(torch.stack([p_new, p_old]).to(torch.float64) / tau, dim=0).to(torch.float32)
    return weights[0], 1.0 - weights[0]


def rank_normalise(profile: torch.Tensor) -> torch.Tensor:
    """Each score's rank among its profile's scores, scaled to [0, 1] (ties share their mean
    rank). Min–max normalised profiles are heavily skewed (median ≈ 0.002 here), so a softmax
    over two of them sees gaps of ~0 almost everywhere and returns 0.5; ranks spread them evenly."""
    n = profile.numel()
    if n < 2:
        return torch.zeros_like(profile, dtype=torch.float32)
    values = profile.to(torch.float64)
    ordered = values.sort().values
    low = torch.searchsorted(ordered, values, side="left")
    high = torch.searchsorted(ordered, values, side="right")
    return ((low + high - 1).to(torch.float64) / (2 * (n - 1))).to(torch.float32)


def linear(p_old: torch.Tensor, p_new: torch.Tensor, *, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-blind weighted average `alpha·W_new + (1 − alpha)·W_old` (alpha = 1: sequential
    fine-tuning, the new task simply replaces the line)."""
    return torch.full(p_new.shape, alpha, dtype=torch.float32), torch.full(p_new.shape, 1.0 - alpha, dtype=torch.float32)


def element_weights(i_line: torch.Tensor, i_new: torch.Tensor, *, power: float = 0.5) -> torch.Tensor:
    """Per-element weight of the new task, `I_new^p / (I_new^p + I_line^p)`: the interpolation
    `W_old + w·(W_new − W_old)` that Fisher merging is when the scores are Fisher information
    and p = 1 (CoFiMA's continual form), tempered by p (p = 0: 0.5 everywhere). An element
    neither scored takes 0.5."""
    a = i_new.to(torch.float32).clamp_min(0).pow(power)
    b = i_line.to(torch.float32).clamp_min(0).pow(power)
    total = a + b
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(a, 0.5))


def blend(w_old: torch.Tensor, w_new: torch.Tensor, c_new: torch.Tensor, c_old: torch.Tensor, axis: int | None,
          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`c_new·W_new + c_old·W_old` in float32, unit coefficients broadcast along `axis`
    (None: the whole tensor is one unit), returned in `out_dtype` (default: W_new's dtype)."""
    shape = [1] * w_new.dim()
    if axis is not None:
        shape[axis] = -1
    fused = w_new.to(torch.float32) * c_new.reshape(shape)         # one new tensor …
    fused.addcmul_(w_old.to(torch.float32), c_old.reshape(shape))   # … updated in place: no temporaries
    return fused.to(out_dtype or w_new.dtype)


# ---- importance-blind baselines over task vectors (the generalized task arithmetic family) -----
def magnitude_trim(delta: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (at least one); the
    result is returned and `delta` may be overwritten (no copy back: one pass less). The cut is the k-th largest magnitude (`threshold` when the caller found it over a
    whole tensor of which `delta` is a block); entries tied with it are all kept. Float ops
    only (`threshold` + `copysign`): a boolean mask costs several times more on a CPU."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if threshold is None:
        magnitude = delta.abs().reshape(-1)
        k = max(1, int(density * magnitude.numel()))
        threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    below = torch.nextafter(torch.as_tensor(threshold, dtype=torch.float32), torch.tensor(-1.0))  # |d| > below ⟺ |d| ≥ threshold
    kept = torch.nn.functional.threshold_(delta.abs(), float(below), 0.0)
    return kept.copysign_(delta)


def radix_counts(values: torch.Tensor, bucket: int | None = None) -> torch.Tensor:
    """One pass of a radix select over non-negative finite float32 values, whose IEEE-754 bit
    patterns order like the values: counts of the high 16 bits, or (given the high `bucket`
    that holds the wanted value) of the low 16 bits of the values in that bucket."""
    bits = values.reshape(-1).view(torch.int32)
    if bucket is None:
        return torch.bincount(bits >> 16, minlength=1 << 15)
    return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)


def radix_pick(counts: torch.Tensor, k: int, bucket: int | None = None) -> tuple:
    """From summed `radix_counts`: (high bucket, rank of the k-th largest inside it), or with
    `bucket` the k-th largest value itself (as a float32 0-d tensor) and None."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))
    slot = counts.numel() - 1 - j
    if bucket is None:
        return slot, k - (int(from_top[j - 1]) if j else 0)
    return torch.tensor([(bucket << 16) | slot], dtype=torch.int32).view(torch.float32)[0], None


def sample_bracket(sample: torch.Tensor, fraction: float) -> tuple[float, float]:
    """From a sample of values, a range [lo, hi] that very likely (±4σ) holds the value with
    `fraction` of all values at or above it: `bracket_pass` then needs one pass, not two."""
    values = sample.reshape(-1)
    n = values.numel()
    at = fraction * n
    margin = 4 * math.sqrt(max(n * fraction * (1 - fraction), 1.0)) + 8
    top, bottom = int(at - margin), int(math.ceil(at + margin))  # ranks from the top, 0-based

    def ranked(j: int) -> float:  # the value of rank j from the top: a selection, not a sort (7× less)
        return float(torch.kthvalue(values, n - j).values)

    hi = ranked(top) if top >= 0 else math.inf
    lo = ranked(bottom) if bottom < n else 0.0
    return lo, hi


def bracket_pass(values: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """(how many values are > hi, the values in [lo, hi]) of one block."""
    values = values.reshape(-1)
    above = int((values - hi).sign_().clamp_min_(0).sum())  # float ops: a boolean sum costs 3× more
    if hi < math.inf:  # one cheap test with slack for rounding (|hi|·1e-6 ≫ an ulp), then the exact one
        near = (values - 0.5 * (lo + hi)).abs_() <= 0.5 * (hi - lo) + abs(hi) * 1e-6 + 1e-40
    else:
        near = values >= lo
    candidates = values[near]
    return above, candidates[(candidates >= lo) & (candidates <= hi)]  # exact edges, on the few


def bracket_pick(above: int, candidates: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k-th largest value overall from a bracket pass's summed results, or None when the
    bracket missed it (the caller falls back to the radix select)."""
    if not above < k <= above + candidates.numel():
        return None
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def kth_largest(count: Callable[[Callable[[list[torch.Tensor]], list[torch.Tensor]]], list[torch.Tensor]],
                ks: list[int]) -> list[torch.Tensor]:
    """For each of several series of non-negative finite float32 values, streamed as blocks, its
    `ks[i]`-th largest value, exactly, in two passes and a few hundred KB of counts.
    `count(fn)` applies `fn` to every block (a list holding a block of each series) and returns
    the element-wise sums of its results; it is called twice (the engine maps it on its pool)."""
    picks = [radix_pick(counts, k) for counts, k in zip(count(lambda block: [radix_counts(v) for v in block]), ks, strict=True)]
    low = count(lambda block: [radix_counts(v, bucket) for v, (bucket, _) in zip(block, picks)])
    return [radix_pick(counts, rank, bucket)[0] for counts, (bucket, rank) in zip(low, picks)]


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE, in place: drop each entry with probability 1 − density, rescale the rest by 1/density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta.mul_(keep).div_(density)


def task_vector_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *, sparsify: str | None = None,
                      density: float = 1.0, consensus: bool = False, normalize: bool = False, lam: float = 1.0,
                      maximum: bool = False, generator: torch.Generator | None = None,
                      thresholds: list[torch.Tensor | None] | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`base + lam · merge(w_i · sparsify(t_i − base))`, where merge is a plain sum, or with
    `consensus` (TIES) the sum over entries whose sign agrees with the weighted majority (a
    zero sum counts as positive); `normalize` divides by the summed weights of the entries
    kept. Works input by input, in place: a handful of tensor-sized buffers, whatever the count.
    `maximum` (MagMax): per entry the task vector of largest magnitude, its sign kept, weights
    ignored. `thresholds`: per input, TIES' magnitude cut found over the whole tensor (when the
    tensors are blocks of it). Returned in `out_dtype` (default: the last input's dtype)."""
    if maximum:
        return max_magnitude_merge(base, tensors, lam=lam, out_dtype=out_dtype)
    if consensus and normalize and len(tensors) == 2 and min(weights) > 0:  # TIES of a line and a task
        return consensus_pair(base, tensors, weights, sparsify=sparsify, density=density, lam=lam,
                              generator=generator, thresholds=thresholds, out_dtype=out_dtype)
    return _merge_each(base, tensors, weights, sparsify=sparsify, density=density, consensus=consensus,
                       normalize=normalize, lam=lam, generator=generator, thresholds=thresholds, out_dtype=out_dtype)


def _sparsified(tensor: torch.Tensor, reference: torch.Tensor, sparsify: str | None, density: float,
                threshold: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    delta = tensor.to(torch.float32, copy=True).sub_(reference)  # never the caller's tensor
    if sparsify == "magnitude":
        return magnitude_trim(delta, density, threshold)
    if sparsify == "random":
        random_drop(delta, density, generator)
    return delta


def consensus_pair(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *, sparsify: str | None,
                   density: float, lam: float, generator: torch.Generator | None,
                   thresholds: list[torch.Tensor | None] | None, out_dtype: torch.dtype | None) -> torch.Tensor:
    """TIES (consensus + normalize) of exactly two task vectors with positive weights — every
    fuse of a task into a line — bit for bit what `_merge_each` computes, in 34 element-wise
    passes instead of 52: with two inputs an entry is kept where it is non-zero with the
    elected sign, so two 0/1 factors replace the running positive/negative sums."""
    reference = base.to(torch.float32)
    a, b = (_sparsified(t, reference, sparsify, density, thresholds[i] if thresholds else None, generator).mul_(w)
            for i, (t, w) in enumerate(zip(tensors, weights, strict=True)))
    elected = torch.add(a, b).sign_().add_(0.5).sign_()          # +1 where a + b ≥ 0 (a tie counts as +), else −1
    keep_a = torch.mul(a, elected).sign_().clamp_min_(0)          # 1 where a is non-zero with the elected sign
    keep_b = elected.mul_(b).sign_().clamp_min_(0)
    mixed = a.mul_(keep_a).add_(b.mul_(keep_b)).add_(0.0)        # + 0.0: a sum of zeros is +0, as in the general rule
    divisor = keep_b.mul_(weights[1]).add_(keep_a, alpha=weights[0]).clamp_min_(min(weights))
    return mixed.div_(divisor).mul_(lam).add_(reference).to(out_dtype or tensors[-1].dtype)


def _merge_each(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *, sparsify: str | None,
                density: float, consensus: bool, normalize: bool, lam: float, generator: torch.Generator | None,
                thresholds: list[torch.Tensor | None] | None, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The general rule, input by input with running sums (any number of inputs, any weights)."""
    reference = base.to(torch.float32)
    mixed = torch.zeros_like(reference)
    if consensus:  # running sums of the positive and negative parts, and of the weights behind them
        total, negative = torch.zeros_like(reference), torch.zeros_like(reference)
        weight_pos, weight_neg = torch.zeros_like(reference), torch.zeros_like(reference)
    for i, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
        delta = _sparsified(tensor, reference, sparsify, density, thresholds[i] if thresholds else None, generator)
        delta.mul_(weight)
        if not consensus:
            mixed.add_(delta)
            continue
        total.add_(delta)
        positive_part = delta.clamp_min(0)
        mixed.add_(positive_part)
        negative.add_(delta.sub_(positive_part))                  # delta now holds min(delta, 0)
        weight_pos.add_(positive_part.sign_(), alpha=weight)      # 1 where delta > 0
        weight_neg.add_(delta.sign_().neg_(), alpha=weight)       # 1 where delta < 0
        del delta, positive_part
    if consensus:  # the elected sign: + where the weighted sum is ≥ 0; keep only entries of that sign
        plus = total.sign_().add_(1).clamp_max_(1)                # 1 or 0, exactly
        minus = torch.ones_like(plus).sub_(plus)
        mixed.mul_(plus).addcmul_(negative, minus)
        divisor = weight_pos.mul_(plus).addcmul_(weight_neg, minus)
        positive = [w for w in weights if w > 0]
        if len(positive) == len(weights):  # a non-zero divisor is ≥ the smallest weight; where it is 0, so is `mixed`
            divisor.clamp_min_(min(positive))
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
    else:
        divisor = max(sum(weights), 1e-8)
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lam).add_(reference).to(out_dtype or tensors[-1].dtype)


def max_magnitude_merge(base: torch.Tensor, tensors: list[torch.Tensor], *, lam: float = 1.0,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MagMax (Marczak et al., 2024): `base + lam · τ*`, where τ*'s every entry is the entry of
    largest magnitude among the task vectors `τ_i = t_i − base`, sign included (the first
    input wins a tie). A data-free, per-parameter selection: no averaging shrinks an update."""
    reference = base.to(torch.float32)
    chosen = tensors[0].to(torch.float32, copy=True).sub_(reference)
    for tensor in tensors[1:]:
        delta = tensor.to(torch.float32, copy=True).sub_(reference)
        chosen = torch.where(delta.abs() > chosen.abs(), delta, chosen)
    return chosen.mul_(lam).add_(reference).to(out_dtype or tensors[-1].dtype)


def lora_product(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """A LoRA module's update ΔW = B·A (out × in) in float32, without peft's constant scale
    `lora_alpha / r`: the task-vector rules are homogeneous, so a common scale changes nothing."""
    return lora_b.to(torch.float32) @ lora_a.to(torch.float32)


def refactor_to_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` approximation of `delta` (Eckart–Young: truncated SVD) as LoRA
    factors `(A, B)` with `B·A ≈ delta`, the singular values split evenly between them
    (`B = U·√S`, `A = √S·Vᵀ`), and the squared Frobenius norms of what was cut and of `delta`."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    lora_b = torch.zeros(delta.shape[0], rank)
    lora_a = torch.zeros(rank, delta.shape[1])
    lora_b[:, :kept] = u[:, :kept] * root
    lora_a[:kept] = root[:, None] * vh[:kept]
    return lora_a, lora_b, float(s[kept:].pow(2).sum()), float(s.pow(2).sum())


def regmean(deltas: list[torch.Tensor], grams: list[torch.Tensor], *, non_diagonal: float = 0.9) -> torch.Tensor:
    """RegMean (Jin et al., 2023) for one linear layer's updates: the ΔW minimising
    Σ_i ‖X_i ΔWᵀ − X_i ΔW_iᵀ‖², i.e. `(Σ ΔW_i G_i)(Σ G_i)⁻¹` with `G_i = X_iᵀX_i` (in × in), each
    G's off-diagonal entries scaled by `non_diagonal` first (1: the exact least-squares merge,
    0: a per-input-feature weighted average). A common base weight cancels, so merging the
    updates merges the layers. Solved, not inverted; a tiny ridge keeps a rank-deficient sum solvable."""
    def reduced(gram: torch.Tensor) -> torch.Tensor:
        gram = gram.to(torch.float64)
        diagonal = torch.diag(torch.diagonal(gram))
        return non_diagonal * gram + (1 - non_diagonal) * diagonal

    reduced_grams = [reduced(g) for g in grams]
    total = sum(reduced_grams)
    weighted = sum(d.to(torch.float64) @ g for d, g in zip(deltas, reduced_grams, strict=True))
    ridge = 1e-9 * float(torch.diagonal(total).mean().clamp_min(1e-30))
    total = total + ridge * torch.eye(total.shape[0], dtype=torch.float64)
    return torch.linalg.solve(total, weighted.T).T.to(torch.float32)  # G symmetric: X·G = B ⟺ G·Xᵀ = Bᵀ


TASK_VECTOR_CONFIGS = {  # method → how task_vector_merge is configured (mergekit's defaults for each)
    "task-arithmetic": {"sparsify": None, "consensus": False, "normalize": False},
    "ties": {"sparsify": "magnitude", "consensus": True, "normalize": True},
    "dare-linear": {"sparsify": "random", "consensus": False, "normalize": False},
    "dare-ties": {"sparsify": "random", "consensus": True, "normalize": False},
    "magmax": {"sparsify": None, "consensus": False, "normalize": False, "maximum": True},
}
