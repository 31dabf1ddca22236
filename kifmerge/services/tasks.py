"""Registering tasks: validate a checkpoint against its base, store it and its profile."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kifmerge.errors import ConflictError, NotFoundError, UsageError
from kifmerge.faults import fault_point
from kifmerge.options import TrainOptions, validated
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_input
from kifmerge.services.common import (
    Progress,
    base_dir,
    check_name,
    now,
    open_base,
    opened,
    parse_ref,
    public_task,
    resolve_version,
    start_progress,
)


def add_task(name: str, checkpoint: str | Path, *, base: str, profile: str | Path | None = None,
             line: str | None = None, calibrate: str | Path | None = None, calibrate_batches: int = 8,
             calibrate_options: dict[str, Any] | None = None, allow_pickle: bool = False, val: str | Path | None = None,
             registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Validate a LoRA adapter or full checkpoint against its base and store it with its profile
    (given as a file, or computed with `calibrate` from gradients on a few batches of data).
    `allow_pickle` converts `*.bin` weights (loaded with `torch.load(weights_only=True)`) to
    safetensors first; otherwise they are refused."""
    if profile and calibrate:
        raise UsageError("give either --profile or --calibrate, not both")
    if calibrate and calibrate_batches < 1:
        raise UsageError(f"--calibrate-batches must be at least 1, got {calibrate_batches}")
    if (calibrate_options or {}).get("gram") and not calibrate:
        raise UsageError("--gram needs --calibrate: the Gram matrices are the checkpoint's inputs on that data")
    check_name(name, "task")
    with opened(registry) as reg:
        base_row = reg.catalog.get("bases", base, "base")
        refuse_existing_task(reg, name)
        trained_from = trained_from_ref(reg, line, base_row["name"]) if line else None
        staging = reg.blobs.staging_dir()
        try:
            extra: dict[str, Any] = {"estimator": "external"}
            if calibrate:
                from kifmerge.calibration import calibrate_profile

                opts = validated(TrainOptions, "calibration", calibrate_options or {})
                extra = {"estimator": f"calibrated-{opts.importance}",
                         "training_config": {"calibration": {"data": str(Path(calibrate).resolve()), "batches": calibrate_batches,
                                                             **opts.model_dump(include={"importance", "beta1", "beta2", "batch_size", "max_length", "gram"})}},
                         "data_fingerprint": sha256_input(Path(calibrate)) if Path(calibrate).is_file() else None}
                folder = base_dir(reg, base_row)

                def profile(ckpt):  # runs after the checkpoint has been validated against the base
                    return calibrate_profile(ckpt, folder, base_row["config"], Path(calibrate), calibrate_batches, opts,
                                             staging / "profile.safetensors", start_progress(progress, "calibrating", calibrate_batches))
            staged = stage_task(reg, name, Path(checkpoint), base_row, profile, trained_from, progress,
                                 source=str(Path(checkpoint).resolve()), allow_pickle=allow_pickle,
                                 scratch=staging, **extra)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if val:
            from kifmerge.services.validation import store_validation

            staged.row["validation"] = store_validation(reg, val)
        fault_point("add-task.staged")
        with reg.catalog.transaction():
            commit_task(reg, staged)
        return staged.public()


@dataclass
class StagedTask:
    """A task whose blobs are stored but whose rows are not yet committed."""

    row: dict[str, Any]
    profile_row: dict[str, Any] | None
    layout: Any

    def public(self) -> dict[str, Any]:
        metrics = {k: v for k, v in (self.row["metrics"] or {}).items() if k != "curve"} or None
        return {**public_task(self.row), "metrics": metrics,
                "profile": {"estimator": self.profile_row["estimator"], **self.layout.describe()} if self.profile_row else None}


def refuse_existing_task(reg: Registry, name: str) -> None:
    if reg.catalog.find("tasks", name):
        raise ConflictError(f"task {name!r} already exists; choose another name")
    if reg.catalog.find("lines", name):  # `show`, `profile show` and `history` would read the task, not the line
        raise ConflictError(f"{name!r} is a line's name; choose another name for the task")


def trained_from_ref(reg: Registry, ref: str, base: str) -> str:
    """`add-task --line`: the version the checkpoint was trained from, `LINE@vN`. `LINE` is the line's head
    now, `LINE@vN` / `LINE@ALIAS` an older one; a line that does not exist yet was trained from the base
    (`LINE@v0`). A line on another base is refused: its versions are not this checkpoint's start."""
    line, selector = parse_ref(ref)
    row = reg.catalog.find("lines", line)
    if row is None:
        if selector not in (None, 0):
            raise NotFoundError(f"--line {ref}: line {line!r} not found (a new line's checkpoint is trained from the "
                                f"base: --line {line})")
        return f"{line}@v0"
    if row["base"] != base:
        raise UsageError(f"--line {ref}: line {line!r} is on base {row['base']!r}, not {base!r}")
    if selector == 0 or (selector is None and reg.catalog.head(line) is None):
        return f"{line}@v0"
    _, version = resolve_version(reg, ref)
    return f"{line}@v{version['number']}"


def stage_task(reg: Registry, name: str, checkpoint: Path, base_row: dict, profile: Path | str | Callable | None,
                trained_from: str | None, progress: Progress, *, source: str, estimator: str,
                training_config: dict | None = None, data_fingerprint: str | None = None,
                metrics: dict | None = None, allow_pickle: bool = False, scratch: Path | None = None) -> StagedTask:
    """Validate a checkpoint (and profile) against the base and store their blobs; no rows yet.
    `profile` may be a callable that makes the profile file from the validated checkpoint."""
    from kifmerge.checkpoints import (
        ADAPTER_CONFIG,
        check_finite,
        open_checkpoint,
        validate_against_base,
    )
    from kifmerge.profiles import read_profile

    ckpt = open_checkpoint(checkpoint, allow_pickle=allow_pickle, scratch=scratch)
    validate_against_base(ckpt, open_base(reg, base_row))
    check_finite(ckpt.tensors, start_progress(progress, "checking weights", len(ckpt.tensors.shapes)))
    if callable(profile):
        profile = profile(ckpt)
    if profile:
        read_profile(profile, ckpt.layout)
    files = dict(ckpt.tensors.files)
    side = [ADAPTER_CONFIG] if ckpt.kind == "lora" else ["config.json", "generation_config.json", "model.safetensors.index.json"]
    files.update({n: ckpt.path / n for n in side if (ckpt.path / n).is_file()})
    row = {"name": name, "base": base_row["name"], "kind": ckpt.kind, "weights": reg.put_weights(files, ckpt.tensors.weight_map),
           "adapter_config": ckpt.adapter_config, "training_config": training_config,
           "data_fingerprint": data_fingerprint, "metrics": metrics, "trained_from": trained_from,
           "source": source, "created": now()}
    fault_point("task.weights-stored")
    profile_row = None
    if profile:
        profile_row = {"task": name, "unit": ckpt.layout.unit, "estimator": estimator,
                       "scores": reg.blobs.put_file(Path(profile)), "layout": ckpt.layout.describe(), "created": now()}
    return StagedTask(row, profile_row, ckpt.layout)


def commit_task(reg: Registry, staged: StagedTask) -> None:
    """Inside the caller's transaction."""
    refuse_existing_task(reg, staged.row["name"])
    reg.catalog.insert("tasks", staged.row)
    fault_point("task.row")
    if staged.profile_row:
        reg.catalog.insert("profiles", staged.profile_row)
    reg.catalog.event("task.add", staged.row["name"], {"kind": staged.row["kind"], "source": staged.row["source"],
                                                       "profile": staged.profile_row["estimator"] if staged.profile_row else None})
