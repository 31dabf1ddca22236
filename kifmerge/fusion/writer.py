"""Write safetensors shards tensor by tensor, straight to disk.

The output's names, dtypes and shapes are known before any value is computed (they are the
inputs'), so the shard plan (huggingface_hub's `split_state_dict_into_shards_factory`: the
hub's file names and index) and every file header are fixed up front. Each fused tensor is
then written at its offset and dropped: memory holds one block, never a shard. A shard is
written under a temporary name and renamed when its last byte is in. Written in `order()`, a
shard's bytes arrive front to back and are hashed on the way (no re-read to store it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from kifmerge.errors import InvalidInputError
from kifmerge.faults import fault_point

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the Hugging Face default, "5GB"
FLUSH_EVERY = 256 << 20  # start writing a shard back to disk every 256 MB, while the next blocks are computed
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
    pending: dict[str, int]            # tensor → bytes still to write
    handle: object | None = None
    position: int = 0                  # bytes hashed so far (header included)
    hasher: object | None = None       # None once a write arrived out of order
    sha256: str | None = None
    unflushed: int = 0                 # bytes written since the last background flush was started
    flushing: Future | None = None


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
        self._flush_pool: ThreadPoolExecutor | None = None
        for file, names in split.filename_to_tensors.items():
            entries, offsets, position = {}, {}, 0
            for name in sorted(names):
                spec = self.specs[name]
                entries[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [position, position + spec.nbytes]}
                offsets[name] = position
                position += spec.nbytes
            header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
            self.shards[file] = _Shard(self.out_dir / file, self.out_dir / f".{file}.partial", header, offsets,
                                       {n: self.specs[n].nbytes for n in names})

    def order(self) -> list[str]:
        """Tensor names shard by shard, front to back: the order that lets each shard be hashed as it is written."""
        return [name for shard in self.shards.values() for name in sorted(shard.offsets, key=shard.offsets.get)]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidInputError(f"tensor {name} is not part of the planned output")
        if SAFETENSORS_DTYPES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise InvalidInputError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)}")
        self.add_block(name, 0, tensor)

    def add_block(self, name: str, start: int, block: torch.Tensor) -> None:
        """Write `block` (the tensor's elements from flat index `start` on, in its planned dtype)."""
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidInputError(f"tensor {name} is not part of the planned output")
        if SAFETENSORS_DTYPES.get(block.dtype) != spec.dtype:
            raise InvalidInputError(f"tensor {name} is {block.dtype}, planned {spec.dtype}")
        shard = self.shards[self.split.tensor_to_filename[name]]
        data = block.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
        offset = start * DTYPE_BYTES[spec.dtype]
        if shard.pending.get(name, 0) < len(data) or offset + len(data) > spec.nbytes:
            raise InvalidInputError(f"tensor {name} was written twice or past its end")
        if shard.handle is None:
            shard.handle = open(shard.temp, "wb", buffering=0)  # noqa: SIM115 (closed when its last block is in, or by abort)
            head = struct.pack("<Q", len(shard.header)) + shard.header
            shard.handle.write(head)
            shard.hasher, shard.position = hashlib.sha256(head), len(head)
        where = 8 + len(shard.header) + shard.offsets[name] + offset
        if shard.hasher is not None and where == shard.position:
            shard.hasher.update(data)
            shard.position += len(data)
        else:
            shard.hasher = None
        os.pwrite(shard.handle.fileno(), data, where)
        fault_point("fuse.block-written")  # crash tests: killed mid-shard, between two blocks
        shard.unflushed += len(data)
        if shard.unflushed >= FLUSH_EVERY and (shard.flushing is None or shard.flushing.done()):
            shard.flushing, shard.unflushed = self._flusher().submit(os.fdatasync, shard.handle.fileno()), 0
        shard.pending[name] -= len(data)
        if not shard.pending[name]:
            del shard.pending[name]
        if not shard.pending:
            if shard.flushing is not None:
                shard.flushing.result()
            os.fsync(shard.handle.fileno())  # durable before it is renamed into place
            shard.handle.close()
            if shard.hasher is not None:
                shard.sha256 = shard.hasher.hexdigest()
            os.replace(shard.temp, shard.path)

    def _flusher(self) -> ThreadPoolExecutor:
        """One background thread that pushes written bytes to disk as the shard grows, so the
        final fsync has little left to wait for."""
        if self._flush_pool is None:
            self._flush_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kifmerge-flush")
        return self._flush_pool

    def hashes(self) -> dict[str, str]:
        """sha256 of each finished shard whose bytes were all written in order."""
        return {file: shard.sha256 for file, shard in self.shards.items() if shard.sha256}

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
        if self._flush_pool is not None:
            self._flush_pool.shutdown()
        return files, dict(self.split.tensor_to_filename)

    def abort(self) -> None:
        for shard in self.shards.values():
            if shard.flushing is not None:
                shard.flushing.exception()  # wait: the flush holds the descriptor about to be closed
            if shard.handle is not None and not shard.handle.closed:
                shard.handle.close()
            shard.temp.unlink(missing_ok=True)
