"""The streaming fusion engine: tensors are cut into blocks of rows (about `BLOCK_ELEMENTS`
elements), each block of every input is read with a positional read, fused, checked and
handed to the `StreamingShardWriter`, which puts it at its place in its output shard. Peak
memory is a few blocks per thread, whatever the model or tensor size; reading and computing
run on a pool of threads while this one writes.

A method is a `Fusion`: which inputs it reads, per-tensor preparation (TIES needs each task
vector's magnitude threshold over the whole tensor: two extra streaming passes, see
`rules.kth_largest`), and the rule applied to one block (a pure function from `rules`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from kifmerge.errors import IntegrityError, InvalidInputError
from kifmerge.fusion.rules import (
    TASK_VECTOR_CONFIGS,
    blend,
    bracket_pass,
    bracket_pick,
    kth_largest,
    sample_bracket,
    task_vector_merge,
)
from kifmerge.fusion.writer import SAFETENSORS_DTYPES, StreamingShardWriter
from kifmerge.units import UnitLayout

SAMPLE_ELEMENTS = 1 << 16  # rows read up front to bracket TIES' magnitude threshold
BLOCK_ELEMENTS = 1 << 19  # 2 MB in float32: measured best for TIES on 2 cores (2^17: +30 %, 2^18: +10 %, 2^20: +2 %)
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int                      # absolute file offset of the first byte

    @property
    def row(self) -> int:
        """Elements per row (along dim 0): the unit blocks are cut in."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


class TensorSource:
    """Tensors, or runs of their rows, read from safetensors files with `os.preadv` straight into
    a fresh tensor. No memory map: a read costs exactly the bytes asked for (a map's touched
    pages would count in resident memory until it is closed) and releases the GIL, so a
    second thread can read ahead. Headers were validated by safetensors at registration; the
    offsets are checked again against the file size here."""

    def __init__(self, files: dict[str, Path], weight_map: dict[str, str]):
        self.files, self.weight_map = files, weight_map
        self._headers: dict[str, dict[str, StoredTensor]] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reader threads open files lazily

    def info(self, name: str) -> StoredTensor:
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = _read_header(self.files[file])
        return self._headers[file][name]

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor, as a tensor of shape (stop − start, *shape[1:])."""
        info = self.info(name)
        stop = info.rows if stop is None else stop
        count = (stop - start) * info.row
        out = torch.empty(count, dtype=info.dtype)
        if count:
            buffer = out.view(torch.uint8).numpy()
            offset = info.begin + start * info.row * out.element_size()
            if os.preadv(self._fd(info.path), [buffer], offset) != buffer.nbytes:
                raise IntegrityError(f"{info.path.name} ends inside tensor {name}")
        return out.reshape(stop - start, *info.shape[1:]) if info.shape else out.reshape(())

    def get(self, name: str) -> torch.Tensor:
        return self.read_rows(name)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _read_header(path: Path) -> dict[str, StoredTensor]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            raise IntegrityError(f"{path.name}: safetensors header runs past the end of the file")
        header = json.loads(handle.read(length))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in TORCH_DTYPES:
            raise IntegrityError(f"{path.name}: tensor {name} has dtype {entry['dtype']}, which fusion does not handle")
        dtype, shape = TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
            raise IntegrityError(f"{path.name}: tensor {name} has inconsistent offsets")
        out[name] = StoredTensor(path, dtype, shape, 8 + length + begin)
    return out


def row_blocks(info: StoredTensor, block_elements: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about `block_elements` elements each (at least one row)."""
    per_block = max(1, (block_elements or BLOCK_ELEMENTS) // max(info.row, 1))
    return [(start, min(start + per_block, info.rows)) for start in range(0, info.rows, per_block)] or [(0, 0)]


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """`fn` over `items` on the pool, at most `window` in flight, results in order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class Fusion(Protocol):
    sources: list[TensorSource]

    def prepare(self, name: str, mapper: Callable) -> object:
        """Per-tensor state the blocks need (e.g. TIES thresholds); `mapper(fn, items)` runs in parallel."""

    def block(self, name: str, rows: tuple[int, int], inputs: list[torch.Tensor], state: object) -> torch.Tensor: ...


def stream_fused(fusion: Fusion, writer: StreamingShardWriter, progress: Callable[[int], None] | None = None) -> None:
    """Fuse every planned output tensor block by block into the writer. Blocks are read and
    computed on a pool of threads (torch releases the GIL; its own intra-op threads are set to
    one meanwhile: on a busy machine their spin-waiting costs more than they give), and
    written by this thread in the writer's order, so each shard is hashed as it is written."""
    task = fusion.sources[-1]  # the new task's headers plan the blocks (all sources share shapes)
    keep_freed_memory()
    previous = torch.get_num_threads()
    workers = max(1, previous)
    window = 2 * workers
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kifmerge-fuse")
    pending: deque = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            name, start, last, future = pending.popleft()
            writer.add_block(name, start, future.result())
            if progress and last:
                progress(1)

    try:
        for name in writer.order():
            info = task.info(name)
            _check_shapes(fusion.sources, name)
            state = fusion.prepare(name, lambda fn, items: ordered_map(pool, fn, items, window))
            out_dtype = TORCH_DTYPES[writer.specs[name].dtype]
            for rows in row_blocks(info):
                future = pool.submit(_fuse_block, fusion, name, rows, state, out_dtype)
                pending.append((name, rows[0] * info.row, rows[1] >= info.rows, future))
                drain(window)
        drain(0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed block buffers instead of giving each one back to the
    system and faulting fresh zeroed pages in for the next (the default for allocations over
    128 KB): that page-fault traffic cost more than the arithmetic. Bounded by the blocks in
    flight. No-op where malloc is not glibc's."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _fuse_block(fusion: Fusion, name: str, rows: tuple[int, int], state: object, out_dtype: torch.dtype) -> torch.Tensor:
    out = fusion.block(name, rows, [source.read_rows(name, *rows) for source in fusion.sources], state).to(out_dtype)
    if out.is_floating_point() and out.numel() and not bool(out.abs().amax() <= torch.finfo(out.dtype).max):  # NaN fails too
        raise InvalidInputError(f"fused tensor {name} is not finite (an overflow in {out.dtype}?); nothing was written")
    return out


def _check_shapes(sources: list[TensorSource], name: str) -> None:
    shapes = [source.info(name).shape for source in sources]
    if len(set(shapes)) > 1:
        raise InvalidInputError(f"tensor {name} has shape {list(shapes[-1])} in the task but {list(shapes[0])} in the line")


class UnitBlend:
    """Per-unit rules (kif, kif-adaptive, linear): `c_new·new + c_old·old` unit by unit. A unit
    whose coefficients are exactly (1, 0) or (0, 1) is copied, not computed (same bytes)."""

    def __init__(self, old: TensorSource, new: TensorSource, layout: UnitLayout, c_new: torch.Tensor, c_old: torch.Tensor):
        self.sources, self.layout, self.offsets = [old, new], layout, layout.offsets()
        self.c_new, self.c_old = c_new, c_old

    def prepare(self, name: str, mapper: Callable) -> None:
        return None

    def block(self, name: str, rows: tuple[int, int], inputs: list[torch.Tensor], state: None) -> torch.Tensor:
        w_old, w_new = inputs
        slot = self.layout.slots[name]
        c_new, c_old = self.c_new[self.offsets[slot.group]], self.c_old[self.offsets[slot.group]]
        if slot.axis == 0:
            c_new, c_old = c_new[rows[0]:rows[1]], c_old[rows[0]:rows[1]]
        if bool((c_new == 1).all() and (c_old == 0).all()):
            return w_new
        if bool((c_new == 0).all() and (c_old == 1).all()):
            return w_old
        return blend(w_old, w_new, c_new, c_old, slot.axis, out_dtype=torch.float32)


class TaskVectorFusion:
    """Baselines over task vectors `t − base`; with no base source the reference is zero (LoRA
    factors: the base model has no adapter). TIES' magnitude threshold is found over the whole
    tensor before its first block; DARE draws from a generator seeded per tensor name and
    block, so a version is reproducible whatever the order tensors are visited in."""

    def __init__(self, old: TensorSource, new: TensorSource, base: TensorSource | None, method: str, *,
                 vector_weights: list[float], density: float, lam: float, seed: int):
        self.sources = [base, old, new] if base is not None else [old, new]
        self.has_base, self.config = base is not None, TASK_VECTOR_CONFIGS[method]
        self.vector_weights, self.density, self.lam, self.seed = vector_weights, density, lam, seed

    def _split(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.has_base:
            return inputs[0], inputs[1:]
        return torch.zeros_like(inputs[-1]), inputs

    def prepare(self, name: str, mapper: Callable) -> list[torch.Tensor] | None:
        """TIES: each task vector's magnitude cut over the whole tensor. A sample of rows gives a
        narrow bracket around it, one pass counts the values above and collects those inside;
        should the bracket miss, an exact radix select (two passes) decides."""
        info = self.sources[-1].info(name)
        count = info.rows * info.row
        if self.config["sparsify"] != "magnitude" or self.density >= 1 or count == 0:
            return None
        k = max(1, int(self.density * count))
        blocks = row_blocks(info)

        def magnitudes(rows: tuple[int, int]) -> list[torch.Tensor]:
            reference, tensors = self._split([s.read_rows(name, *rows) for s in self.sources])
            reference = reference.to(torch.float32)
            return [tensor.to(torch.float32).sub_(reference).abs_().reshape(-1) for tensor in tensors]

        def summed(fn) -> list[torch.Tensor]:
            totals = None
            for counts in mapper(fn, blocks):
                totals = counts if totals is None else [a.add_(b) for a, b in zip(totals, counts)]
            return totals

        found: list[torch.Tensor | None] = [None] * (len(self.sources) - self.has_base)
        if len(blocks) > 1:
            sample_rows = torch.linspace(0, info.rows - 1, min(info.rows, max(64, -(-SAMPLE_ELEMENTS // info.row)))).long()
            rows = sample_rows.unique().tolist()
            chunks = [rows[i:i + 16] for i in range(0, len(rows), 16)]  # sampled on the pool, not this thread

            def sample(chunk: list[int]) -> list[torch.Tensor]:  # per task vector, the chunk's rows
                return [torch.cat(parts) for parts in zip(*(magnitudes((r, r + 1)) for r in chunk))]

            samples = [torch.cat(parts) for parts in zip(*mapper(sample, chunks))]
            brackets = list(mapper(lambda values: sample_bracket(values, k / count), samples))
            above, candidates = [0] * len(found), [[] for _ in found]
            for results in mapper(lambda rows: [bracket_pass(m, *b) for m, b in zip(magnitudes(rows), brackets)], blocks):
                for i, (n_above, inside) in enumerate(results):
                    above[i] += n_above
                    candidates[i].append(inside)
            found = [bracket_pick(a, torch.cat(c), k) for a, c in zip(above, candidates)]
            del candidates
        if all(value is not None for value in found):
            return found
        return kth_largest(lambda fn: summed(lambda rows: fn(magnitudes(rows))), [k] * len(found))

    def block(self, name: str, rows: tuple[int, int], inputs: list[torch.Tensor], thresholds: list | None) -> torch.Tensor:
        reference, tensors = self._split(inputs)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * rows[0]) % 2**63)
        return task_vector_merge(reference, tensors, self.vector_weights, density=self.density, lam=self.lam,
                                 generator=generator, thresholds=thresholds, out_dtype=torch.float32, **self.config)


class LoraDeltaFusion:
    """Task-vector rules on a LoRA line, exactly: the line's head and the new task are two task
    vectors against the base, whose adapter is zero, so each module's vectors are the products
    `ΔW = B·A` (merging the factors separately is not merging their products). The merged ΔW is
    re-factored to the line's rank by a truncated SVD; what the cut loses is summed for the
    version's record. A module is computed once, when its first factor is due (the writer
    visits `…lora_A` and `…lora_B` of a module one after the other), and held until its second
    is written: memory is one module's ΔW and a few copies, not the adapter."""

    def __init__(self, old: TensorSource, new: TensorSource, method: str, *, vector_weights: list[float], density: float,
                 lam: float, seed: int):
        self.sources = [old, new]
        self.config, self.vector_weights = TASK_VECTOR_CONFIGS.get(method), vector_weights
        self.density, self.lam, self.seed = density, lam, seed
        self._factors: dict[str, dict[int, torch.Tensor]] = {}
        self.cut, self.total, self.worst, self.rank = 0.0, 0.0, 0.0, 0
        self.growth, self.growth_module = 0.0, None  # the largest ‖merged ΔW‖ ÷ the larger input's, and where

    def prepare(self, name: str, mapper: Callable) -> torch.Tensor:
        from kifmerge.fusion.rules import lora_product, refactor_to_rank
        from kifmerge.units import lora_module_of

        found = lora_module_of(name)
        if found is None:
            raise InvalidInputError(f"tensor {name} is not a LoRA factor (lora_A / lora_B); "
                                    "task-vector methods on LoRA lines merge B·A products only")
        module, axis = found
        if module not in self._factors:
            products = []
            for source in self.sources:
                lora_a, lora_b = (source.get(f"{module}.lora_{side}.weight") for side in "AB")
                products.append(lora_product(lora_a, lora_b))
            rank = self.sources[-1].info(f"{module}.lora_A.weight").shape[0]
            merged = self.merge(module, products)
            largest = max(float(p.norm()) for p in products)
            growth = float(merged.norm()) / largest if largest > 0 else 0.0
            if growth > self.growth:
                self.growth, self.growth_module = growth, module
            lora_a, lora_b, cut, total = refactor_to_rank(merged, rank)
            del merged
            self.cut, self.total, self.rank = self.cut + cut, self.total + total, rank
            self.worst = max(self.worst, math.sqrt(cut / total) if total > 0 else 0.0)
            self._factors[module] = {0: lora_a, 1: lora_b}
        factors = self._factors[module]
        factor = factors.pop(axis)
        if not factors:
            del self._factors[module]
        return factor

    def merge(self, module: str, products: list[torch.Tensor]) -> torch.Tensor:
        """The head's and the task's ΔW of one module → the merged ΔW (dense, float32)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)
        return task_vector_merge(torch.zeros_like(products[0]), products, self.vector_weights, density=self.density,
                                 lam=self.lam, generator=generator, out_dtype=torch.float32, **self.config)

    def block(self, name: str, rows: tuple[int, int], inputs: list[torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
        return factor[rows[0]:rows[1]]

    def summary(self) -> dict:
        """The re-factoring's record: rank, the relative Frobenius error ‖ΔW − B·A‖ / ‖ΔW‖ over all
        modules and at the worst module, and the largest growth ‖merged ΔW‖ / max ‖ΔW_input‖ with
        its module (an average-like rule stays near or below 1; far above, the merge amplified something)."""
        relative = math.sqrt(self.cut / self.total) if self.total > 0 else 0.0
        return {"rank": self.rank, "relative_error": round(relative, 6), "worst_module_relative_error": round(self.worst, 6),
                "largest_growth": round(self.growth, 4), "largest_growth_module": self.growth_module}


class ElementBlend:
    """Element-level rules (kif-element): `old + w ⊙ (new − old)` with one weight per element,
    given per tensor (computed by the rule from the line's and the task's element scores)."""

    def __init__(self, old: TensorSource, new: TensorSource, element_weights: dict[str, torch.Tensor]):
        self.sources, self.element_weights = [old, new], element_weights

    def prepare(self, name: str, mapper: Callable) -> torch.Tensor:
        return self.element_weights[name]

    def block(self, name: str, rows: tuple[int, int], inputs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        old, new = (t.to(torch.float32) for t in inputs)
        return torch.lerp(old, new, weights[rows[0]:rows[1]].reshape(new.shape))

    def summary(self) -> dict:
        count = sum(w.numel() for w in self.element_weights.values())
        return {"elements": count, "new_weight_mean": round(sum(float(w.sum()) for w in self.element_weights.values()) / max(count, 1), 6)}


class RegMeanFusion(LoraDeltaFusion):
    """RegMean on a LoRA line (`rules.regmean`): per module, the head's and the task's ΔW = B·A
    weighted by the Gram matrices of the inputs each saw (the line's: the sum over its tasks),
    re-factored to the line's rank like the task-vector rules."""

    def __init__(self, old: TensorSource, new: TensorSource, line_grams: dict[str, torch.Tensor],
                 task_grams: dict[str, torch.Tensor], non_diagonal: float):
        super().__init__(old, new, "regmean", vector_weights=[0.5, 0.5], density=1.0, lam=1.0, seed=0)
        self.grams, self.non_diagonal = (line_grams, task_grams), non_diagonal

    def merge(self, module: str, products: list[torch.Tensor]) -> torch.Tensor:
        from kifmerge.fusion.rules import regmean

        return regmean(products, [self.grams[0][module], self.grams[1][module]], non_diagonal=self.non_diagonal)
