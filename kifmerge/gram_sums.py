"""Per-module sums of input Gram matrices, stored once for modules that read the same inputs.

q, k and v of an attention layer read one hidden-state tensor, so their sums `Σ XᵀX` are equal:
keeping one in × in float32 buffer per module costs, for LoRA on q and v of a 7B model, 4 GiB of
accelerator memory where 2 do. `SharedGramSums` keeps one buffer per *group* of modules whose sums
are bit-equal, and keeps them bit-equal to the sums kept apart:

- a *round* is one input tensor read by members of a group one after the other; its product is
  computed once and added when the round ends (another round starts, or the sums are read);
- a member that did not read the round's input is split off first, with the sum from before the
  round (a copy), so no module's sum ever holds an input it did not read;
- a module seen for the first time joins the round's group only while that group has summed
  nothing yet (at the first step); afterwards it starts a group of its own.

Every module's sum is therefore the same additions in the same order as a buffer of its own:
sharing changes the memory, never a value (tests/test_gram_sums.py checks this bit for bit on
random call sequences). A module called twice with one input in a forward counts it twice, as
each call is an input it read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None where it has none: inference tensors), so an
    input changed in place between two modules is never taken for the one already multiplied."""
    try:
        return tensor._version
    except RuntimeError:
        return None


@dataclass
class _Round:
    group: int
    source: weakref.ref  # the input tensor (weakly: it is the model's activation)
    version: int
    product: torch.Tensor  # its XᵀX, not yet added
    readers: set[str] = field(default_factory=set)

    def reads(self, inputs: torch.Tensor, version: int | None) -> bool:
        return version is not None and self.source() is inputs and self.version == version


class SharedGramSums:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._group_of: dict[str, int] = {}
        self._members: dict[int, list[str]] = {}
        self._sums: dict[int, torch.Tensor] = {}  # a group without one has summed nothing yet
        self._round: _Round | None = None
        self._groups = 0

    def add(self, name: str, inputs: torch.Tensor, product: Callable[[], torch.Tensor]) -> None:
        """Module `name` read `inputs`; `product()` computes their XᵀX, called only where the input
        is not the one just multiplied."""
        version, current, group = version_of(inputs), self._round, self._group_of.get(name)
        same = current is not None and current.reads(inputs, version)
        if same and name not in current.readers and (
                group == current.group or (group is None and current.group not in self._sums)):
            if group is None:
                self._join(name, current.group)
            current.readers.add(name)
            return
        gram = current.product if same else product()  # another group (or a second call) on the same input
        self._finish()
        group = self._group_of.get(name)  # finishing may have split this module off its group
        if group is None:
            group = self._new_group([name])
        if version is None:  # nothing to recognise the input by: a round of this module alone, closed now
            self._close(group, gram, {name})
            return
        self._round = _Round(group, weakref.ref(inputs), version, gram, {name})

    def sums(self) -> dict[str, torch.Tensor]:
        """Per module its sum; modules of one group get the same tensor (do not add into it)."""
        self._finish()
        return {name: self._sums[group] for name, group in self._group_of.items() if group in self._sums}

    def start_from(self, sums: dict[str, torch.Tensor]) -> None:
        """Sums so far (a resumed run's): modules given the same tensor object start as one group,
        each group with its own copy."""
        self._reset()
        by_tensor: dict[int, int] = {}
        for name, gram in sums.items():
            if id(gram) not in by_tensor:
                by_tensor[id(gram)] = self._new_group([])
                self._sums[by_tensor[id(gram)]] = gram.clone()
            self._join(name, by_tensor[id(gram)])

    def forget_round(self) -> None:
        """Drop the reference to the last input (the collector is being detached)."""
        self._finish()

    def _finish(self) -> None:
        current, self._round = self._round, None
        if current is not None:
            self._close(current.group, current.product, current.readers)

    def _close(self, group: int, product: torch.Tensor, readers: set[str]) -> None:
        """Add one input's product to the group's sum, for the members that read it."""
        members = self._members[group]
        missing = [m for m in members if m not in readers]
        if missing:  # they did not read this input: a group of their own, with the sum from before it
            split = self._new_group(missing)
            if group in self._sums:
                self._sums[split] = self._sums[group].clone()
            members[:] = [m for m in members if m in readers]
        self._add_now(group, product)

    def _add_now(self, group: int, gram: torch.Tensor) -> None:
        if group in self._sums:
            self._sums[group].add_(gram)
        else:
            # its own float32 buffer (the product may be reused by the next round): a sum kept in the
            # product's dtype would, for a bfloat16 one, stop growing by small products after a few steps
            self._sums[group] = gram.to(torch.float32, copy=True)

    def _new_group(self, names: list[str]) -> int:
        group, self._groups = self._groups, self._groups + 1
        self._members[group] = []
        for name in names:
            self._join(name, group)
        return group

    def _join(self, name: str, group: int) -> None:
        self._group_of[name] = group
        self._members[group].append(name)
