"""Fusing a task into a line: stage the new version's blobs, then commit its row."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kifmerge.errors import ConflictError, FallbackWarning, InvalidInputError, KifWarning, UsageError
from kifmerge.faults import fault_point
from kifmerge.options import FuseParams
from kifmerge.registry import Registry
from kifmerge.services.common import (
    LORA_COMPAT_KEYS,
    Progress,
    open_base,
    check_name,
    fuse_params,
    now,
    opened,
    public_version,
    refuse_task_named_like_a_new_line,
    start_progress,
)

REBASE_ATTEMPTS = 16


def fuse(task: str, into: str, *, again: bool = False, max_regression: float | None = None,
         registry: str | os.PathLike | None = None, progress: Progress = None, **options: Any) -> dict[str, Any]:
    """Fuse TASK into LINE → a new version. The first task of a line becomes v1 as it is.

    A task the line's head already holds (fused into it, and not rolled back since) is refused
    with a ConflictError (exit 6) unless `again`: a retried pipeline step must not fuse twice.
    A task trained from an older version of LINE than its head is fused all the same and the
    result says so in `stale_start` (`{"trained_from": "LINE@vN", "head": "LINE@vM"}`, else None).

    `max_regression` (points of exact match): the version is not created (ConflictError, exit 6)
    when a task the line holds would lose more than that on its validation examples against the
    head (services/validation.py); `method="validated"` chooses linear's α on them from `grid`.

    `options`: the fusion parameters, named as `kifmerge.options.FuseParams`' fields (`method`,
    `alpha`, `top`, …; `merge_seed` or `seed`); one left out or None takes its default."""
    params = fuse_params(**options)
    check_max_regression(max_regression)
    check_name(into, "line")
    with opened(registry) as reg:
        task_row = reg.catalog.get("tasks", task, "task")
        profile_row = reg.catalog.find("profiles", task)
        check_profile_for(params.method, task, profile_row, chosen="method" in params.model_fields_set)
        warned: set[str] = set()
        for attempt in range(1, REBASE_ATTEMPTS + 1):  # the line moved meanwhile: fuse again onto its new head
            holder = refuse_fused_again(reg, task_row, into, again)
            with warnings_once(warned):  # a fallback is said once, not again for each rebase
                staged = stage_version(reg, task_row, profile_row["scores"] if profile_row else None, into, params,
                                       progress, max_regression=max_regression)
            if holder is not None:
                staged.notes["again"] = f"{into}@v{holder['number']}"
            fault_point("fuse.staged")
            try:
                with reg.catalog.transaction():
                    refuse_fused_again(reg, task_row, into, again)  # a concurrent fuse of the same task landed first
                    commit_version(reg, staged)
                return staged.public()
            except ConflictError:
                head = reg.catalog.head(into)
                if attempt == REBASE_ATTEMPTS or (head["number"] if head else 0) == staged.row["number"] - 1:
                    raise


@contextmanager
def warnings_once(warned: set[str]) -> Iterator[None]:
    """Warnings raised inside, passed on unless one with the same text was passed on before."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # also when staging refused (--max-regression): the fallback it took is still said
        for warning in caught:
            if str(warning.message) not in warned:
                warned.add(str(warning.message))
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def check_profile_for(method: str, task: str, profile_row: dict | None, chosen: bool = True) -> None:
    """A task registered without an importance profile can be fused only by a rule that reads none,
    or by the default when it was not chosen (it falls back to one that reads none: `gram_fallback`)."""
    from kifmerge.fusion.methods import profile_free, reads_profile

    if profile_row is None and reads_profile(method) and (chosen or method not in GRAM_FALLBACK):
        raise InvalidInputError(
            f"task {task!r} has no importance profile, which --method {method} reads; fuse it with a rule that reads "
            f"none ({', '.join(profile_free())}), or re-register it with `kifmerge add-task … --profile FILE` "
            "or `--calibrate DATA` (`kifmerge train` records one)")


# The default rule → what fuses when it was not chosen and cannot run: the best data-free rule on the
# benchmark's ruler, TIES +2.6 [+1.7, +3.6] AP above MagMax over orders 4–6 (-0.1 [-1.1, +0.9] at lr 1e-3;
# benchmarks/results/summary-vs-magmax.md); it reads the base like MagMax and no profile
GRAM_FALLBACK = {"regmean": "ties"}
# RegMean's merged ΔW above this × the larger input's warns. SmolLM2, lr 3e-3, orders 5–6: float32 Gram sums
# reach 8.3 (layers 0–1; layer 0's inputs' Gram matrices span 8 orders of magnitude), the bfloat16 sums of the same
# trainings 21 and 64 (the 64 made the merge answer amazon at 3 %)
GRAM_GROWTH_WARNING = 16.0
SUMMED_IN_BF16 = ("summed in bfloat16 (a --bf16/--fp16 training by a kifmerge before 2026-12-06), too imprecise "
                  "for RegMean")


def imprecise_grams(profile: Path, task_rows: list[dict]) -> bool:
    """Gram matrices an older kifmerge summed in bfloat16: a profile without the float32 mark
    (`grams_precise`) from a training under --bf16/--fp16 (for a line's head: of any task it holds).
    Such sums are indefinite, and RegMean's solve amplified those directions up to ×64 (measured on
    benchmarks/results/ruler.md, order 5); a file of a float32 training never had the problem."""
    from kifmerge.profiles import grams_precise

    configs = [row.get("training_config") or {} for row in task_rows]
    return any(c.get("bf16") or c.get("fp16") for c in configs) and not grams_precise(profile)


def gram_fallback(params, kind: str, task_row: dict, head: str, task_grams: dict | None, head_grams: dict | None,
                  problem: str | None = None):
    """(params, why) for a fuse by a Gram rule: as they are, or, when the rule is the default (not
    chosen) and a side has no Gram matrices (a task added without `--calibrate`, trained with
    `--no-gram` or before they were recorded by default, a full fine-tuning) or none usable
    (`problem`), the fallback's (TIES), with the reason, warned on stderr and recorded on the version. A rule
    chosen with --method is never swapped: it refuses."""
    if params.method not in GRAM_FALLBACK or "method" in params.model_fields_set:
        return params, None
    if problem is not None:
        why = problem
    elif kind != "lora":
        why = "a full fine-tuning line has no Gram matrices"
    elif task_grams is None:
        why = f"task {task_row['name']!r} has no Gram matrices ({_why_no_grams(task_row.get('training_config') or {})})"
    elif head_grams is None:
        why = f"{head} has no Gram matrices (a task of the line had none, or none usable, so no later fuse into it has them)"
    else:
        return params, None
    fallback = GRAM_FALLBACK[params.method]
    warnings.warn(f"{params.method} (the default): {why}: fused by {fallback} (--method {fallback}: the same, "
                  "without this warning)", FallbackWarning, stacklevel=3)
    return params.model_copy(update={"method": fallback}), f"{params.method}: {why}: fused by {fallback}"


def _why_no_grams(config: dict) -> str:
    """How a LoRA task came to have no Gram matrices, from its recorded training config."""
    from kifmerge.options import grams_recorded

    calibration = config.get("calibration")
    if calibration is None and not (config.get("data") or {}).get("sha256"):
        return "added without --calibrate"
    how = "calibrated" if calibration is not None else "trained"
    return ("some adapted module is no linear layer" if grams_recorded(calibration or config)
            else f"{how} with --no-gram or before 2026-12-06")


def _element_fallback(method: str, task: str, head: str, task_elements: dict | None, head_elements: dict | None) -> str | None:
    """Why an element rule cannot weigh this fuse element by element (None: it can). A profile
    without element scores (a full fine-tuning; a task added with a unit-level profile and no
    --calibrate; a line begun before they were recorded) says nothing per element, so the rule
    weighs every element alike, ½ — a plain 0.5 average, which beat the unit-level `kif` on the
    benchmark — and says so once, on stderr and in the version's record."""
    if task_elements is not None and head_elements is not None:
        return None
    if task_elements is None:
        why = (f"task {task!r} has no element scores in its profile (`kifmerge train` records them for LoRA tasks, "
               "`add-task --calibrate` for checkpoints trained elsewhere)")
    else:
        why = f"{head} has no element scores (its line began without them); the line's restart from this task's"
    warnings.warn(f"{method}: {why}: every element weighted 0.5, a plain average", FallbackWarning, stacklevel=3)
    return f"{why}: every element weighted 0.5, a plain average"


def _flat_unit_scores(method: str, head: str, p_old) -> str | None:
    """A line begun by a task without a profile has all-equal unit scores until a task with one is fused:
    a unit rule then cannot tell the line's important units apart. Said once, on stderr and on the version."""
    if p_old.numel() == 0 or not bool((p_old == p_old.flatten()[0]).all()):
        return None
    why = (f"{head}'s unit scores are all equal (its line began with a task added without a profile), so the rule "
           "cannot tell which units matter to the line")
    warnings.warn(f"{method}: {why}", FallbackWarning, stacklevel=3)
    return why


def _line_elements(head_elements: dict | None, task_elements: dict | None, held: Callable[[], int]) -> dict | None:
    """The new version's element scores: the running mean over the tasks the line holds; when one
    side has none, the other side's as they are, so that one task without them never erases the
    line's, and a line that had none gains them from its first task that has some."""
    if head_elements is None or task_elements is None:
        return head_elements if task_elements is None else task_elements
    from kifmerge.profiles import accumulate_elements

    return accumulate_elements(head_elements, task_elements, held())


def check_max_regression(points: float | None) -> None:
    if points is not None and not (math.isfinite(points) and 0 <= points <= 100):
        raise UsageError(f"invalid fuse option --max-regression: {points} is not a number of points from 0 to 100")


@dataclass
class StagedVersion:
    row: dict[str, Any]
    base: str
    kind: str
    # what the fuse reports beside the version row (stale_start; again: the version that
    # already held the task); also recorded in the `fuse` event
    notes: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {**public_version(self.row, self.kind), **{k: v for k, v in self.notes.items() if k != "again"}}


def held_versions(reg: Registry, line: str) -> Iterator[dict[str, Any]]:
    """The versions whose fuses brought what LINE's head holds now, newest first."""
    from kifmerge.registry.catalog import held_versions_of

    return held_versions_of(reg.catalog.rows("versions", "line = ?", [line]))


def version_holding(reg: Registry, line: str, task: str) -> dict[str, Any] | None:
    """The version whose fuse brought TASK into what LINE's head holds now, or None."""
    return next((version for version in held_versions(reg, line) if version["task"] == task), None)


def refuse_fused_again(reg: Registry, task_row: dict, into: str, again: bool) -> dict[str, Any] | None:
    """ConflictError when LINE's head already holds TASK (unless `again`); returns the version
    that holds it (None when it does not)."""
    holder = version_holding(reg, into, task_row["name"])
    if holder is not None and not again:
        where = f"{into}@v{holder['number']}"
        raise ConflictError(f"task {task_row['name']!r} is already in line {into!r} (fused as {where}); nothing was done. "
                            "Pass --again to fuse it a second time",
                            details={"error": "conflict", "reason": "already-fused", "task": task_row["name"],
                                     "line": into, "version": where})
    return holder


def stale_start(reg: Registry, task_row: dict, line: str, head: dict | None) -> dict[str, str] | None:
    """`{"trained_from": "LINE@vN", "head": "LINE@vM"}` when the task was trained from an older
    version N of the line it is fused into than its head M (and the head does not simply hold
    vN's weights, as after a rollback to vN); else None. A task trained from another line, or of
    unknown start (add-task without --line), is not reported."""
    ref = task_row.get("trained_from")
    if head is None or not ref or "@v" not in ref:
        return None
    start_line, _, number = ref.rpartition("@v")
    if start_line != line or not number.isdigit() or int(number) >= head["number"]:
        return None
    start = _trained_from_version(reg, ref)
    if start is not None and start["weights"] == head["weights"]:
        return None
    return {"trained_from": ref, "head": f"{line}@v{head['number']}"}


def stage_version(reg: Registry, task_row: dict, profile_sha: str | None, into: str, params: FuseParams,
                   progress: Progress, max_regression: float | None = None) -> StagedVersion:
    """Compute the fused weights and the line's new profile and store their blobs; no rows yet.
    With validation (`validated`, `max_regression`) the weights are checked before any is stored.
    A task without a profile (`profile_sha` None; only rules that read none get here) counts as
    all-equal scores, which leave the line's accumulated profile as it was (min–max normalised)."""
    from kifmerge.checkpoints import read_headers
    from kifmerge.fusion.methods import DATA, ELEMENT, GRAM, METHODS, TASK_VECTOR
    from kifmerge.fusion.engine import (
        ElementBlend,
        LoraDeltaFusion,
        RegMeanFusion,
        TaskVectorFusion,
        TensorSource,
        UnitBlend,
        stream_fused,
    )
    import torch

    from kifmerge.fusion.writer import SAFETENSORS_DTYPES, StreamingShardWriter, TensorSpec
    from kifmerge.profiles import (
        accumulate,
        normalise,
        read_elements,
        read_grams,
        read_profile,
        write_profile,
    )
    from kifmerge.units import layout_for

    started = time.perf_counter()
    task, kind = task_row["name"], task_row["kind"]
    line_row = reg.catalog.find("lines", into)
    if line_row is None:
        refuse_task_named_like_a_new_line(reg, into)
    if line_row and (line_row["base"], line_row["kind"]) != (task_row["base"], kind):
        raise InvalidInputError(f"line {into!r} holds {line_row['kind']} versions of base {line_row['base']!r}; "
                                f"task {task!r} is {kind} on base {task_row['base']!r}")
    head = reg.catalog.head(into)
    new_ws = reg.weights(task_row["weights"])
    new_headers = read_headers(new_ws.tensor_files(), new_ws.weight_map)
    layout = layout_for(kind, new_headers.shapes)
    gram_problem = None  # why Gram matrices that are there are not used
    if profile_sha is None:
        p_new, task_elements, task_grams = torch.zeros(layout.size), None, None
    else:
        p_new = read_profile(reg.blobs.open_verified(profile_sha), layout)
        task_elements = read_elements(reg.blobs.open_verified(profile_sha), new_headers.shapes)
        task_grams = read_grams(reg.blobs.open_verified(profile_sha), list(layout.groups),
                                lora_input_widths(new_headers.shapes)) if kind == "lora" else None
        if task_grams is not None and imprecise_grams(reg.blobs.open_verified(profile_sha), [task_row]):
            task_grams, gram_problem = None, f"task {task!r}'s Gram matrices were {SUMMED_IN_BF16}"
    line_elements, line_grams = None, None
    staging = reg.blobs.staging_dir()
    timings: dict[str, float] = {}
    try:
        if head is None:
            method, recorded = "initial", {} if profile_sha else {"task_profile": "none: the line starts with all-equal scores"}
            weights_sha, p_line = task_row["weights"], normalise(p_new)
            line_elements, line_grams = task_elements, task_grams
        else:
            if kind == "lora":
                check_lora_compatible(head["adapter_config"], task_row["adapter_config"], task, into)
            old_ws = reg.weights(head["weights"])
            if layout_for(kind, read_headers(old_ws.tensor_files(), old_ws.weight_map).shapes) != layout:
                raise InvalidInputError(f"task {task!r} has a different unit layout than {into}@v{head['number']} "
                                        "(other modules, ranks or tensors); it must be trained from the same running model")
            p_old = read_profile(reg.blobs.open_verified(head["profile"]), layout)
            head_elements = read_elements(reg.blobs.open_verified(head["profile"]), new_headers.shapes)
            head_grams = read_grams(reg.blobs.open_verified(head["profile"]), list(layout.groups),
                                    lora_input_widths(new_headers.shapes)) if task_grams else None
            from kifmerge.services.validation import held_tasks

            if head_grams is not None and imprecise_grams(reg.blobs.open_verified(head["profile"]),
                                                          [reg.catalog.get("tasks", name, "task") for name in held_tasks(reg, into)]):
                head_grams, gram_problem = None, f"{into}@v{head['number']}'s Gram matrices include sums {SUMMED_IN_BF16}"
            params, instead = gram_fallback(params, kind, task_row, f"{into}@v{head['number']}", task_grams, head_grams,
                                            gram_problem)
            family = METHODS[params.method].family
            validation, selection = None, None
            if family == DATA or max_regression is not None:
                from kifmerge.services.validation import open_validated_fuse

                validation = open_validated_fuse(reg, task_row, into, head, val_examples=params.val_examples)
            if family == DATA:  # then fused as its unit rule with the α chosen
                chosen, selection = validation.choose_alpha(params.grid, task)
                params = params.model_copy(update={"alpha": chosen})
            old_source = TensorSource(old_ws.files, old_ws.weight_map)
            new_source = TensorSource(new_ws.files, new_ws.weight_map)
            units, flat_profile = None, None
            fallback = _element_fallback(params.method, task, f"{into}@v{head['number']}", task_elements, head_elements) \
                if family == ELEMENT else None
            if family == ELEMENT and fallback is None:
                element_weights = {name: METHODS[params.method].element(params, head_elements[name], task_elements[name])
                                   for name in task_elements}
                fusion = ElementBlend(old_source, new_source, element_weights)
            elif family == GRAM:
                if gram_problem is not None:
                    raise InvalidInputError(f"{params.method} needs precise Gram matrices, and {gram_problem}: retrain "
                                            "the task (or `add-task --calibrate DATA` its checkpoint), or fuse by another rule")
                if task_grams is None or head_grams is None:
                    whose = f"task {task!r}" if task_grams is None else f"{into}@v{head['number']}"
                    raise InvalidInputError(f"{params.method} needs the Gram matrices of a LoRA line's inputs, and {whose}'s "
                                            "profile has none: train every task of the line without --no-gram (they are "
                                            "recorded by default for LoRA; a checkpoint trained elsewhere: `add-task "
                                            "--calibrate DATA`)")
                fusion = RegMeanFusion(old_source, new_source, head_grams, task_grams, params.non_diagonal)
            elif family == TASK_VECTOR and kind == "lora":
                fusion = LoraDeltaFusion(old_source, new_source, params.method, vector_weights=[1 - params.alpha, params.alpha],
                                         density=params.density, lam=params.lam, seed=params.seed)
            elif family == TASK_VECTOR:
                tensors = open_base(reg, reg.catalog.get("bases", task_row["base"], "base")).tensors
                fusion = TaskVectorFusion(old_source, new_source, TensorSource(tensors.files, tensors.weight_map),
                                          params.method, vector_weights=[1 - params.alpha, params.alpha],
                                          density=params.density, lam=params.lam, seed=params.seed)
            else:  # a unit rule, or an element rule without its scores: every weight ½ (what equal scores give)
                if fallback is None and METHODS[params.method].weighs_unit_scores:
                    flat_profile = _flat_unit_scores(params.method, f"{into}@v{head['number']}", p_old)
                c_new, c_old = unit_coefficients(params, p_old, p_new) if fallback is None else (
                    torch.full((layout.size,), 0.5), torch.full((layout.size,), 0.5))
                fusion = UnitBlend(old_source, new_source, layout, c_new, c_old)
                units = {"total": layout.size, "new_weight_mean": round(float(c_new.mean()), 6)}
            pattern, index = ("adapter_model{suffix}.safetensors", None) if kind == "lora" else \
                ("model{suffix}.safetensors", "model.safetensors.index.json")
            specs = {n: TensorSpec(new_headers.dtypes[n], new_headers.shapes[n]) for n in layout.slots}
            if params.dtype:  # compute in float32 as always, write the asked dtype
                out_dtype = getattr(torch, params.dtype)
                specs = {n: TensorSpec(SAFETENSORS_DTYPES[out_dtype], spec.shape) for n, spec in specs.items()}
            writer = StreamingShardWriter(staging, specs, filename_pattern=pattern, index_name=index,
                                          max_shard_bytes=params.shard_bytes)
            t0 = time.perf_counter()
            try:
                stream_fused(fusion, writer, start_progress(progress, f"fusing {task} into {into}", len(layout.slots)))
            except BaseException:
                writer.abort()
                raise
            finally:
                for source in fusion.sources:
                    source.close()
            files, weight_map = writer.finish()
            fault_point("fuse.shards-written")
            gate = None
            if max_regression is not None:  # before anything is stored: a refused version leaves nothing behind
                from kifmerge.services.validation import adapter_tensors

                gate = validation.check_regression(adapter_tensors(files), max_regression, task, f"{into}@v{head['number'] + 1}")
            timings["fuse_s"] = round(time.perf_counter() - t0, 4)
            for side in set(new_ws.files) - set(new_ws.weight_map.values()) - set(files):
                files[side] = new_ws.files[side]  # adapter_config.json / config.json travel along
            if params.dtype and "config.json" in files:  # the model config states the dtype it is stored in
                config = json.loads(files["config.json"].read_text())
                config.update({key: params.dtype for key in ("dtype", "torch_dtype") if key in config} or {"dtype": params.dtype})
                files["config.json"] = staging / "config.json"
                files["config.json"].write_text(json.dumps(config, indent=2, sort_keys=True))
            weights_sha = reg.put_weights(files, weight_map, move=True, hashes=writer.hashes())
            fault_point("fuse.weights-stored")
            method, recorded = params.method, params.recorded()
            if instead is not None:
                recorded["fallback"] = instead
            if units:
                recorded["units"] = units
            if selection is not None:
                recorded.update({"alpha": params.alpha, "selection": selection})
            if gate is not None:
                recorded["max_regression"] = gate
            if family == ELEMENT:
                recorded["elements"] = fusion.summary() if fallback is None else {"fallback": fallback}
            if family == TASK_VECTOR:
                recorded["reference"] = "base"
            if profile_sha is None:
                recorded["task_profile"] = "none: the line's importance scores carried over unchanged"
            if flat_profile:
                recorded["line_profile"] = flat_profile
            if family == GRAM or (family == TASK_VECTOR and kind == "lora"):
                recorded["refactor"] = fusion.summary()
            if family == GRAM and recorded["refactor"]["largest_growth"] > GRAM_GROWTH_WARNING:
                warnings.warn(f"{params.method}: the merged update of {recorded['refactor']['largest_growth_module']} is "
                              f"{recorded['refactor']['largest_growth']:.1f}× the larger of the two it merges (the solve "
                              "amplified directions the inputs barely excite; Gram matrices that are not the inputs', e.g. "
                              "edited, do this): if the version scores badly, compare a --method ties fuse", KifWarning,
                              stacklevel=2)
            p_line = accumulate(p_old, p_new, params.profile_weights)
            line_elements = _line_elements(head_elements, task_elements, lambda: len(held_tasks(reg, into)))
            if task_grams is not None:  # the line's Gram matrices: the sum over the tasks it holds
                line_grams = {name: head_grams[name] + task_grams[name] for name in task_grams} if head_grams else None
        profile_path = staging / "profile.safetensors"
        write_profile(profile_path, p_line, layout, elements=line_elements, grams=line_grams)
        profile_sha = reg.blobs.put_file(profile_path, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = round(time.perf_counter() - started, 4)
    number = (head["number"] if head else 0) + 1
    row = {"line": into, "number": number, "parent": head["number"] if head else None, "task": task,
           "method": method, "params": recorded, "weights": weights_sha, "profile": profile_sha,
           "adapter_config": task_row["adapter_config"] if head is None else head["adapter_config"],
           "metrics": None, "timings": timings, "created": now()}
    return StagedVersion(row, task_row["base"], kind, {"stale_start": stale_start(reg, task_row, into, head)})


def unit_coefficients(params: FuseParams, p_old, p_new) -> tuple:
    """Per-unit (c_new, c_old) of a unit (or data) rule from the line's accumulated profile and
    the task's raw profile, by its registry entry. `diff` recomputes past fuses with it from their
    recorded parameters (`FuseParams.recorded()`)."""
    from kifmerge.fusion.methods import METHODS

    return METHODS[params.method].coefficients(params, p_old, p_new)


def _trained_from_version(reg: Registry, ref: str | None) -> dict | None:
    """The version row a task records it was trained from (`LINE@vN`, N ≥ 1), if it still exists."""
    if not ref or "@v" not in ref:
        return None
    line, _, number = ref.rpartition("@v")
    if not number.isdigit() or int(number) < 1:
        return None
    rows = reg.catalog.rows("versions", "line = ? AND number = ?", [line, int(number)])
    return rows[0] if rows else None


def commit_version(reg: Registry, staged: StagedVersion) -> None:
    """Inside the caller's transaction: create the line if new, refuse if it moved meanwhile."""
    row, into = staged.row, staged.row["line"]
    if reg.catalog.find("lines", into) is None:
        reg.catalog.insert("lines", {"name": into, "base": staged.base, "kind": staged.kind, "created": now()})
        reg.catalog.event("line.create", into, {"base": staged.base, "kind": staged.kind})
        fault_point("fuse.line-row")
    current = reg.catalog.head(into)
    if (current["number"] if current else 0) != row["number"] - 1:
        raise ConflictError(f"line {into!r} moved to v{current['number']} while fusing; run the command again")
    reg.catalog.insert("versions", row)
    action = "rollback" if row["method"] == "rollback" else "fuse"
    notes = {k: v for k, v in staged.notes.items() if v is not None}
    reg.catalog.event(action, f"{into}@v{row['number']}", {"task": row["task"], "method": row["method"], "params": row["params"],
                                                           **notes})


def check_lora_compatible(line_config: dict, task_config: dict, task: str, line: str) -> None:
    for key in LORA_COMPAT_KEYS:
        if (line_config or {}).get(key) != (task_config or {}).get(key):
            raise InvalidInputError(f"task {task!r} has LoRA {key}={task_config.get(key)!r} but line {line!r} "
                                    f"has {line_config.get(key)!r}; adapters must share their LoRA configuration")
    if set(as_list(line_config.get("target_modules"))) != set(as_list(task_config.get("target_modules"))):
        raise InvalidInputError(f"task {task!r} adapts other target modules than line {line!r}")


def as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def lora_input_widths(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Each LoRA module's input features (A is [r, in]), by module name: a Gram matrix must be that wide."""
    suffix = ".lora_A.weight"
    return {name[: -len(suffix)]: shape[1] for name, shape in shapes.items() if name.endswith(suffix) and len(shape) == 2}
