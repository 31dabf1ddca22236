"""Importance profiles: the interchange file format, normalisation and accumulation.

File format (safetensors, never pickle): keys are unit-group names, values 1-D float32
tensors of raw unit scores, metadata `{"format": "kifmerge-profile", "version": "1",
"unit": "lora-rank" | "tensor"}`. In memory a profile is the flat vector of all unit scores
in layout order (`UnitLayout.offsets`), which is what the fusion rules consume.

Element level (optional, same file): keys `element:<tensor name>` hold one score per
parameter element, shaped like the checkpoint's tensor, float16 (`kifmerge train` records
them for LoRA adapters: the adapter's size, at half its bytes). They are normalised to mean 1
over the whole checkpoint, so two tasks' scores compare element by element; a reader that
does not know them ignores them.

Gram matrices (optional, same file, for RegMean): keys `gram:<module>` hold a LoRA module's
input Gram matrix `XᵀX`, float32, as its upper triangle packed row by row (1-D, n(n+1)/2; a
full n × n matrix reads too, as written before 2026-12-06). Modules that see the same inputs
(q/k/v of one attention layer) store it once: metadata `gram-shared` maps each such module to
the one whose key holds it (JSON). Both halve the storage, exactly: a Gram is symmetric.
Metadata `gram-precision: float32` says they were summed in float32; a file without it written
by a --bf16/--fp16 training (before 2026-12-06) holds sums taken in bfloat16, which RegMean
does not use (kifmerge/services/fusing.py, `imprecise_grams`).
"""

from __future__ import annotations

import json
import math

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kifmerge.errors import InvalidInputError, NotFoundError
from kifmerge.profile_format import ELEMENT, FORMAT, GRAM, GRAM_PRECISION, GRAM_SHARED, NOT_UNITS, VERSION  # noqa: F401 (re-exported)
from kifmerge.units import UnitLayout


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Min–max to [0, 1]; a constant profile becomes all zeros (never NaN). Computed in
    float64, so a range wider than float32 holds (e.g. ±3e38) cannot overflow to inf/inf."""
    wide = scores.to(torch.float64)
    low, high = wide.min(), wide.max()
    if not bool(high > low):
        return torch.zeros_like(scores, dtype=torch.float32)
    return ((wide - low) / (high - low)).to(torch.float32)


def accumulate(p_old: torch.Tensor, p_new: torch.Tensor, weights: tuple[float, float] = (0.3, 0.7)) -> torch.Tensor:
    """The line's profile after a fuse: `normalise(w_new·P_new + w_old·P_old)`."""
    w_new, w_old = weights
    return normalise(w_new * normalise(p_new) + w_old * normalise(p_old))


def flatten(groups: dict[str, torch.Tensor], layout: UnitLayout) -> torch.Tensor:
    return torch.cat([groups[name].reshape(-1).to(torch.float32) for name in layout.groups])


def unflatten(flat: torch.Tensor, layout: UnitLayout) -> dict[str, torch.Tensor]:
    return {name: flat[part].clone().contiguous() for name, part in layout.offsets().items()}


def read_profile(path: str | Path, layout: UnitLayout) -> torch.Tensor:
    """Read and validate a profile file against a checkpoint's layout; returns flat raw scores."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"profile file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
            groups = {name: handle.get_tensor(name) for name in handle.keys() if not name.startswith(NOT_UNITS)}
    except SafetensorError as exc:
        raise InvalidInputError(f"profile {path} is not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InvalidInputError(f"profile {path} lacks metadata format={FORMAT!r} version={VERSION!r}")
    if meta.get("unit") != layout.unit:
        raise InvalidInputError(f"profile {path} scores {meta.get('unit')!r} units but the checkpoint has {layout.unit!r} units")
    missing = [name for name in layout.groups if name not in groups]
    extra = sorted(set(groups) - set(layout.groups))
    if missing:
        raise InvalidInputError(f"profile {path} has no scores for {missing[0]} ({len(missing)} groups missing)")
    if extra:
        raise InvalidInputError(f"profile {path} scores {extra[0]}, which the checkpoint does not have ({len(extra)} extra)")
    for name, count in layout.groups.items():
        scores = groups[name]
        if scores.dim() != 1 or scores.numel() != count:
            raise InvalidInputError(f"profile {path}: {name} has {list(scores.shape)} scores, expected 1-D of length {count}")
        # finite after the float32 conversion the scores are used in (a float64 1e300 would become inf)
        if not scores.is_floating_point() or not bool(torch.isfinite(scores.to(torch.float32)).all()):
            raise InvalidInputError(f"profile {path}: {name} holds NaN, infinite or non-float scores (or beyond float32's range)")
        if bool((scores < 0).any()):
            raise InvalidInputError(f"profile {path}: {name} holds negative scores (importance scores are >= 0)")
    return flatten(groups, layout)


def write_profile(path: str | Path, flat: torch.Tensor, layout: UnitLayout, extra_meta: dict[str, str] | None = None,
                  elements: dict[str, torch.Tensor] | None = None, grams: dict[str, torch.Tensor] | None = None) -> None:
    meta = {"format": FORMAT, "version": VERSION, "unit": layout.unit, **(extra_meta or {})}
    tensors = unflatten(flat.to(torch.float32), layout)
    if elements:
        tensors.update({ELEMENT + name: score.to(torch.float16).contiguous() for name, score in normalise_elements(elements).items()})
    if grams:
        gram_tensors, gram_meta = gram_entries(grams)
        tensors.update(gram_tensors)
        meta.update(gram_meta)
    save_file(tensors, str(path), metadata=meta)


def gram_entries(grams: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The safetensors keys and metadata that store `grams` (packed, shared ones once): what
    `read_grams` reads, in a profile or in a training checkpoint's state, marked as summed in
    float32 (every writer sums them so; a line's never includes a sum that was not: fusing.py)."""
    packed, shared = pack_grams(grams)
    meta = {GRAM_PRECISION[0]: GRAM_PRECISION[1]}
    if shared:
        meta[GRAM_SHARED] = json.dumps(shared, sort_keys=True)
    return {GRAM + name: gram for name, gram in packed.items()}, meta


def grams_precise(path: str | Path) -> bool:
    """Whether the file's Gram matrices were summed in float32 (written since 2026-12-06); an
    older file's were too unless its training ran under --bf16/--fp16, which the caller knows."""
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(GRAM_PRECISION[0]) == GRAM_PRECISION[1]


def pack_grams(grams: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct Gram matrix once, as its packed upper triangle, and which modules share one
    (bit-equal matrices: q/k/v of a layer see the same inputs). The triangle of the symmetrised
    matrix, so an XᵀX whose float sums differ in the last bit across the diagonal still packs."""
    packed: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    seen: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name in sorted(grams):
        gram = grams[name].to(torch.float32)
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"the Gram matrix of {name} is not square: {list(gram.shape)}")
        fingerprint = (gram.shape[0], float(gram.sum()), float(gram[0].sum()))
        owner = next((other for other, kept in seen.get(fingerprint, []) if kept is gram or torch.equal(kept, gram)), None)
        if owner is not None:
            shared[name] = owner
            continue
        seen.setdefault(fingerprint, []).append((name, gram))
        packed[name] = (0.5 * gram + 0.5 * gram.T)[_upper(gram.shape[0])]  # row by row: a boolean mask keeps that order
    return packed, shared


def unpack_gram(packed: torch.Tensor) -> torch.Tensor | None:
    """The n × n symmetric matrix of a packed upper triangle (a 2-D matrix is returned as it is),
    or None when the length is no triangular number."""
    if packed.dim() == 2:
        return packed
    if packed.dim() != 1:
        return None
    n = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if n < 1 or n * (n + 1) // 2 != packed.numel():
        return None
    full = torch.zeros(n, n, dtype=packed.dtype)
    full[_upper(n)] = packed
    return full + full.triu(1).T


def _upper(n: int) -> torch.Tensor:
    """The upper triangle of an n × n matrix, diagonal included, as a boolean mask (n² bytes: index
    pairs would take 8 n² for a 4096-wide Gram matrix)."""
    return torch.ones(n, n, dtype=torch.bool).triu()


def read_grams(path: str | Path, modules: list[str], widths: dict[str, int] | None = None) -> dict[str, torch.Tensor] | None:
    """A profile's Gram matrices, one per LoRA module (all of `modules`, square, finite, and as wide
    as the module's input where `widths` says), or None. Modules that share one get the same tensor."""
    found = _prefixed(path, GRAM)
    if not found:
        return None
    with safe_open(str(path), framework="pt") as handle:
        raw_shared = (handle.metadata() or {}).get(GRAM_SHARED)
    try:
        shared = json.loads(raw_shared) if raw_shared else {}
        if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
            raise ValueError("not a mapping of module names")
    except ValueError as exc:
        raise InvalidInputError(f"profile {path}: metadata {GRAM_SHARED!r} is not a JSON mapping of module names ({exc})") from None
    contradictions = sorted(name for name, owner in shared.items() if name in found or name == owner)
    if contradictions:
        raise InvalidInputError(f"profile {path}: the Gram matrix of {contradictions[0]} is both stored and shared "
                                f"(metadata {GRAM_SHARED!r})")
    orphans = sorted(name for name, owner in shared.items() if owner not in found)
    if orphans:
        raise InvalidInputError(f"profile {path}: the Gram matrix of {orphans[0]} is shared with "
                                f"{shared[orphans[0]]}, which has none")
    if set(found) | set(shared) != set(modules):
        return None
    grams = {}
    for name, stored in found.items():
        gram = unpack_gram(stored)
        if gram is None or gram.shape[0] != gram.shape[1] or not gram.is_floating_point() or not bool(torch.isfinite(gram).all()):
            raise InvalidInputError(f"profile {path}: the Gram matrix of {name} is not a finite square matrix "
                                    f"(n × n, or its upper triangle of n(n+1)/2 values)")
        if widths and name in widths and gram.shape[0] != widths[name]:
            raise InvalidInputError(f"profile {path}: the Gram matrix of {name} is {gram.shape[0]} × {gram.shape[0]}, but the "
                                    f"module reads {widths[name]} input features")
        grams[name] = gram
    grams.update({name: grams[owner] for name, owner in shared.items()})
    return grams


def normalise_elements(elements: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Non-negative scores scaled to mean 1 over all elements (all zeros: all ones, no signal),
    float32, and clipped at float16's largest value ÷ 2 so that they store in float16."""
    total = sum(float(t.to(torch.float64).clamp_min(0).sum()) for t in elements.values())
    count = sum(t.numel() for t in elements.values())
    if not (math.isfinite(total) and total > 0):  # no elements, all zero, or a sum beyond float64: no signal
        return {name: torch.ones_like(t, dtype=torch.float32) for name, t in elements.items()}
    mean = total / count  # divided by, not multiplied by its inverse: a subnormal mean's inverse overflows
    return {name: (t.to(torch.float64).clamp_min(0) / mean).clamp_max(32000.0).to(torch.float32) for name, t in elements.items()}


def _prefixed(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The profile's tensors whose keys start with `prefix` (element scores, Gram matrices), by the rest of the key."""
    with safe_open(str(path), framework="pt") as handle:
        return {name[len(prefix):]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}


def read_elements(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
    """A profile's element-level scores (float32) checked against the checkpoint's tensor
    shapes, or None when the profile has none for every tensor."""
    found = _prefixed(path, ELEMENT)
    if not found or set(found) != set(shapes):
        return None
    for name, score in found.items():
        if tuple(score.shape) != tuple(shapes[name]) or not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise InvalidInputError(f"profile {path}: element scores of {name} do not fit the tensor (shape {list(score.shape)})")
    return {name: score.to(torch.float32) for name, score in found.items()}


def accumulate_elements(line: dict[str, torch.Tensor], new: dict[str, torch.Tensor], tasks_before: int) -> dict[str, torch.Tensor]:
    """The line's element scores after a fuse: the running mean over the tasks it holds
    (`tasks_before` of them in `line`), each task's scores normalised first."""
    line, new = normalise_elements(line), normalise_elements(new)
    n = max(tasks_before, 1)
    return {name: (n * line[name] + new[name]) / (n + 1) for name in new}



def from_unit_scores(groups: dict[str, torch.Tensor], layout: UnitLayout) -> torch.Tensor:
    """Flat raw scores for a layout from measured groups; a group nobody measured (a frozen or
    unused tensor) scores 0, and measured tensors the checkpoint does not save are dropped."""
    return torch.cat([groups[name].reshape(-1).to(torch.float32).cpu() if name in groups else torch.zeros(count)
                      for name, count in layout.groups.items()])
