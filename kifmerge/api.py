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
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kifmerge.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, UsageError
from kifmerge.registry import Registry, resolve_root

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


class FuseParams(BaseModel):
    """Fusion parameters (DESIGN.md defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["kif", "kif-adaptive"] = "kif"
    top: float = Field(0.2, gt=0.0, le=1.0, description="fraction of units counted important")
    tau: float = Field(0.25, gt=0.0, description="softmax temperature of kif-adaptive")
    weights: tuple[float, float, float] = (0.3, 0.7, 0.5)
    profile_weights: tuple[float, float] = (0.3, 0.7)

    @field_validator("weights", "profile_weights")
    @classmethod
    def _unit_interval(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= w <= 1.0 for w in value):
            raise ValueError("every weight must lie in [0, 1]")
        return value

    def recorded(self) -> dict[str, Any]:
        """Only the parameters the chosen method uses."""
        if self.method == "kif":
            return {"top": self.top, "weights": list(self.weights), "profile_weights": list(self.profile_weights)}
        return {"tau": self.tau, "profile_weights": list(self.profile_weights)}


def fuse_params(**values: Any) -> FuseParams:
    try:
        return FuseParams(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"invalid fuse option {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


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
             line: str | None = None, registry: str | os.PathLike | None = None, progress: Progress = None,
             training_config: dict | None = None, data_fingerprint: str | None = None,
             metrics: dict | None = None, source: str = "add-task") -> dict[str, Any]:
    """Validate a LoRA adapter or full checkpoint against its base and store it (plus its profile)."""
    from kifmerge.checkpoints import ADAPTER_CONFIG, check_finite, open_checkpoint, validate_against_base
    from kifmerge.checkpoints import BaseModel as Model
    from kifmerge.checkpoints import model_tensor_files
    from kifmerge.profiles import read_profile

    check_name(name, "task")
    with opened(registry) as reg:
        if reg.catalog.find("tasks", name):
            raise ConflictError(f"task {name!r} already exists; choose another name")
        base_row = reg.catalog.get("bases", base, "base")
        trained_from = None
        if line:
            head = reg.catalog.head(line)
            trained_from = f"{line}@v{head['number']}" if head else f"{line}@v0"
        ckpt = open_checkpoint(checkpoint)
        base_folder = base_dir(reg, base_row)
        validate_against_base(ckpt, Model(base_folder, base_row["config"], model_tensor_files(base_folder)))
        check_finite(ckpt.tensors, _advance(progress, "checking weights", len(ckpt.tensors.shapes)))
        scores = read_profile(profile, ckpt.layout) if profile else None

        files = dict(ckpt.tensors.files)
        side = [ADAPTER_CONFIG] if ckpt.kind == "lora" else ["config.json", "generation_config.json", "model.safetensors.index.json"]
        files.update({n: ckpt.path / n for n in side if (ckpt.path / n).is_file()})
        weights = reg.put_weights(files, ckpt.tensors.weight_map)
        profile_sha = reg.blobs.put_file(Path(profile)) if profile else None
        row = {"name": name, "base": base, "kind": ckpt.kind, "weights": weights,
               "adapter_config": ckpt.adapter_config, "training_config": training_config,
               "data_fingerprint": data_fingerprint, "metrics": metrics, "trained_from": trained_from,
               "source": str(Path(checkpoint).resolve()) if source == "add-task" else source, "created": _now()}
        with reg.catalog.transaction():
            reg.catalog.insert("tasks", row)
            if profile_sha:
                reg.catalog.insert("profiles", {"task": name, "unit": ckpt.layout.unit, "estimator": "external",
                                                "scores": profile_sha, "layout": ckpt.layout.describe(), "created": _now()})
            reg.catalog.event("task.add", name, {"kind": ckpt.kind, "profile": bool(profile_sha)})
        result = _public_task(row)
        result["profile"] = {"unit": ckpt.layout.unit, **ckpt.layout.describe()} if scores is not None else None
        return result


# ---- fusion -----------------------------------------------------------------------------
def fuse(task: str, into: str, *, method: str = "kif", top: float | None = None, tau: float | None = None,
         weights: tuple[float, float, float] | None = None, registry: str | os.PathLike | None = None,
         progress: Progress = None, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Fuse TASK into LINE → a new version. The first task of a line becomes v1 as it is."""
    from kifmerge.checkpoints import read_headers
    from kifmerge.fusion import rules
    from kifmerge.fusion.engine import DEFAULT_MAX_SHARD_BYTES, LazyTensorReader, ShardWriter, fuse_streaming
    from kifmerge.profiles import accumulate, normalise, read_profile, write_profile
    from kifmerge.units import layout_for

    params = fuse_params(method=method, top=top, tau=tau, weights=weights)
    check_name(into, "line")
    started = time.perf_counter()
    with opened(registry) as reg:
        task_row = reg.catalog.get("tasks", task, "task")
        profile_row = reg.catalog.find("profiles", task)
        if profile_row is None:
            raise InvalidInputError(
                f"task {task!r} has no importance profile; re-register it with `kifmerge add-task … --profile FILE` "
                "(or train it with `kifmerge train`, which records one)")
        line_row = reg.catalog.find("lines", into)
        if line_row and (line_row["base"], line_row["kind"]) != (task_row["base"], task_row["kind"]):
            raise InvalidInputError(f"line {into!r} holds {line_row['kind']} versions of base {line_row['base']!r}; "
                                    f"task {task!r} is {task_row['kind']} on base {task_row['base']!r}")
        head = reg.catalog.head(into)
        new_ws = reg.weights(task_row["weights"])
        layout = layout_for(task_row["kind"], read_headers(new_ws.tensor_files(), new_ws.weight_map).shapes)
        p_new = read_profile(reg.blobs.open_verified(profile_row["scores"]), layout)
        staging = reg.blobs.staging_dir()
        try:
            timings = {}
            if head is None:
                version_method, recorded = "initial", {}
                weights_sha, p_line = task_row["weights"], normalise(p_new)
            else:
                if task_row["kind"] == "lora":
                    _check_lora_compatible(head["adapter_config"], task_row["adapter_config"], task, into)
                old_ws = reg.weights(head["weights"])
                old_layout = layout_for(task_row["kind"], read_headers(old_ws.tensor_files(), old_ws.weight_map).shapes)
                if old_layout != layout:
                    raise InvalidInputError(f"task {task!r} has a different unit layout than {into}@v{head['number']} "
                                            "(other modules, ranks or tensors); it must be trained from the same running model")
                p_old = read_profile(reg.blobs.open_verified(head["profile"]), layout)
                if params.method == "kif":
                    c_new, c_old = rules.kif_static(p_old, normalise(p_new), top=params.top,
                                                    both=params.weights[:2], neither=params.weights[2])
                else:
                    c_new, c_old = rules.kif_adaptive(p_old, normalise(p_new), tau=params.tau)
                single, index = ("adapter_model.safetensors", None) if task_row["kind"] == "lora" else \
                    ("model.safetensors", "model.safetensors.index.json")
                writer = ShardWriter(staging, single, index, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
                t0 = time.perf_counter()
                fuse_streaming(LazyTensorReader(old_ws.files, old_ws.weight_map),
                               LazyTensorReader(new_ws.files, new_ws.weight_map), layout, c_new, c_old, writer,
                               _advance(progress, f"fusing {task} into {into}", len(layout.slots)))
                files, weight_map = writer.finish()
                timings["fuse_s"] = round(time.perf_counter() - t0, 4)
                for side in set(new_ws.files) - set(new_ws.weight_map.values()) - set(files):
                    files[side] = new_ws.files[side]  # adapter_config.json / config.json travel along
                weights_sha = reg.put_weights(files, weight_map, move=True)
                version_method, recorded = params.method, params.recorded()
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
               "method": version_method, "params": recorded, "weights": weights_sha, "profile": profile_sha,
               "adapter_config": task_row["adapter_config"] if head is None else head["adapter_config"],
               "metrics": None, "timings": timings, "created": _now()}
        with reg.catalog.transaction():
            if line_row is None and reg.catalog.find("lines", into) is None:
                reg.catalog.insert("lines", {"name": into, "base": task_row["base"], "kind": task_row["kind"], "created": _now()})
                reg.catalog.event("line.create", into, {"base": task_row["base"], "kind": task_row["kind"]})
            current = reg.catalog.head(into)
            if (current["number"] if current else 0) != number - 1:
                raise ConflictError(f"line {into!r} moved to v{current['number']} while fusing; run the fuse again")
            reg.catalog.insert("versions", row)
            reg.catalog.event("fuse", f"{into}@v{number}", {"task": task, "method": version_method, "params": recorded})
        return _public_version(row, task_row["kind"])


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
            hashes = exporter.write_model_card(staging, line=line, version={**version, "kind": line_row["kind"]},
                                               base=base_row, lineage=lineage, merged=merged)
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
            return {"type": "version", **_public_version(version, kind), "weights": version["weights"],
                    "profile_blob": version["profile"]}
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


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
