"""The method registry: every fusion rule declared once.

An entry names the rule, its family (how the engine applies it), the parameters it reads (their
defaults and help live on `kifmerge.options.FuseParams`, each written once) and the adapter that
calls its pure tensor function in `fusion/rules.py`. Options validation, `fuse`, `learn`, plan
files, `diff`, the CLI's help and the benchmark all read this table, so a new rule is one
function in `rules.py` plus one entry here (`register`), as in mergekit's `merge_methods/`.

Light on purpose: no torch at import (the CLI validates options before loading any model); the
adapters import `rules` when they run.

Families:
- `unit`: a coefficient pair (c_new, c_old) per skill unit, from the line's and the task's
  unit profiles (`coefficients`);
- `element`: a weight per parameter element, from element-level scores (`element`);
- `task-vector`: the head and the task as task vectors against the base, merged by
  `rules.task_vector_merge` configured by `rules.TASK_VECTOR_CONFIGS[name]` (LoRA: in ΔW = B·A space);
- `data`: a unit rule whose parameter is chosen on the tasks' validation examples;
- `gram`: a LoRA module's update weighted by the Gram matrices of its inputs (RegMean), which
  `train --gram` records with the profile; in ΔW = B·A space, re-factored to the line's rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

UNIT, ELEMENT, TASK_VECTOR, DATA, GRAM = "unit", "element", "task-vector", "data", "gram"
FAMILIES = (UNIT, ELEMENT, TASK_VECTOR, DATA, GRAM)


@dataclass(frozen=True)
class FusionMethod:
    name: str
    family: str
    summary: str                                   # one line: CLI help and docs
    parameters: tuple[str, ...]                    # FuseParams fields the rule reads (recorded with the version)
    coefficients: Callable[..., tuple] | None = None  # unit and data rules: (params, p_old, p_new) → (c_new, c_old)
    element: Callable[..., Any] | None = None         # element rules: (params, i_line, i_new) → w_new per element
    weighs_unit_scores: bool = False                  # its coefficients depend on the profiles' unit scores


METHODS: dict[str, FusionMethod] = {}
# What a fuse computes and records beside the parameters it was given (summaries, the reference it
# used, the α a validated fuse chose, the quality gate's scores, why the default fell back): not compared when `learn` matches
# an earlier run, not listed by `history` (`show` and --json have them).
COMPUTED_BY_THE_FUSE = ("units", "reference", "elements", "refactor", "selection", "max_regression", "task_profile",
                       "fallback")


def register(method: FusionMethod) -> FusionMethod:
    if method.family not in FAMILIES:
        raise ValueError(f"unknown fusion family {method.family!r}: one of {', '.join(FAMILIES)}")
    METHODS[method.name] = method
    return method


def method(name: str) -> FusionMethod:
    return METHODS[name]


def reads_profile(name: str) -> bool:
    """Whether the rule reads importance profiles: the task-vector rules read none, so a task
    registered without one (`add-task` with neither --profile nor --calibrate) can still be fused by them."""
    return METHODS[name].family != TASK_VECTOR


def profile_free() -> list[str]:
    return [name for name in METHODS if not reads_profile(name)]


def names() -> list[str]:
    return list(METHODS)


def help_text() -> str:
    return " | ".join(METHODS)


# ---- adapters to the pure rules ------------------------------------------------------------------
def _kif(params, p_old, p_new):
    from kifmerge.fusion import rules
    from kifmerge.profiles import normalise

    return rules.kif_static(p_old, normalise(p_new), top=params.top, both=params.weights[:2], neither=params.weights[2])


def _kif_adaptive(params, p_old, p_new):
    from kifmerge.fusion import rules
    from kifmerge.profiles import normalise

    if params.scores == "rank":
        return rules.kif_adaptive(rules.rank_normalise(p_old), rules.rank_normalise(p_new), tau=params.tau)
    return rules.kif_adaptive(p_old, normalise(p_new), tau=params.tau)


def _linear(params, p_old, p_new):
    from kifmerge.fusion import rules

    return rules.linear(p_old, p_new, alpha=params.alpha)


def _element(params, i_line, i_new):
    from kifmerge.fusion import rules

    return rules.element_weights(i_line, i_new, power=params.power)


register(FusionMethod("kif", UNIT, "KIF's static rule over skill units", ("top", "weights"), coefficients=_kif,
                      weighs_unit_scores=True))
register(FusionMethod("kif-adaptive", UNIT, "softmax over the two profiles' unit scores at temperature tau",
                      ("tau", "scores"), coefficients=_kif_adaptive,
                      weighs_unit_scores=True))
register(FusionMethod("kif-element", ELEMENT, "element-level importance-weighted interpolation", ("power",), element=_element))
register(FusionMethod("linear", UNIT, "alpha·new + (1 − alpha)·old (alpha 1: sequential fine-tuning)", ("alpha",),
                      coefficients=_linear))
register(FusionMethod("validated", DATA, "linear with alpha chosen on the tasks' validation examples",
                      ("grid", "val_examples"), coefficients=_linear))
register(FusionMethod("task-arithmetic", TASK_VECTOR, "base + lam·Σ w_i·τ_i", ("alpha", "lam")))
register(FusionMethod("ties", TASK_VECTOR, "TIES: trim to density, elect signs, average the agreeing entries",
                      ("alpha", "lam", "density")))
register(FusionMethod("dare-linear", TASK_VECTOR, "DARE: random drops rescaled by 1/density, then a weighted sum",
                      ("alpha", "lam", "density", "seed")))
register(FusionMethod("dare-ties", TASK_VECTOR, "DARE drops, then TIES' sign election", ("alpha", "lam", "density", "seed")))
register(FusionMethod("magmax", TASK_VECTOR, "MagMax: per entry the task vector of largest magnitude", ("lam",)))
register(FusionMethod("regmean", GRAM, "RegMean: updates weighted by their inputs' Gram matrices (train --gram)",
                      ("non_diagonal",)))
