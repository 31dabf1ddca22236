"""Knowledge identification: how important each skill unit is for a task.

`ImportanceAccumulator` keeps, for every trainable element θ with gradient g, the smoothed
sensitivity Ī and its uncertainty Ū (DESIGN.md):
    s = |θ·g| (first), |θ·g − ½(θ·g)²| (mixed), or |(θ − θ_start)·g| (change: the task's own
    change, θ_start the weights training started from; scores what this task moved rather than
    re-finding the units that were already large in the running model), or g² (fisher)
    Ī ← β1·Ī + (1−β1)·s,   Ū ← β2·Ū + (1−β2)·|s − Ī|
Element score Ī·Ū, except `fisher`: Ī alone, the smoothed square of the step's (clipped, batch-mean)
gradient (a diagonal empirical Fisher of batches, as CoFiMA weighs parameters; Ū is not kept; it carries no |θ| factor, which every
task trained from the same running model shares); unit score = mean over the unit (for a LoRA rank unit, the mean of the
outer product of B's column scores and A's row scores, i.e. the product of their means).

It is fed by `ImportanceCallback.on_optimizer_step` during training (gradients of the step
are still present, already clipped and, under DDP, all-reduced) or by `calibrate` on a
fixed checkpoint. Memory: two float32 copies of the trainable parameters.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from transformers import TrainerCallback

from kifmerge.gram_sums import SharedGramSums

Estimator = Literal["first", "mixed", "change", "fisher"]
CPU_BLOCK = 1 << 18  # elements per multi-tensor call on the CPU (1 MiB of float32 per operand)
LORA_PARAM = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(\.[^.]+)?\.weight$")


class ImportanceAccumulator:
    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *,
                 estimator: Estimator = "first", beta1: float = 0.85, beta2: float = 0.85):
        if estimator not in ("first", "mixed", "change", "fisher"):
            raise ValueError(f"unknown importance estimator {estimator!r}")
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.estimator, self.beta1, self.beta2 = estimator, beta1, beta2
        # contiguous whatever the parameter's strides: the CPU path updates them through flat views
        # (`reshape(-1)` of a transposed buffer would be a copy, and its scores would stay 0)
        self.ipt = {n: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for n, p in self.params.items()}
        self.unc = {n: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for n, p in self.params.items()}
        # `change`: the starting weights, one more float32 copy of the trainable parameters
        self.start = {n: p.detach().float().clone() for n, p in self.params.items()} if estimator == "change" else None
        self.steps = 0
        self.skipped = 0

    @torch.no_grad()
    def update(self, finite: bool | None = None) -> bool:
        """Fold the current gradients into the EMAs. A step with any non-finite gradient is
        skipped and counted, so one bad batch never poisons the running scores. `finite`: the
        caller already knows (the Trainer's total gradient norm is finite exactly when every
        gradient is); otherwise one more pass over all gradients finds out."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return False
        if finite is None:
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm([self.params[n].grad for n in names]))).all())
        if not finite:
            self.skipped += 1
            return False
        for theta, grad, ipt, unc, start in self._blocks(names):
            if start is not None:
                theta = torch._foreach_sub(theta, start)             # θ − θ_start
            if self.estimator == "fisher":                           # g², its score Ī alone: no Ū to keep
                torch._foreach_lerp_(ipt, torch._foreach_mul(grad, grad), 1 - self.beta1)
                continue
            s = torch._foreach_mul(theta, grad)                      # θ·g
            if self.estimator == "mixed":
                torch._foreach_add_(s, torch._foreach_mul(s, s), alpha=-0.5)  # θ·g − ½(θ·g)²
            torch._foreach_abs_(s)
            torch._foreach_lerp_(ipt, s, 1 - self.beta1)             # Ī ← β1·Ī + (1−β1)·s
            torch._foreach_sub_(s, ipt)
            torch._foreach_abs_(s)
            torch._foreach_lerp_(unc, s, 1 - self.beta2)             # Ū ← β2·Ū + (1−β2)·|s − Ī|
        self.steps += 1
        return True

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every step so far (Recurrent-KIF's inner scores start afresh after each fusion)."""
        for tensor in (*self.ipt.values(), *self.unc.values()):
            tensor.zero_()
        self.steps = self.skipped = 0

    def _blocks(self, names: list[str]):
        """Groups of (θ, g, Ī, Ū, θ_start or None) views for the multi-tensor (`_foreach`) kernels. On the CPU the
        groups are cut into cache-sized blocks, so the six element-wise passes of an update reuse
        cached data instead of streaming every temporary through memory (measured 376 → 130 ms
        per update for 128 M float32 parameters on 2 cores); on accelerators each group is simply all parameters of one device."""
        tensors = [(self.params[n].detach(), self.params[n].grad, self.ipt[n], self.unc[n])
                   + ((self.start[n],) if self.start is not None else ()) for n in names]
        tensors = [tuple(t.float() for t in four[:2]) + four[2:] for four in tensors]
        if any(t[0].device.type != "cpu" for t in tensors):
            yield self._with_start(tuple(list(column) for column in zip(*tensors, strict=True)))
            return
        block: list[tuple] = []
        size = 0
        for four in tensors:
            flat = [t.reshape(-1) for t in four]
            for start in range(0, flat[0].numel(), CPU_BLOCK):
                piece = tuple(t[start:start + CPU_BLOCK] for t in flat)
                block.append(piece)
                size += piece[0].numel()
                if size >= CPU_BLOCK:
                    yield self._with_start(tuple(list(column) for column in zip(*block, strict=True)))
                    block, size = [], 0
        if block:
            yield self._with_start(tuple(list(column) for column in zip(*block, strict=True)))

    def _with_start(self, columns: tuple) -> tuple:
        return columns if self.start is not None else columns + (None,)

    def element_scores(self) -> dict[str, torch.Tensor]:
        if self.estimator == "fisher":
            return {n: self.ipt[n].clone() for n in self.params}
        return {n: self.ipt[n] * self.unc[n] for n in self.params}

    def lora_element_scores(self) -> dict[str, torch.Tensor]:
        """Element scores Ī·Ū of every LoRA factor, keyed as the tensor is saved in an adapter
        (`…q_proj.lora_A.weight`, without peft's adapter name)."""
        out = {}
        for name, score in self.element_scores().items():
            match = LORA_PARAM.match(name)
            if match:
                out[f"{match['module']}.lora_{match['factor']}.weight"] = score
        return out

    def unit_scores(self, kind: str) -> dict[str, torch.Tensor]:
        """Raw unit scores per group, keyed as in the profile format: the adapted module name
        as it prefixes `.lora_A.weight` in saved adapters (`lora`), or the parameter name (`full`)."""
        scores = self.element_scores()
        if kind != "lora":
            return {name: score.mean().reshape(1) for name, score in scores.items()}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, score in scores.items():
            match = LORA_PARAM.match(name)
            if match:
                axis = 1 if match["factor"] == "A" else 0  # A: [r, in] → mean over in; B: [out, r] → over out
                factors.setdefault(match["module"], {})[match["factor"]] = score.mean(dim=axis)
        return {module: f["A"] * f["B"] for module, f in factors.items() if {"A", "B"} <= f.keys()}

    def report(self) -> dict:
        return {"estimator": self.estimator, "beta1": self.beta1, "beta2": self.beta2,
                "steps": self.steps, "skipped_non_finite": self.skipped}


class ImportanceCallback(TrainerCallback):
    """Feeds the accumulator after every optimizer step, before gradients are zeroed.
    `grad_norm()`: the step's total gradient norm as the trainer computed it (None when it did
    not), which spares the accumulator its own pass over every gradient — about 10 % of the
    callback's time on a full fine-tune (22 of ~210 ms on SmolLM2: benchmarks/importance_bandwidth.py)."""

    def __init__(self, accumulator: ImportanceAccumulator, grad_norm: Callable[[], Any] | None = None):
        self.accumulator, self.grad_norm = accumulator, grad_norm

    def on_optimizer_step(self, args, state, control, **kwargs):
        norm = self.grad_norm() if self.grad_norm is not None else None
        self.accumulator.update(finite=None if norm is None else math.isfinite(float(norm)))


def calibrate(model: torch.nn.Module, batches: Iterable[dict], accumulator: ImportanceAccumulator,
              loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], advance: Callable[[int], None] | None = None) -> None:
    """Profile a fixed checkpoint: per batch, gradients of the loss at the checkpoint's weights
    feed the same EMAs; no optimizer step is taken. Dropout is off (eval mode) so the
    profile is a deterministic function of checkpoint and data."""
    model.eval()
    for batch in batches:
        for p in accumulator.params.values():
            p.grad = None
        loss_fn(model, batch).backward()
        accumulator.update()
        if advance:
            advance(1)
    for p in accumulator.params.values():
        p.grad = None


def _gram_of(inputs: torch.Tensor) -> torch.Tensor:
    """XᵀX in float32 with autocast off: the hooks run inside the Trainer's autocast under --bf16,
    which computes a float32 product in bfloat16 (3 significant digits). Summed that way the
    matrices came out indefinite (negative eigenvalues ~1e-4 of the largest) and RegMean's solve
    blew the merged update up to ×64 along those directions (SmolLM2, benchmarks/results/ruler.md)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.T @ x


class GramCollector:
    """RegMean's statistics: for every LoRA-adapted linear module, the Gram matrix `XᵀX` of the
    inputs it saw while training (float32, in × in, on the training device), summed over the steps'
    tokens (padding included; a forward recomputed in backward under gradient checkpointing counts
    nothing, so the sums do not depend on it). Modules that read the same inputs (q and v of a
    layer) share one buffer and one product per step (kifmerge/gram_sums.py).
    Forward pre-hooks on peft's LoRA layers; nothing is kept on evaluation passes, unless
    `in_eval` (calibration runs its passes in eval mode: they are the task's inputs there)."""

    def __init__(self, model: torch.nn.Module, *, in_eval: bool = False):
        self._sums = SharedGramSums()
        self.in_eval = in_eval
        self.recording = True
        self._handles = []
        self._linears: dict[str, torch.nn.Linear] = {}  # what each recorded module's matrix is of (its size, device)
        self.unsupported: dict[str, str] = {}  # LoRA-adapted modules that are no linear layer: no Gram matrix
        for name, module in model.named_modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
                continue
            if isinstance(module.base_layer, torch.nn.Linear):
                # peft's module name is how the module prefixes `.lora_A.weight` in a saved adapter
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
                self._linears[name] = module.base_layer
            else:
                self.unsupported[name] = type(module.base_layer).__name__

    def refuse_unsupported(self) -> None:
        """Before any compute: RegMean would refuse a task whose Gram matrices miss a module."""
        if self.unsupported:
            from kifmerge.errors import UsageError

            name, kind = next(iter(self.unsupported.items()))
            raise UsageError(f"--gram records linear layers only; the LoRA module {name} ({kind}"
                             + (f", and {len(self.unsupported) - 1} more" if len(self.unsupported) > 1 else "")
                             + ") would have no Gram matrix, so RegMean could not fuse the task: "
                             "leave it out of --target-modules or train without --gram")

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module, args):
            if not (module.training or self.in_eval) or not self.recording or not args:
                return
            if torch._C._current_graph_task_id() != -1:  # a forward recomputed inside backward (gradient
                return                                    # checkpointing): its inputs were counted already
            inputs = args[0]
            self._sums.add(name, inputs, lambda: _gram_of(inputs))
        return hook

    @property
    def grams(self) -> dict[str, torch.Tensor]:
        """Per recorded module its sum so far; modules sharing a buffer get the same tensor."""
        return self._sums.sums()

    @torch.no_grad()
    def totals(self) -> dict[str, torch.Tensor]:
        """The sums over every process of a data-parallel run (torchrun / accelerate: each rank's hooks
        see only its share of the batches, so rank 0's own sums would weigh the task by 1/world size in
        RegMean); the sums themselves in a single process. A collective: every rank calls it, in step."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.grams
        local, totals, names = self.grams, {}, sorted(self._linears)  # the same order on every rank
        device = next(iter(self._linears.values())).weight.device  # where the backend (NCCL) reduces
        seen = torch.tensor([float(name in local) for name in names], device=device)
        dist.all_reduce(seen)  # a module no rank recorded stays absent, as in a single process
        for name, anywhere in zip(names, seen.tolist(), strict=True):
            if not anywhere:
                continue
            mine, width = local.get(name), self._linears[name].in_features
            total = mine.clone() if mine is not None else torch.zeros(width, width, dtype=torch.float32, device=device)
            dist.all_reduce(total)  # one module at a time: a shared buffer is never reduced twice
            totals[name] = total.cpu()  # equal ones are stored once by the profile writer (pack_grams)
        return totals

    def start_from(self, sums: dict[str, torch.Tensor], *, main_process: bool = True) -> None:
        """A resumed run's sums so far (summed over every rank when they were saved): the main process
        carries them on, the others start from zero so that the final `totals` counts them once."""
        self._sums.start_from(sums if main_process else {})

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes that are not the task's own (Recurrent-KIF's replay steps) add nothing."""
        was, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = was

    @classmethod
    def attach(cls, model: torch.nn.Module, wanted: bool | None, *, in_eval: bool = False) -> "GramCollector | None":
        """A collector as --gram asks: True records or refuses (a LoRA module that is no linear layer),
        None (the default, on for LoRA) records where every adapted module is linear and quietly nothing
        otherwise: the default fuse rule then falls back and says why."""
        if wanted is False:
            return None
        collector = cls(model, in_eval=in_eval)
        if collector.unsupported and wanted is None:
            import warnings

            from kifmerge.errors import KifWarning

            name, kind = next(iter(collector.unsupported.items()))
            warnings.warn(f"no Gram matrices recorded: the LoRA module {name} is a {kind}, not a linear layer, so the "
                          "default fuse rule (regmean) will fuse this task by ties (--no-gram: without this note)",
                          KifWarning, stacklevel=2)
            collector.remove()
            return None
        collector.refuse_unsupported()
        return collector

    def remove(self) -> None:
        self._sums.forget_round()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
