"""Write safetensors shards tensor by tensor, straight to disk.

The output's names, dtypes and shapes are known before any value is computed (they are the
inputs'), so the shard plan (huggingface_hub's `split_state_dict_into_shards_factory`: the
hub's file names and index) and every file header are fixed up front. Each fused tensor is
then written at its offset and dropped: memory holds one tensor, never a shard. A shard is
written under a temporary name and renamed when its last tensor is in.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from kifmerge.errors import InvalidInputError

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the Hugging Face default, "5GB"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BYTES[self.dtype]


@dataclass
class _Shard:
    path: Path
    temp: Path
    header: bytes
    offsets: dict[str, int]
    pending: set[str]
    handle: object | None = None


class StreamingShardWriter:
    """`add(name, tensor)` in any order; `finish()` returns (file name → path, tensor → file)."""

    def __init__(self, out_dir: Path, specs: dict[str, TensorSpec], *, filename_pattern: str = "model{suffix}.safetensors",
                 index_name: str | None = "model.safetensors.index.json", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir, self.specs, self.index_name = Path(out_dir), dict(sorted(specs.items())), index_name
        split = split_state_dict_into_shards_factory(
            self.specs, get_storage_size=lambda spec: spec.nbytes, filename_pattern=filename_pattern,
            max_shard_size=max_shard_bytes if index_name else 2**62)
        self.split = split
        self.shards: dict[str, _Shard] = {}
        for file, names in split.filename_to_tensors.items():
            entries, offsets, position = {}, {}, 0
            for name in sorted(names):
                spec = self.specs[name]
                entries[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [position, position + spec.nbytes]}
                offsets[name] = position
                position += spec.nbytes
            header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
            self.shards[file] = _Shard(self.out_dir / file, self.out_dir / f".{file}.partial", header, offsets, set(names))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidInputError(f"tensor {name} is not part of the planned output")
        if SAFETENSORS_DTYPES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise InvalidInputError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)}")
        shard = self.shards[self.split.tensor_to_filename[name]]
        if name not in shard.pending:
            raise InvalidInputError(f"tensor {name} was written twice")
        if shard.handle is None:
            shard.handle = open(shard.temp, "wb")
            shard.handle.write(struct.pack("<Q", len(shard.header)) + shard.header)
        shard.handle.seek(8 + len(shard.header) + shard.offsets[name])
        shard.handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        shard.pending.discard(name)
        if not shard.pending:
            shard.handle.flush()
            os.fsync(shard.handle.fileno())
            shard.handle.close()
            os.replace(shard.temp, shard.path)

    def finish(self) -> tuple[dict[str, Path], dict[str, str]]:
        missing = sorted(n for shard in self.shards.values() for n in shard.pending)
        if missing:
            raise InvalidInputError(f"output incomplete: tensor {missing[0]} was never written ({len(missing)} missing)")
        files = {file: shard.path for file, shard in self.shards.items()}
        if self.split.is_sharded:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                     "weight_map": dict(sorted(self.split.tensor_to_filename.items()))}
            (self.out_dir / self.index_name).write_text(json.dumps(index, indent=2))
            files[self.index_name] = self.out_dir / self.index_name
        return files, dict(self.split.tensor_to_filename)

    def abort(self) -> None:
        for shard in self.shards.values():
            if shard.handle is not None and not shard.handle.closed:
                shard.handle.close()
            shard.temp.unlink(missing_ok=True)
