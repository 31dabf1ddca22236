"""The streaming fusion engine: reads one tensor at a time from safetensors (like mergekit's
lazy loader), applies a rule's unit coefficients, and hands each result to a
`StreamingShardWriter`, which puts it straight into its output shard. Peak memory is one
tensor of each input and of the output, whatever the model size.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from kifmerge.errors import InvalidInputError
from kifmerge.fusion.rules import BASELINES, blend, task_vector_merge
from kifmerge.fusion.writer import StreamingShardWriter
from kifmerge.units import UnitLayout


class LazyTensorReader:
    """Hand out single tensors from safetensors files. Each read opens the file, copies the one
    tensor out and closes it again: an open handle keeps its memory map, and the pages it has
    touched count in the process's resident memory, which would then grow to the input's size."""

    def __init__(self, files: dict[str, Path], weight_map: dict[str, str]):
        self.files, self.weight_map = files, weight_map

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[self.weight_map[name]], framework="pt") as handle:
            return handle.get_tensor(name)


def stream_fused(names: list[str], compute: Callable[[str], torch.Tensor], writer: StreamingShardWriter,
                 progress: Callable[[int], None] | None = None) -> None:
    """Compute each output tensor, refuse it if not finite, hand it to the writer, drop it."""
    for name in names:
        fused = compute(name)
        if fused.is_floating_point() and not bool(torch.isfinite(fused).all()):
            raise InvalidInputError(f"fused tensor {name} is not finite (an overflow in {fused.dtype}?); nothing was written")
        writer.add(name, fused)
        del fused
        if progress:
            progress(1)


def _pair(old: LazyTensorReader, new: LazyTensorReader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    w_old, w_new = old.get(name), new.get(name)
    if w_old.shape != w_new.shape:
        raise InvalidInputError(f"tensor {name} has shape {list(w_new.shape)} in the task but {list(w_old.shape)} in the line")
    return w_old, w_new


def unit_blend(old: LazyTensorReader, new: LazyTensorReader, layout: UnitLayout, c_new: torch.Tensor,
               c_old: torch.Tensor) -> Callable[[str], torch.Tensor]:
    """Per-unit rules (kif, kif-adaptive, linear): `c_new·new + c_old·old` unit by unit."""
    offsets = layout.offsets()

    def compute(name: str) -> torch.Tensor:
        w_old, w_new = _pair(old, new, name)
        slot = layout.slots[name]
        part = offsets[slot.group]
        return blend(w_old, w_new, c_new[part], c_old[part], slot.axis)

    return compute


def task_vector_blend(old: LazyTensorReader, new: LazyTensorReader, base: LazyTensorReader | None, method: str, *,
                      weights: list[float], density: float, lam: float, seed: int) -> Callable[[str], torch.Tensor]:
    """Baselines over task vectors `t − base`; with no base reader the reference is zero (LoRA
    factors: the base model has no adapter). DARE draws from a generator seeded per tensor name,
    so a version is reproducible whatever the order tensors are visited in."""
    config = BASELINES[method]

    def compute(name: str) -> torch.Tensor:
        w_old, w_new = _pair(old, new, name)
        reference = base.get(name) if base is not None else torch.zeros_like(w_new)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return task_vector_merge(reference, [w_old, w_new], weights, density=density, lam=lam, generator=generator, **config)

    return compute
