"""Skill-unit layouts: which groups of parameters are scored and merged as one.

- `lora-rank`: one group per adapted module, one unit per rank component; unit r is row r of
  `lora_A` together with column r of `lora_B` (they only act together).
- `tensor`: one group per parameter tensor, one unit each.

A layout maps every tensor of a checkpoint to its group and to the axis along which the
group's unit coefficients broadcast, so the fusion engine never needs to know which kind it has.
"""

from __future__ import annotations

from dataclasses import dataclass

LORA_RANK = "lora-rank"
TENSOR = "tensor"
LORA_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}  # unit axis of each LoRA factor


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor's units live: its group and the axis the units run along (None: one unit)."""

    group: str
    axis: int | None


@dataclass(frozen=True)
class UnitLayout:
    unit: str                       # LORA_RANK or TENSOR
    groups: dict[str, int]          # group name → number of units, in checkpoint order
    slots: dict[str, TensorSlot]    # tensor name → slot

    @property
    def size(self) -> int:
        return sum(self.groups.values())

    def offsets(self) -> dict[str, slice]:
        """Each group's slice in the flat vector of all unit scores."""
        out, start = {}, 0
        for name, count in self.groups.items():
            out[name] = slice(start, start + count)
            start += count
        return out

    def describe(self) -> dict:
        return {"unit": self.unit, "groups": len(self.groups), "units": self.size}


def lora_module_of(tensor_name: str) -> tuple[str, int] | None:
    """`…q_proj.lora_A.weight` → (`…q_proj`, unit axis); None for a non-LoRA tensor."""
    for suffix, axis in LORA_SUFFIXES.items():
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)], axis
    return None


def lora_rank_layout(shapes: dict[str, tuple[int, ...]]) -> UnitLayout:
    """Layout of a LoRA adapter from its tensor shapes (A: [r, in], B: [out, r])."""
    groups: dict[str, int] = {}
    slots: dict[str, TensorSlot] = {}
    for name in sorted(shapes):
        module, axis = lora_module_of(name)  # callers validated every key is a LoRA factor
        rank = shapes[name][axis]
        groups.setdefault(module, rank)
        slots[name] = TensorSlot(module, axis)
    return UnitLayout(LORA_RANK, groups, slots)


def tensor_layout(shapes: dict[str, tuple[int, ...]]) -> UnitLayout:
    names = sorted(shapes)
    return UnitLayout(TENSOR, {n: 1 for n in names}, {n: TensorSlot(n, None) for n in names})


def layout_for(kind: str, shapes: dict[str, tuple[int, ...]]) -> UnitLayout:
    return lora_rank_layout(shapes) if kind == "lora" else tensor_layout(shapes)
