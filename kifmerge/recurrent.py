"""Recurrent-KIF (arXiv 2502.17510): fusion inside training instead of after it.

A cycle starts from the trainable (LoRA) weights θ_t. The Trainer's own steps on the new task are
the inner loop; every `every` of them (θ_k now, Δ_in = θ_k − θ_t) `outer_steps` steps of a separate
AdamW on a replay buffer of the line's earlier tasks follow (Δ_out = θ_after − θ_k). Each element
is then *important* to a loop when its importance Ī·Ū (one EMA per loop, kifmerge.importance,
estimator `first`) is among the top `top` of all trainable elements, counted over the whole
adapter at once, and θ ← θ_t + w_in ⊙ Δ_in + w_out ⊙ Δ_out with (w_in, w_out) = (0.4, 0.6) where
both loops find it important, (1, 0) or (0, 1) where one does, (0.5, 0.5) where neither does.
θ_t ← θ, and the inner EMA starts afresh; the outer one is kept across cycles, as in the
authors' code. The task's own importance profile (kifmerge.training) is fed by the inner steps
only, exactly as without this option.

Memory: two copies of the trainable weights (θ_t, θ_k), AdamW's two and the two EMAs' four.
"""

from __future__ import annotations

import math
import random
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import TrainerCallback

from kifmerge.importance import ImportanceAccumulator

TOP = 0.2                 # fraction of elements important to a loop
BOTH = (0.4, 0.6)         # (w_in, w_out) where both loops find an element important
NEITHER = (0.5, 0.5)      # where neither does
MAX_GRAD_NORM = 1.0       # the Trainer's clipping (kifmerge.training.training_arguments)


def recurrent_weights(inner: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element (w_in, w_out) from the two boolean importance masks: an update that only one
    loop relies on is kept whole, the other loop's dropped there."""
    w_in = torch.where(inner & outer, BOTH[0], torch.where(inner, 1.0, torch.where(outer, 0.0, NEITHER[0])))
    w_out = torch.where(inner & outer, BOTH[1], torch.where(inner, 0.0, torch.where(outer, 1.0, NEITHER[1])))
    return w_in.to(torch.float32), w_out.to(torch.float32)


def fused(theta_t: torch.Tensor, delta_in: torch.Tensor, delta_out: torch.Tensor,
          w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """θ_t + w_in ⊙ Δ_in + w_out ⊙ Δ_out."""
    return theta_t + w_in * delta_in + w_out * delta_out


def top_fraction_masks(scores: dict[str, torch.Tensor], top: float = TOP) -> dict[str, torch.Tensor]:
    """Elements whose score is at least the k-th largest of all tensors' elements together
    (k = ⌈top · count⌉; ties at the threshold all count) and above zero, which is no evidence. One
    threshold for the whole adapter, not one per tensor: a tensor whose scores are all small can
    have none. Exact and streamed (kifmerge.fusion.rules.kth_largest), so no tensor of all the scores
    is built."""
    from kifmerge.fusion.rules import kth_largest

    flat = {name: score.detach().float().abs().reshape(-1) for name, score in scores.items()}  # abs: no −0.0
    total = sum(t.numel() for t in flat.values())
    if total == 0:
        return {name: torch.zeros_like(score, dtype=torch.bool) for name, score in scores.items()}
    k = min(total, max(1, math.ceil(top * total)))

    def count(fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
        sums = None
        for tensor in flat.values():
            part = [c.cpu() for c in fn([tensor])]
            sums = part if sums is None else [a + b for a, b in zip(sums, part)]
        return sums

    threshold = kth_largest(count, [k])[0]
    return {name: ((t >= threshold.to(t.device)) & (t > 0)).reshape(scores[name].shape) for name, t in flat.items()}


def replay_batches(features: Sequence[dict], collate: Callable[[list[dict]], dict], batch_size: int,
                   seed: int) -> Iterator[dict]:
    """Endless batches of the encoded replay buffer: each pass in a fresh order drawn from `seed`
    (the same run draws the same batches), the last batch of a pass possibly shorter."""
    if not features:
        raise ValueError("Recurrent-KIF needs a non-empty replay buffer")
    rng = random.Random(seed)
    order = list(range(len(features)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([features[i] for i in order[start:start + batch_size]])


class RecurrentFusionCallback(TrainerCallback):
    """Runs the cycle around the Trainer's steps: feeds the inner EMA from each step's gradients
    (`on_optimizer_step`, before the Trainer zeroes them) and, every `every` steps, runs the outer
    steps and the fusion (`on_step_end`). The weights change in place; the Trainer's optimizer
    state is left as it is and every gradient is None again afterwards.

    `loss(batch)`: the training loss of one replay batch (under the Trainer's autocast). The outer
    AdamW keeps the training's peak learning rate throughout, like the reference's separate outer
    optimizer: late cycles' replay steps move the weights more than the decayed inner steps do.
    Its state is not checkpointed, so a --recurrent run keeps no resumable checkpoints and refuses
    --resume (kifmerge/options.py); a killed run starts again from the line's head."""

    def __init__(self, params: dict[str, torch.nn.Parameter], batches: Iterator[dict], loss: Callable[[dict], torch.Tensor],
                 *, every: int, outer_steps: int, lr: float, beta1: float, beta2: float, top: float = TOP):
        self.params, self.batches, self.loss = params, batches, loss
        self.every, self.outer_steps, self.top = every, outer_steps, top
        self.lr, self.betas = lr, (beta1, beta2)
        # entered around the outer steps, e.g. GramCollector.paused: what records the task's own inputs skips them
        self.outside_the_task: list[Callable[[], AbstractContextManager]] = []
        self.inner = self.outer = self.optimizer = self.theta_t = None
        self.fusions = self.skipped = 0

    def on_train_begin(self, args, state, control, **kwargs):
        """Set up from the weights the Trainer starts from (the line's head, or the base)."""
        beta1, beta2 = self.betas
        self.inner = ImportanceAccumulator(self.params.items(), estimator="first", beta1=beta1, beta2=beta2)
        self.outer = ImportanceAccumulator(self.params.items(), estimator="first", beta1=beta1, beta2=beta2)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=self.lr, weight_decay=0.0)
        self.theta_t = self._snapshot()
        self.fusions = self.skipped = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.inner.update()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.cycle()

    def cycle(self) -> None:
        """Outer steps from θ_k, then θ ← θ_t + w_in ⊙ Δ_in + w_out ⊙ Δ_out."""
        theta_k = self._snapshot()
        with ExitStack() as stack:
            for context in self.outside_the_task:
                stack.enter_context(context())
            for _ in range(self.outer_steps):
                self._outer_step()
        inner_masks = top_fraction_masks(self.inner.element_scores(), self.top)
        outer_masks = top_fraction_masks(self.outer.element_scores(), self.top)
        with torch.no_grad():
            for name, param in self.params.items():
                w_in, w_out = recurrent_weights(inner_masks[name], outer_masks[name])
                theta = param.detach().float()
                param.copy_(fused(self.theta_t[name], theta_k[name] - self.theta_t[name], theta - theta_k[name], w_in, w_out))
        self.theta_t = self._snapshot()
        self.inner.reset()
        self.fusions += 1

    def _outer_step(self) -> None:
        """One step on a replay batch, as the Trainer steps: clip to norm 1, step, then score the
        step's gradients at the stepped weights (the inner EMA sees the same); a step with a
        non-finite gradient is skipped, so one bad batch cannot poison the weights."""
        self._clear_grads()
        self.loss(next(self.batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), MAX_GRAD_NORM)
        if math.isfinite(float(norm)):
            self.optimizer.step()
            self.outer.update(finite=True)
        else:
            self.skipped += 1
        self._clear_grads()

    def _clear_grads(self) -> None:
        for param in self.params.values():
            param.grad = None

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().float().clone() for name, param in self.params.items()}

    def report(self, buffer: int) -> dict[str, Any]:
        return {"every": self.every, "outer_steps": self.outer_steps, "top": self.top, "fusions": self.fusions,
                "buffer": buffer, "skipped_non_finite": self.skipped}
