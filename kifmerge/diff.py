"""Per-unit change between two checkpoints of the same unit layout, streamed from safetensors.

For each skill unit the squared Frobenius norms of `W_B − W_A` and of `W_A` over the unit's
parameters: a LoRA rank unit is row r of `lora_A` together with column r of `lora_B`; a
tensor unit is the whole tensor. Tensors are read one at a time (large ones in row blocks),
never a whole model.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from kifmerge.units import UnitLayout

BLOCK_BYTES = 64 * 2**20  # rows read at once from a large tensor (float32 after conversion)


def unit_norms(files_a: dict[str, Path], map_a: dict[str, str], files_b: dict[str, Path], map_b: dict[str, str],
               layout: UnitLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖W_B − W_A‖², ‖W_A‖²) per unit, flat in layout order, float64."""
    diff_sq = torch.zeros(layout.size, dtype=torch.float64)
    base_sq = torch.zeros(layout.size, dtype=torch.float64)
    offsets = layout.offsets()
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(path: Path):
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path]

        for name, slot in sorted(layout.slots.items()):
            a, b = handle(files_a[map_a[name]]), handle(files_b[map_b[name]])
            d, n = _tensor_unit_norms(a.get_slice(name), b.get_slice(name), slot.axis)
            part = offsets[slot.group]
            diff_sq[part] += d
            base_sq[part] += n
    return diff_sq, base_sq


def _tensor_unit_norms(slice_a, slice_b, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of (B − A) and A for each unit along `axis` (None: one unit, the tensor)."""
    shape = slice_a.get_shape()
    if list(slice_b.get_shape()) != list(shape):
        raise ValueError(f"shapes differ: {shape} vs {slice_b.get_shape()}")
    if (axis is not None and axis != 0) or len(shape) == 0:  # LoRA B [out, r] (small) or a scalar: read whole
        a, b = slice_a[...].to(torch.float64), slice_b[...].to(torch.float64)
        dims = [d for d in range(a.dim()) if d != axis]
        if axis is None:
            return ((b - a) ** 2).sum().reshape(1), (a ** 2).sum().reshape(1)
        return ((b - a) ** 2).sum(dim=dims), (a ** 2).sum(dim=dims)
    rows = shape[0]
    row_elements = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
    step = max(1, BLOCK_BYTES // (8 * row_elements))
    per_row_d, per_row_n = [], []
    for start in range(0, rows, step):
        a = slice_a[start:start + step].to(torch.float64).reshape(-1, row_elements)
        b = slice_b[start:start + step].to(torch.float64).reshape(-1, row_elements)
        per_row_d.append(((b - a) ** 2).sum(dim=1))
        per_row_n.append((a ** 2).sum(dim=1))
    d, n = torch.cat(per_row_d), torch.cat(per_row_n)
    if axis is None:
        return d.sum().reshape(1), n.sum().reshape(1)
    return d, n
