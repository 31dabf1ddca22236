"""The streaming fusion engine: reads one tensor at a time from safetensors (like mergekit's
lazy loader), applies a rule's unit coefficients, and hands each result to a
`StreamingShardWriter`, which puts it straight into its output shard. Peak memory is one
tensor of each input and of the output, whatever the model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from kifmerge.errors import InvalidInputError
from kifmerge.fusion.rules import blend
from kifmerge.fusion.writer import StreamingShardWriter
from kifmerge.units import UnitLayout


class LazyTensorReader:
    """Open safetensors handles on demand and hand out single tensors."""

    def __init__(self, files: dict[str, Path], weight_map: dict[str, str]):
        self.files, self.weight_map = files, weight_map
        self._handles: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.files[file], framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def fuse_streaming(
    old: LazyTensorReader,
    new: LazyTensorReader,
    layout: UnitLayout,
    c_new: torch.Tensor,
    c_old: torch.Tensor,
    writer: StreamingShardWriter,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Blend every tensor of the layout: `c_new·new + c_old·old` per unit."""
    offsets = layout.offsets()
    for name, slot in layout.slots.items():
        w_old, w_new = old.get(name), new.get(name)
        if w_old.shape != w_new.shape:
            raise InvalidInputError(f"tensor {name} has shape {list(w_new.shape)} in the task but {list(w_old.shape)} in the line")
        part = offsets[slot.group]
        fused = blend(w_old, w_new, c_new[part], c_old[part], slot.axis)
        if fused.is_floating_point() and not bool(torch.isfinite(fused).all()):
            raise InvalidInputError(f"fused tensor {name} is not finite (an overflow in {fused.dtype}?); nothing was written")
        writer.add(name, fused)
        del w_old, w_new
        if progress:
            progress(1)
