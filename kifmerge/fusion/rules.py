"""Fusion rules as pure tensor functions (no files, no registry), one per method.

Profiles are flat vectors of normalised unit scores in [0, 1]. A rule turns the old and
new profiles into per-unit coefficients `(c_new, c_old)`; `blend` then applies them to
one tensor, broadcasting each unit's coefficient along the tensor's unit axis.
"""

from __future__ import annotations

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


def linear(p_old: torch.Tensor, p_new: torch.Tensor, *, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-blind weighted average `alpha·W_new + (1 − alpha)·W_old` (alpha = 1: sequential
    fine-tuning, the new task simply replaces the line)."""
    return torch.full(p_new.shape, alpha, dtype=torch.float32), torch.full(p_new.shape, 1.0 - alpha, dtype=torch.float32)


def blend(w_old: torch.Tensor, w_new: torch.Tensor, c_new: torch.Tensor, c_old: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`c_new·W_new + c_old·W_old` in float32, unit coefficients broadcast along `axis`
    (None: the whole tensor is one unit), returned in W_new's dtype."""
    shape = [1] * w_new.dim()
    if axis is not None:
        shape[axis] = -1
    fused = w_new.to(torch.float32) * c_new.reshape(shape)         # one new tensor …
    fused.addcmul_(w_old.to(torch.float32), c_old.reshape(shape))   # … updated in place: no temporaries
    return fused.to(w_new.dtype)


# ---- importance-blind baselines over task vectors (the generalized task arithmetic family) -----
def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (at least one), in
    place. The cut is a k-th value, not a full sort; entries tied with it are all kept."""
    if density >= 1:
        return delta
    magnitude = delta.abs().reshape(-1)
    k = max(1, int(density * magnitude.numel()))
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    return delta.mul_(delta.abs() >= threshold)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE, in place: drop each entry with probability 1 − density, rescale the rest by 1/density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta.mul_(keep).div_(density)


def task_vector_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *, sparsify: str | None = None,
                      density: float = 1.0, consensus: bool = False, normalize: bool = False, lam: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """`base + lam · merge(w_i · sparsify(t_i − base))`, where merge is a plain sum, or with
    `consensus` (TIES) the sum over entries whose sign agrees with the weighted majority (a
    zero sum counts as positive); `normalize` divides by the summed weights of the entries
    kept. Works input by input, in place: a handful of tensor-sized buffers, whatever the count.
    Returned in the last input's dtype."""
    reference = base.to(torch.float32)
    deltas = []
    for tensor, weight in zip(tensors, weights, strict=True):
        delta = tensor.to(torch.float32) - reference
        if sparsify == "magnitude":
            magnitude_trim(delta, density)
        elif sparsify == "random":
            random_drop(delta, density, generator)
        deltas.append(delta.mul_(weight))
    mixed = torch.zeros_like(reference)
    if consensus:
        for delta in deltas:
            mixed.add_(delta)
        positive = mixed >= 0
        mixed.zero_()
        divisor = torch.zeros_like(reference)
        for delta, weight in zip(deltas, weights, strict=True):
            agree = torch.where(positive, delta > 0, delta < 0)
            mixed.add_(delta.mul_(agree))
            divisor.add_(agree, alpha=weight)
        divisor[divisor == 0] = 1.0
    else:
        for delta in deltas:
            mixed.add_(delta)
        divisor = max(sum(weights), 1e-8)
    del deltas
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lam).add_(reference).to(tensors[-1].dtype)


BASELINES = {  # method → how task_vector_merge is configured (mergekit's defaults for each)
    "task-arithmetic": {"sparsify": None, "consensus": False, "normalize": False},
    "ties": {"sparsify": "magnitude", "consensus": True, "normalize": True},
    "dare-linear": {"sparsify": "random", "consensus": False, "normalize": False},
    "dare-ties": {"sparsify": "random", "consensus": True, "normalize": False},
}
