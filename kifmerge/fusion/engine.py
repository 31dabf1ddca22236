"""The streaming fusion engine: reads one tensor at a time from safetensors, applies a rule's
unit coefficients, and writes output shards incrementally (like mergekit's lazy loader and
shard writer). Peak memory is one tensor of each input plus at most one output shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kifmerge.errors import InvalidInputError
from kifmerge.fusion.rules import blend
from kifmerge.units import UnitLayout

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


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


class ShardWriter:
    """Collect tensors into shards of at most `max_shard_bytes` and write each when full.

    With one shard the file is `single_name`; with several they are renamed to the Hugging Face
    `model-0000k-of-0000n.safetensors` convention and an index is written.
    """

    def __init__(self, out_dir: Path, single_name: str, index_name: str | None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir, self.single_name, self.index_name = out_dir, single_name, index_name
        self.max_shard_bytes = max_shard_bytes if index_name else None
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes and self.current and self.current_bytes + size > self.max_shard_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.current:
            return
        path = self.out_dir / f"shard-{len(self.written):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.written.append((path, sorted(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Write what is pending; returns (file name → path, index included; tensor → file name)."""
        self.flush()
        if len(self.written) <= 1:
            path, names = self.written[0] if self.written else (self.out_dir / "empty", [])
            final = self.out_dir / self.single_name
            if self.written:
                path.rename(final)
            return {self.single_name: final}, {n: self.single_name for n in names}
        count = len(self.written)
        files, weight_map = {}, {}
        for k, (path, names) in enumerate(self.written, start=1):
            name = f"model-{k:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / name)
            files[name] = self.out_dir / name
            weight_map.update({n: name for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / self.index_name).write_text(json.dumps(index, indent=2, sort_keys=True))
        files[self.index_name] = self.out_dir / self.index_name
        return files, weight_map


def fuse_streaming(
    old: LazyTensorReader,
    new: LazyTensorReader,
    layout: UnitLayout,
    c_new: torch.Tensor,
    c_old: torch.Tensor,
    writer: ShardWriter,
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
