"""The Python API: one service function per command. Each opens the registry, validates,
does the work outside any transaction, then records the result in one transaction.

Results are plain JSON-able dicts, so the CLI can render them as a table or as `--json`.
Heavy libraries (torch, peft, transformers) are imported inside the services that need
them, which keeps `kifmerge --help` and registry queries instant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from kifmerge.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, UsageError
from kifmerge.options import FuseParams, TrainOptions, validated
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_file

# progress(description, total) → advance(n); None means silent
Progress = Callable[[str, int], Callable[[int], None]] | None
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REF_PATTERN = re.compile(r"^(?P<line>[^@]+)(@v(?P<number>\d+))?$")
PROFILE_EXPORT_NAME = "kifmerge-profile.safetensors"  # the line's accumulated profile, re-importable
LORA_COMPAT_KEYS = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


def _advance(progress: Progress, description: str, total: int) -> Callable[[int], None] | None:
    return progress(description, total) if progress else None


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise UsageError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (max 100), starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`LINE@vN` → (LINE, N); `LINE` → (LINE, None) meaning the newest version."""
    match = REF_PATTERN.match(ref)
    if not match:
        raise UsageError(f"invalid version reference {ref!r}: write LINE or LINE@vN (e.g. support@v3)")
    number = match.group("number")
    return match.group("line"), int(number) if number else None


@contextmanager
def opened(root: str | os.PathLike | None) -> Iterator[Registry]:
    registry = Registry.open(root)
    try:
        yield registry
    finally:
        registry.close()


def fuse_params(**values: Any) -> FuseParams:
    return validated(FuseParams, "fuse", values)


# ---- registry ---------------------------------------------------------------------------
def init(registry: str | os.PathLike | None = None) -> dict[str, Any]:
    reg, created = Registry.init(registry)
    try:
        return {"registry": str(reg.root.resolve()), "created": created}
    finally:
        reg.close()


def add_base(name: str, model_dir: str | Path, *, copy: bool = False, registry: str | os.PathLike | None = None,
             progress: Progress = None) -> dict[str, Any]:
    """Record a local HF model folder (architecture, fingerprint, path); `copy` also stores its files."""
    from kifmerge.checkpoints import open_model

    check_name(name, "base")
    with opened(registry) as reg:
        if reg.catalog.find("bases", name):
            raise ConflictError(f"base {name!r} already exists; choose another name")
        model = open_model(model_dir)
        weights = None
        if copy:
            files = {p.name: p for p in sorted(model.path.iterdir()) if p.is_file()}
            advance = _advance(progress, "copying base", 1)
            weights = reg.put_weights(files, model.tensors.weight_map)
            if advance:
                advance(1)
        row = {"name": name, "path": str(model.path), "architecture": model.architecture,
               "model_type": model.model_type, "fingerprint": model.fingerprint, "config": model.config,
               "weights": weights, "created": _now()}
        with reg.catalog.transaction():
            reg.catalog.insert("bases", row)
            reg.catalog.event("base.add", name, {"path": row["path"], "copied": copy})
        return _public_base(row)


def base_dir(reg: Registry, base: dict[str, Any]) -> Path:
    """The base's model folder, checked against its fingerprint; a copied base is materialised
    from its blobs under `cache/` when the original folder is gone or changed."""
    from kifmerge.checkpoints import open_model

    path = Path(base["path"])
    if path.is_dir():
        try:
            if open_model(path).fingerprint == base["fingerprint"]:
                return path
        except (NotFoundError, InvalidInputError):
            pass
    if not base.get("weights"):
        raise IntegrityError(f"base {base['name']}: folder {path} is missing or changed since it was registered "
                             "(re-register it, or register with --copy to keep a copy in the registry)")
    cache = reg.root / "cache" / "bases" / f"{base['name']}-{base['fingerprint'][:16]}"
    if not cache.is_dir():
        staging = reg.blobs.staging_dir()
        reg.copy_weights(base["weights"], staging)
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, cache)
    return cache


def add_task(name: str, checkpoint: str | Path, *, base: str, profile: str | Path | None = None,
             line: str | None = None, calibrate: str | Path | None = None, calibrate_batches: int = 8,
             calibrate_options: dict[str, Any] | None = None, registry: str | os.PathLike | None = None,
             progress: Progress = None) -> dict[str, Any]:
    """Validate a LoRA adapter or full checkpoint against its base and store it with its profile
    (given as a file, or computed with `calibrate` from gradients on a few batches of data)."""
    if profile and calibrate:
        raise UsageError("give either --profile or --calibrate, not both")
    check_name(name, "task")
    with opened(registry) as reg:
        base_row = reg.catalog.get("bases", base, "base")
        _refuse_existing_task(reg, name)
        trained_from = _trained_from(reg, line) if line else None
        staging = reg.blobs.staging_dir()
        try:
            extra: dict[str, Any] = {"estimator": "external"}
            if calibrate:
                from kifmerge.calibration import calibrate_profile

                opts = validated(TrainOptions, "calibration", calibrate_options or {})
                extra = {"estimator": f"calibrated-{opts.importance}",
                         "training_config": {"calibration": {"data": str(Path(calibrate).resolve()), "batches": calibrate_batches,
                                                             **opts.model_dump(include={"importance", "beta1", "beta2", "batch_size", "max_length"})}},
                         "data_fingerprint": sha256_file(Path(calibrate)) if Path(calibrate).is_file() else None}
                folder = base_dir(reg, base_row)

                def profile(ckpt):  # runs after the checkpoint has been validated against the base
                    return calibrate_profile(ckpt, folder, base_row["config"], Path(calibrate), calibrate_batches, opts,
                                             staging / "profile.safetensors", _advance(progress, "calibrating", calibrate_batches))
            staged = _stage_task(reg, name, Path(checkpoint), base_row, profile, trained_from, progress,
                                 source=str(Path(checkpoint).resolve()), **extra)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with reg.catalog.transaction():
            _commit_task(reg, staged)
        return staged.public()


@dataclass
class StagedTask:
    """A task whose blobs are stored but whose rows are not yet committed."""

    row: dict[str, Any]
    profile_row: dict[str, Any] | None
    layout: Any

    def public(self) -> dict[str, Any]:
        metrics = {k: v for k, v in (self.row["metrics"] or {}).items() if k != "curve"} or None
        return {**_public_task(self.row), "metrics": metrics,
                "profile": {"estimator": self.profile_row["estimator"], **self.layout.describe()} if self.profile_row else None}


def _refuse_existing_task(reg: Registry, name: str) -> None:
    if reg.catalog.find("tasks", name):
        raise ConflictError(f"task {name!r} already exists; choose another name")


def _trained_from(reg: Registry, line: str) -> str:
    head = reg.catalog.head(line)
    return f"{line}@v{head['number']}" if head else f"{line}@v0"


def _stage_task(reg: Registry, name: str, checkpoint: Path, base_row: dict, profile: Path | str | Callable | None,
                trained_from: str | None, progress: Progress, *, source: str, estimator: str,
                training_config: dict | None = None, data_fingerprint: str | None = None,
                metrics: dict | None = None) -> StagedTask:
    """Validate a checkpoint (and profile) against the base and store their blobs; no rows yet.
    `profile` may be a callable that makes the profile file from the validated checkpoint."""
    from kifmerge.checkpoints import ADAPTER_CONFIG, check_finite, model_tensor_files, open_checkpoint, validate_against_base
    from kifmerge.checkpoints import BaseModel as Model
    from kifmerge.profiles import read_profile

    ckpt = open_checkpoint(checkpoint)
    base_folder = base_dir(reg, base_row)
    validate_against_base(ckpt, Model(base_folder, base_row["config"], model_tensor_files(base_folder)))
    check_finite(ckpt.tensors, _advance(progress, "checking weights", len(ckpt.tensors.shapes)))
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
           "source": source, "created": _now()}
    profile_row = None
    if profile:
        profile_row = {"task": name, "unit": ckpt.layout.unit, "estimator": estimator,
                       "scores": reg.blobs.put_file(Path(profile)), "layout": ckpt.layout.describe(), "created": _now()}
    return StagedTask(row, profile_row, ckpt.layout)


def _commit_task(reg: Registry, staged: StagedTask) -> None:
    """Inside the caller's transaction."""
    _refuse_existing_task(reg, staged.row["name"])
    reg.catalog.insert("tasks", staged.row)
    if staged.profile_row:
        reg.catalog.insert("profiles", staged.profile_row)
    reg.catalog.event("task.add", staged.row["name"], {"kind": staged.row["kind"], "source": staged.row["source"],
                                                       "profile": staged.profile_row["estimator"] if staged.profile_row else None})


# ---- fusion -----------------------------------------------------------------------------
def fuse(task: str, into: str, *, method: str = "kif", top: float | None = None, tau: float | None = None,
         weights: tuple[float, float, float] | None = None, alpha: float | None = None,
         registry: str | os.PathLike | None = None, progress: Progress = None,
         max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Fuse TASK into LINE → a new version. The first task of a line becomes v1 as it is."""
    params = fuse_params(method=method, top=top, tau=tau, weights=weights, alpha=alpha)
    check_name(into, "line")
    with opened(registry) as reg:
        task_row = reg.catalog.get("tasks", task, "task")
        profile_row = reg.catalog.find("profiles", task)
        if profile_row is None:
            raise InvalidInputError(
                f"task {task!r} has no importance profile; re-register it with `kifmerge add-task … --profile FILE` "
                "or `--calibrate DATA` (or train it with `kifmerge train`, which records one)")
        staged = _stage_version(reg, task_row, profile_row["scores"], into, params, progress, max_shard_bytes)
        with reg.catalog.transaction():
            _commit_version(reg, staged)
        return staged.public()


@dataclass
class StagedVersion:
    row: dict[str, Any]
    base: str
    kind: str

    def public(self) -> dict[str, Any]:
        return _public_version(self.row, self.kind)


def _stage_version(reg: Registry, task_row: dict, profile_sha: str, into: str, params: FuseParams,
                   progress: Progress, max_shard_bytes: int | None = None) -> StagedVersion:
    """Compute the fused weights and the line's new profile and store their blobs; no rows yet."""
    from kifmerge.checkpoints import read_headers
    from kifmerge.fusion import rules
    from kifmerge.fusion.engine import LazyTensorReader, fuse_streaming
    from kifmerge.fusion.writer import DEFAULT_MAX_SHARD_BYTES, StreamingShardWriter, TensorSpec
    from kifmerge.profiles import accumulate, normalise, read_profile, write_profile
    from kifmerge.units import layout_for

    started = time.perf_counter()
    task, kind = task_row["name"], task_row["kind"]
    line_row = reg.catalog.find("lines", into)
    if line_row and (line_row["base"], line_row["kind"]) != (task_row["base"], kind):
        raise InvalidInputError(f"line {into!r} holds {line_row['kind']} versions of base {line_row['base']!r}; "
                                f"task {task!r} is {kind} on base {task_row['base']!r}")
    head = reg.catalog.head(into)
    new_ws = reg.weights(task_row["weights"])
    new_headers = read_headers(new_ws.tensor_files(), new_ws.weight_map)
    layout = layout_for(kind, new_headers.shapes)
    p_new = read_profile(reg.blobs.open_verified(profile_sha), layout)
    staging = reg.blobs.staging_dir()
    timings: dict[str, float] = {}
    try:
        if head is None:
            method, recorded = "initial", {}
            weights_sha, p_line = task_row["weights"], normalise(p_new)
        else:
            if kind == "lora":
                _check_lora_compatible(head["adapter_config"], task_row["adapter_config"], task, into)
            old_ws = reg.weights(head["weights"])
            if layout_for(kind, read_headers(old_ws.tensor_files(), old_ws.weight_map).shapes) != layout:
                raise InvalidInputError(f"task {task!r} has a different unit layout than {into}@v{head['number']} "
                                        "(other modules, ranks or tensors); it must be trained from the same running model")
            p_old = read_profile(reg.blobs.open_verified(head["profile"]), layout)
            if params.method == "kif":
                c_new, c_old = rules.kif_static(p_old, normalise(p_new), top=params.top,
                                                both=params.weights[:2], neither=params.weights[2])
            elif params.method == "kif-adaptive":
                c_new, c_old = rules.kif_adaptive(p_old, normalise(p_new), tau=params.tau)
            else:
                c_new, c_old = rules.linear(p_old, p_new, alpha=params.alpha)
            pattern, index = ("adapter_model{suffix}.safetensors", None) if kind == "lora" else \
                ("model{suffix}.safetensors", "model.safetensors.index.json")
            specs = {n: TensorSpec(new_headers.dtypes[n], new_headers.shapes[n]) for n in layout.slots}
            writer = StreamingShardWriter(staging, specs, filename_pattern=pattern, index_name=index,
                                          max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
            t0 = time.perf_counter()
            try:
                fuse_streaming(LazyTensorReader(old_ws.files, old_ws.weight_map),
                               LazyTensorReader(new_ws.files, new_ws.weight_map), layout, c_new, c_old, writer,
                               _advance(progress, f"fusing {task} into {into}", len(layout.slots)))
            except BaseException:
                writer.abort()
                raise
            files, weight_map = writer.finish()
            timings["fuse_s"] = round(time.perf_counter() - t0, 4)
            for side in set(new_ws.files) - set(new_ws.weight_map.values()) - set(files):
                files[side] = new_ws.files[side]  # adapter_config.json / config.json travel along
            weights_sha = reg.put_weights(files, weight_map, move=True)
            method, recorded = params.method, params.recorded()
            recorded["units"] = {"total": layout.size, "new_weight_mean": round(float(c_new.mean()), 6)}
            p_line = accumulate(p_old, p_new, params.profile_weights)
        profile_path = staging / "profile.safetensors"
        write_profile(profile_path, p_line, layout)
        profile_sha = reg.blobs.put_file(profile_path, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = round(time.perf_counter() - started, 4)
    number = (head["number"] if head else 0) + 1
    row = {"line": into, "number": number, "parent": head["number"] if head else None, "task": task,
           "method": method, "params": recorded, "weights": weights_sha, "profile": profile_sha,
           "adapter_config": task_row["adapter_config"] if head is None else head["adapter_config"],
           "metrics": None, "timings": timings, "created": _now()}
    return StagedVersion(row, task_row["base"], kind)


def _commit_version(reg: Registry, staged: StagedVersion) -> None:
    """Inside the caller's transaction: create the line if new, refuse if it moved meanwhile."""
    row, into = staged.row, staged.row["line"]
    if reg.catalog.find("lines", into) is None:
        reg.catalog.insert("lines", {"name": into, "base": staged.base, "kind": staged.kind, "created": _now()})
        reg.catalog.event("line.create", into, {"base": staged.base, "kind": staged.kind})
    current = reg.catalog.head(into)
    if (current["number"] if current else 0) != row["number"] - 1:
        raise ConflictError(f"line {into!r} moved to v{current['number']} while fusing; run the command again")
    reg.catalog.insert("versions", row)
    reg.catalog.event("fuse", f"{into}@v{row['number']}", {"task": row["task"], "method": row["method"], "params": row["params"]})


# ---- training -----------------------------------------------------------------------------
def train(task: str, data: str | Path, line: str, *, base: str | None = None, options: dict[str, Any] | None = None,
          registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any] | None:
    """Fine-tune from LINE's newest version (or from the base when the line is empty), record
    the importance profile while training, and register TASK. Returns None on non-main ranks."""
    from kifmerge.training import wait_for_main_process

    opts = validated(TrainOptions, "train", options or {})
    check_name(task, "task")
    check_name(line, "line")
    with opened(registry) as reg:
        with _trained_task(reg, task, Path(data), line, base, opts, progress) as staged:
            if staged is not None:
                with reg.catalog.transaction():
                    _commit_task(reg, staged)
    wait_for_main_process()
    return staged.public() if staged else None


def learn(task: str, data: str | Path, into: str, *, base: str | None = None, options: dict[str, Any] | None = None,
          method: str = "kif", top: float | None = None, tau: float | None = None,
          weights: tuple[float, float, float] | None = None, alpha: float | None = None,
          registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any] | None:
    """The pipeline step: train TASK from INTO's newest version, then fuse it into INTO.
    Task and version are committed in one transaction: both, or nothing."""
    from kifmerge.training import wait_for_main_process

    opts = validated(TrainOptions, "train", options or {})
    params = fuse_params(method=method, top=top, tau=tau, weights=weights, alpha=alpha)
    check_name(task, "task")
    check_name(into, "line")
    result = None
    with opened(registry) as reg:
        with _trained_task(reg, task, Path(data), into, base, opts, progress) as staged:
            if staged is not None:
                version = _stage_version(reg, staged.row, staged.profile_row["scores"], into, params, progress)
                with reg.catalog.transaction():
                    _commit_task(reg, staged)
                    _commit_version(reg, version)
                result = {**version.public(), "trained": staged.public()}
    wait_for_main_process()
    return result


@contextmanager
def _trained_task(reg: Registry, task: str, data: Path, line: str, base: str | None, opts: TrainOptions,
                  progress: Progress) -> Iterator[StagedTask | None]:
    """Run the training for TASK and stage its blobs; the staging folder lives for the block."""
    from kifmerge.training import load_records, run_training, split_records

    _refuse_existing_task(reg, task)
    line_row = reg.catalog.find("lines", line)
    if line_row is None and base is None:
        raise UsageError(f"line {line!r} does not exist yet; give --base NAME to start it from a base model")
    if line_row is not None and base is not None and base != line_row["base"]:
        raise UsageError(f"line {line!r} is built on base {line_row['base']!r}, not {base!r}")
    base_row = reg.catalog.get("bases", line_row["base"] if line_row else base, "base")
    if line_row is not None and line_row["kind"] != opts.mode:
        raise UsageError(f"line {line!r} holds {line_row['kind']} versions; train it with --mode {line_row['kind']}")
    head = reg.catalog.head(line)
    records = load_records(data, opts.max_examples)
    train_set, val_set = split_records(records, opts.val_fraction, opts.seed)
    replayed = _replay_examples(reg, line, opts, len(train_set))
    folder = base_dir(reg, base_row)
    staging = reg.blobs.staging_dir()
    try:
        init_dir = None
        if head is not None:
            if opts.mode == "lora":
                _check_rank_options(head["adapter_config"], opts, line)
            init_dir = staging / "init"
            init_dir.mkdir()
            reg.copy_weights(head["weights"], init_dir)
        result = run_training(folder, base_row["config"], opts, init_dir, train_set + replayed["examples"], val_set,
                              staging, progress, f"training {task}")
        if result is None:
            yield None
            return
        training_config = {**opts.model_dump(), "learning_rate": opts.learning_rate,
                           "data": {"path": str(data.resolve()), "sha256": sha256_file(data)},
                           "replay": replayed["sources"], "started_from": f"{line}@v{head['number']}" if head else "base"}
        yield _stage_task(reg, task, result.checkpoint, base_row, result.profile, f"{line}@v{head['number'] if head else 0}",
                          progress, source=f"train:{data.resolve()}", estimator=opts.importance,
                          training_config=training_config, data_fingerprint=training_config["data"]["sha256"],
                          metrics=result.metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_rank_options(line_config: dict, opts: TrainOptions, line: str) -> None:
    """A line's later tasks continue its adapter: the LoRA shape options cannot change."""
    for option, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        given = getattr(opts, option)
        if given is not None and given != line_config.get(key):
            raise UsageError(f"line {line!r} has LoRA {key}={line_config.get(key)}; --{option.replace('_', '-')} {given} "
                             "cannot change it (tasks continue the line's adapter)")
    if opts.target_modules and set(opts.target_modules) != set(_as_list(line_config.get("target_modules"))):
        raise UsageError(f"line {line!r} adapts {sorted(_as_list(line_config.get('target_modules')))}; "
                         "--target-modules cannot change that")


def _replay_examples(reg: Registry, line: str, opts: TrainOptions, n_train: int) -> dict[str, Any]:
    """`--replay F`: that fraction of the training set drawn from the data of the line's earlier
    tasks (files found by recorded path and checked against their recorded sha256)."""
    import random

    from kifmerge.training import load_records

    if not opts.replay:
        return {"examples": [], "sources": None}
    pool, sources = [], []
    for version in reg.catalog.rows("versions", "line = ?", [line], order_by="number"):
        task = reg.catalog.find("tasks", version["task"]) if version["task"] else None
        data = ((task or {}).get("training_config") or {}).get("data")
        if not data:
            continue
        path = Path(data["path"])
        if not path.is_file() or sha256_file(path) != data["sha256"]:
            raise InvalidInputError(f"--replay needs the data of task {task['name']!r} ({path}), which is missing or "
                                    "changed since it was trained; restore it or train without --replay")
        pool.extend(load_records(path))
        sources.append({"task": task["name"], "sha256": data["sha256"]})
    if not pool:
        raise InvalidInputError(f"--replay: line {line!r} has no earlier task with recorded training data")
    count = min(len(pool), round(n_train * opts.replay / (1 - opts.replay)))
    return {"examples": random.Random(opts.seed).sample(pool, count), "sources": {"tasks": sources, "examples": count}}


def _check_lora_compatible(line_config: dict, task_config: dict, task: str, line: str) -> None:
    for key in LORA_COMPAT_KEYS:
        if (line_config or {}).get(key) != (task_config or {}).get(key):
            raise InvalidInputError(f"task {task!r} has LoRA {key}={task_config.get(key)!r} but line {line!r} "
                                    f"has {line_config.get(key)!r}; adapters must share their LoRA configuration")
    if set(_as_list(line_config.get("target_modules"))) != set(_as_list(task_config.get("target_modules"))):
        raise InvalidInputError(f"task {task!r} adapts other target modules than line {line!r}")


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])


# ---- export -----------------------------------------------------------------------------
def export(ref: str, out: str | Path, *, merged: bool = False, registry: str | os.PathLike | None = None,
           progress: Progress = None) -> dict[str, Any]:
    """Write LINE[@vN] as an adapter folder, or with `merged` as a full model folder."""
    from kifmerge import export as exporter

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConflictError(f"output {out} exists and is not empty; choose a new folder")
    with opened(registry) as reg:
        line, version = resolve_version(reg, ref)
        line_row = reg.catalog.get("lines", line, "line")
        base_row = reg.catalog.get("bases", line_row["base"], "base")
        folder = base_dir(reg, base_row)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(out.parent / f".{out.name}.kifmerge-tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        advance = _advance(progress, f"exporting {line}@v{version['number']}", 2)
        try:
            if line_row["kind"] == "lora":
                adapter_dir = staging / "adapter" if merged else staging
                adapter_dir.mkdir(exist_ok=True)
                reg.copy_weights(version["weights"], adapter_dir)
                exporter.point_adapter_at_base(adapter_dir, folder)
                if advance:
                    advance(1)
                if merged:
                    exporter.merge_adapter_into_base(adapter_dir, folder, base_row["config"], staging)
                    shutil.rmtree(adapter_dir)
            else:
                reg.copy_weights(version["weights"], staging)
                exporter.copy_model_side_files(folder, staging, include_config=True)
                if advance:
                    advance(1)
            shutil.copyfile(reg.blobs.open_verified(version["profile"]), staging / PROFILE_EXPORT_NAME)
            os.chmod(staging / PROFILE_EXPORT_NAME, 0o644)
            lineage = [v for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number")
                       if v["number"] <= version["number"]]
            evaluations = {row["label"]: row["metrics"] for row in reg.catalog.rows(
                "evaluations", "line = ? and number = ?", [line, version["number"]], order_by="id")}
            hashes = exporter.write_model_card(staging, line=line, version={**version, "kind": line_row["kind"]},
                                               base=base_row, lineage=lineage, merged=merged, evaluations=evaluations)
            if advance:
                advance(1)
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with reg.catalog.transaction():
            reg.catalog.event("export", f"{line}@v{version['number']}", {"out": str(out.resolve()), "merged": merged})
        kind = "adapter" if line_row["kind"] == "lora" and not merged else "model"
        return {"version": f"{line}@v{version['number']}", "out": str(out.resolve()), "kind": kind,
                "files": sorted(p.name for p in out.iterdir()), "sha256": hashes}


# ---- evaluation ---------------------------------------------------------------------------
def evaluate(ref: str, data: dict[str, str | Path], *, max_examples: int | None = 100, max_new_tokens: int = 8,
             max_length: int = 256, batch_size: int = 16, force: bool = False,
             registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Generate greedy answers of LINE@vN (`@v0`: the base, zero-shot) for each labelled data
    file, score them, and store the scores. A result for the same weights, data and settings
    is reused unless `force`."""
    from kifmerge.evaluation import generate_answers, score
    from kifmerge.training import load_records

    if not data:
        raise UsageError("give at least one --data NAME=FILE")
    for label in data:
        check_name(label, "data label")
    if max_new_tokens < 1 or max_length < 8 or batch_size < 1 or (max_examples is not None and max_examples < 1):
        raise UsageError("--max-new-tokens, --max-length, --batch-size and --max-examples must be positive")
    settings = {"max_examples": max_examples, "max_new_tokens": max_new_tokens, "max_length": max_length}
    with opened(registry) as reg:
        line, number = parse_ref(ref)
        line_row = reg.catalog.get("lines", line, "line")
        base_row = reg.catalog.get("bases", line_row["base"], "base")
        if number == 0:
            version, subject = None, f"base:{base_row['fingerprint']}"
        else:
            line, version = resolve_version(reg, ref)
            subject = version["weights"]
        number = version["number"] if version else 0
        inputs = {label: (load_records(path, max_examples), sha256_file(Path(path))) for label, path in data.items()}
        results, rows, model = {}, [], None
        for label, (records, fingerprint) in inputs.items():
            known = None if force else reg.catalog.find_evaluation(subject, fingerprint, settings)
            if known:
                results[label] = {**known["metrics"], "reused": True}
                rows.append({**{k: known[k] for k in ("metrics", "predictions")}, "label": label, "data_fingerprint": fingerprint})
                continue
            if model is None:
                model, tokenizer, seq2seq = _model_for_evaluation(reg, base_row, line_row, version)
            t0 = time.perf_counter()
            answers = generate_answers(model, tokenizer, [r["input"] for r in records], seq2seq=seq2seq,
                                       max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size,
                                       advance=_advance(progress, f"evaluating {label}", len(records)))
            metrics = {**score(answers, [r["output"] for r in records]), "seconds": round(time.perf_counter() - t0, 3)}
            predictions = reg.blobs.put_bytes(json.dumps(
                [{"output": r["output"], "prediction": a} for r, a in zip(records, answers, strict=True)]).encode())
            results[label] = {**metrics, "reused": False}
            rows.append({"metrics": metrics, "predictions": predictions, "label": label, "data_fingerprint": fingerprint})
        with reg.catalog.transaction():
            for row in rows:
                reg.catalog.insert("evaluations", {**row, "line": line, "number": number, "subject": subject,
                                                   "settings": settings, "created": _now()})
            reg.catalog.event("eval", f"{line}@v{number}", {"labels": sorted(data), "settings": settings})
        return {"version": f"{line}@v{number}", "settings": settings, "results": results}


def _model_for_evaluation(reg: Registry, base_row: dict, line_row: dict, version: dict | None):
    """The model of a version, ready to generate: base, base + merged adapter, or full weights."""
    import torch

    from kifmerge.export import model_class_for, quiet_transformers
    from kifmerge.training import is_seq2seq, load_tokenizer

    quiet_transformers()
    folder = base_dir(reg, base_row)
    tokenizer = load_tokenizer(folder)
    cls = model_class_for(base_row["config"])
    staging = reg.blobs.staging_dir()
    try:
        if version is None:
            model = cls.from_pretrained(folder, dtype=torch.float32)
        elif line_row["kind"] == "lora":
            from peft import PeftModel

            reg.copy_weights(version["weights"], staging)
            model = PeftModel.from_pretrained(cls.from_pretrained(folder, dtype=torch.float32), staging).merge_and_unload()
        else:
            from kifmerge.export import copy_model_side_files

            reg.copy_weights(version["weights"], staging)
            copy_model_side_files(folder, staging, include_config=True)
            model = cls.from_pretrained(staging, dtype=torch.float32)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer, is_seq2seq(base_row["config"])


def report(line: str, *, tasks: list[str] | None = None, metric: str = "exact_match",
           registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """The continual-learning matrix R[i][j] (score on task j after version i; row 0 the base)
    from stored evaluations, with AP, BWT and FWT."""
    from kifmerge.evaluation import summarise

    if metric not in ("exact_match", "rouge_l"):
        raise UsageError(f"unknown metric {metric!r}: choose exact_match or rouge_l")
    with opened(registry) as reg:
        reg.catalog.get("lines", line, "line")
        versions = reg.catalog.rows("versions", "line = ?", [line], order_by="number")
        scores: dict[tuple[int, str], float] = {}
        for row in reg.catalog.rows("evaluations", "line = ?", [line], order_by="id"):
            scores[(row["number"], row["label"])] = row["metrics"][metric]  # the newest evaluation wins
        labels = sorted({label for _, label in scores})
        if tasks is None:
            learned = [v["task"] for v in versions if v["task"] in labels]
            tasks = learned + [label for label in labels if label not in learned]
        missing = [t for t in tasks if t not in labels]
        if missing:
            raise NotFoundError(f"line {line!r} has no evaluation labelled {missing[0]!r}; run `kifmerge eval {line}@vN --data {missing[0]}=FILE`")
        rows = [0] + [v["number"] for v in versions]
        matrix = [[scores.get((n, t)) for t in tasks] for n in rows]
        return {"line": line, "metric": metric, "tasks": tasks, "versions": [f"v{n}" for n in rows],
                "fused": [None] + [v["task"] for v in versions], "matrix": matrix, **summarise(matrix)}


# ---- operations ---------------------------------------------------------------------------
def _referenced_blobs(reg: Registry, *, tolerant: bool = False) -> dict[str, list[str]]:
    """Every blob the catalog needs, manifests expanded: sha → the rows that need it.
    `tolerant` skips manifests that cannot be read (verify reports them itself)."""
    refs: dict[str, list[str]] = {}
    for sha, owners in reg.catalog.referenced_blobs().items():
        refs.setdefault(sha, []).extend(owners)
        if any(owner.endswith(".weights") for owner in owners):
            try:
                for blob in reg.manifest(sha)["files"].values():
                    refs.setdefault(blob, []).extend(owners)
            except IntegrityError:
                if not tolerant:
                    raise
    return refs


def verify(*, registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Re-hash every blob the catalog references; report the missing and the corrupt."""
    with opened(registry) as reg:
        refs = _referenced_blobs(reg, tolerant=True)
        problems: list[dict[str, Any]] = []
        advance = _advance(progress, "verifying blobs", len(refs))
        for sha, owners in sorted(refs.items()):
            path = reg.blobs.path_of(sha)
            problem = "missing" if not path.is_file() else ("corrupt" if sha256_file(path) != sha else None)
            if problem:
                problems.append({"blob": sha, "problem": problem, "needed_by": sorted(set(owners))})
            if advance:
                advance(1)
        report = {"registry": str(reg.root.resolve()), "blobs_checked": len(refs), "problems": problems, "ok": not problems}
        if problems:
            first = problems[0]
            raise IntegrityError(f"{len(problems)} blob(s) missing or corrupt, e.g. {first['blob'][:12]} ({first['problem']}) "
                                 f"needed by {first['needed_by'][0]}; restore them from a copy of the registry", details=report)
        return report


def gc(*, dry_run: bool = False, grace_s: float = 3600.0, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Delete blobs no row references and staging leftovers, older than `grace_s` (so a
    command that has stored blobs but not yet committed its rows keeps them)."""
    with opened(registry) as reg:
        needed = set(_referenced_blobs(reg))
        cutoff = time.time() - grace_s
        removed, freed = [], 0
        candidates = [reg.blobs.path_of(sha) for sha in reg.blobs.all_shas() - needed]
        candidates += list(reg.blobs.staging.iterdir()) if reg.blobs.staging.is_dir() else []
        for path in sorted(candidates):
            if path.lstat().st_mtime > cutoff:
                continue
            size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            removed.append(str(path.relative_to(reg.root)))
            freed += size
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if removed and not dry_run:
            with reg.catalog.transaction():
                reg.catalog.event("gc", str(reg.root), {"removed": len(removed), "bytes": freed})
        return {"removed": removed, "bytes_freed": freed, "dry_run": dry_run, "kept_blobs": len(needed)}


# ---- queries ----------------------------------------------------------------------------
def resolve_version(reg: Registry, ref: str) -> tuple[str, dict[str, Any]]:
    line, number = parse_ref(ref)
    reg.catalog.get("lines", line, "line")
    if number is None:
        head = reg.catalog.head(line)
        if head is None:
            raise NotFoundError(f"line {line!r} has no versions yet; fuse a task into it first")
        return line, head
    return line, reg.catalog.version(line, number)


def list_items(what: str = "tasks", *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    tables = {"tasks": "tasks", "lines": "lines", "versions": "versions", "bases": "bases"}
    if what not in tables:
        raise UsageError(f"cannot list {what!r}: choose one of {', '.join(tables)}")
    with opened(registry) as reg:
        if what == "tasks":
            profiled = {r["task"] for r in reg.catalog.rows("profiles")}
            return [{**_public_task(r), "profile": r["name"] in profiled} for r in reg.catalog.rows("tasks", order_by="created")]
        if what == "lines":
            return [_public_line(reg, r) for r in reg.catalog.rows("lines", order_by="name")]
        if what == "bases":
            return [_public_base(r) for r in reg.catalog.rows("bases", order_by="name")]
        kinds = {r["name"]: r["kind"] for r in reg.catalog.rows("lines")}
        return [_public_version(r, kinds[r["line"]]) for r in reg.catalog.rows("versions", order_by="line, number")]


def show(ref: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """A task (`TASK`), a line and its head (`LINE`), or one version (`LINE@vN`)."""
    with opened(registry) as reg:
        if "@" in ref:
            line, version = resolve_version(reg, ref)
            kind = reg.catalog.get("lines", line, "line")["kind"]
            evaluations = {row["label"]: {**row["metrics"], "settings": row["settings"]} for row in reg.catalog.rows(
                "evaluations", "line = ? and number = ?", [line, version["number"]], order_by="id")}
            return {"type": "version", **_public_version(version, kind), "weights": version["weights"],
                    "profile_blob": version["profile"], "evaluations": evaluations}
        task = reg.catalog.find("tasks", ref)
        if task:
            profile = reg.catalog.find("profiles", ref)
            fused = [f"{v['line']}@v{v['number']}" for v in reg.catalog.rows("versions", "task = ?", [ref])]
            return {"type": "task", **_public_task(task), "weights": task["weights"], "adapter_config": task["adapter_config"],
                    "training_config": task["training_config"], "metrics": task["metrics"],
                    "profile": {k: profile[k] for k in ("unit", "estimator", "scores", "layout")} if profile else None,
                    "fused_into": fused}
        line = reg.catalog.find("lines", ref)
        if line:
            return {"type": "line", **_public_line(reg, line)}
        raise NotFoundError(f"no task or line named {ref!r}; see `kifmerge list tasks` / `kifmerge list lines`")


def history(line: str, *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    with opened(registry) as reg:
        row = reg.catalog.get("lines", line, "line")
        return [_public_version(v, row["kind"]) for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number")]


# ---- rendering helpers (shape of the public dicts) ---------------------------------------
def _now() -> str:
    from kifmerge.registry.catalog import now

    return now()


def _public_base(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "path", "architecture", "model_type", "fingerprint", "created")} | {"copied": bool(row.get("weights"))}


def _public_task(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "base", "kind", "trained_from", "data_fingerprint", "source", "created")}


def _public_line(reg: Registry, row: dict[str, Any]) -> dict[str, Any]:
    head = reg.catalog.head(row["name"])
    return {"name": row["name"], "base": row["base"], "kind": row["kind"], "head": f"v{head['number']}" if head else None,
            "tasks": [v["task"] for v in reg.catalog.rows("versions", "line = ?", [row["name"]], order_by="number")],
            "created": row["created"]}


def _public_version(row: dict[str, Any], kind: str) -> dict[str, Any]:
    return {"version": f"{row['line']}@v{row['number']}", "line": row["line"], "number": row["number"],
            "parent": f"v{row['parent']}" if row["parent"] else None, "task": row["task"], "kind": kind,
            "method": row["method"], "params": row["params"], "timings": row["timings"], "created": row["created"]}

