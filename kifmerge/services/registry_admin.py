"""Registry-wide services: init, bases, inspection queries, verify and gc."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from kifmerge.errors import ConflictError, IntegrityError, NotFoundError, UsageError
from kifmerge.faults import fault_point
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_file
from kifmerge.services.common import (
    TASK_COLUMNS,
    VERSION_COLUMNS,
    Progress,
    changed_weight_file,
    check_name,
    now,
    opened,
    public_base,
    public_line,
    public_task,
    public_version,
    resolve_version,
    start_progress,
    weight_file_digests,
)


def init(registry: str | os.PathLike | None = None, *, force: bool = False) -> dict[str, Any]:
    """Create the registry, or upgrade its schema. A non-empty folder that is not a registry is
    refused (exit 4) unless `force`."""
    reg, created = Registry.init(registry, force=force)
    try:
        return {"registry": str(reg.root.resolve()), "created": created}
    finally:
        reg.close()


def add_base(name: str, model_dir: str | Path, *, copy: bool = False, allow_pickle: bool = False,
             revision: str | None = None, registry: str | os.PathLike | None = None,
             progress: Progress = None) -> dict[str, Any]:
    """Record a local HF model folder (architecture, fingerprint, path); `copy` also stores its files.
    `model_dir` may be a hub id (`org/name`, when no such local path exists): resolved with
    `snapshot_download` (the local cache; `HF_HUB_OFFLINE` honoured) at `revision`, and the id and
    commit are recorded. `allow_pickle` converts `*.bin` weights (loaded with
    `torch.load(weights_only=True)`) to safetensors and stores the converted copy (pickle weights imply `copy`)."""
    from kifmerge.checkpoints import open_model, pickle_files
    from kifmerge.hub import looks_like_hub_id

    check_name(name, "base")
    with opened(registry) as reg:
        if reg.catalog.find("bases", name):
            raise ConflictError(f"base {name!r} already exists; choose another name")
        hub = None
        if looks_like_hub_id(str(model_dir)):
            from kifmerge.hub import resolve

            model_dir, hub = resolve(str(model_dir), revision)
        elif revision:
            raise UsageError("--revision applies to hub ids (org/name) only, not to a local folder")
        if Path(model_dir).is_file():
            raise UsageError(f"{model_dir} is a file; give the model's folder (the one holding config.json)")
        if not Path(model_dir).is_dir():
            raise NotFoundError(f"model folder not found: {model_dir}")
        scratch = reg.blobs.staging_dir() if allow_pickle and pickle_files(Path(model_dir)) else None
        try:
            return _add_base(reg, name, model_dir, open_model(model_dir, allow_pickle=allow_pickle, scratch=scratch),
                             copy or scratch is not None, progress, hub)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def _add_base(reg: Registry, name: str, model_dir: str | Path, model, copy: bool, progress: Progress,
              hub: dict[str, str] | None = None) -> dict[str, Any]:
    """Store the opened base (its files too when `copy`) and commit its row."""
    from kifmerge.checkpoints import check_finite

    check_finite(model.tensors, start_progress(progress, "checking weights", len(model.tensors.shapes)))
    # the folder read later is the one registered: its weight files are recorded to notice changes in place
    # (a pickle base read through a converted copy has none to record; the copy in the registry is the base)
    digests = weight_file_digests(model) if model.path == Path(model_dir).resolve() else None
    weights = None
    if copy:
        files = {p.name: p for p in sorted(model.path.iterdir()) if p.is_file()}
        advance = start_progress(progress, "copying base", 1)
        weights = reg.put_weights(files, model.tensors.weight_map)
        if advance:
            advance(1)
    row = {"name": name, "path": str(Path(model_dir).resolve()), "architecture": model.architecture,
           "model_type": model.model_type, "fingerprint": model.fingerprint, "config": model.config,
           "weights": weights, "files": digests, "created": now(), **(hub or {})}
    with reg.catalog.transaction():
        reg.catalog.insert("bases", row)
        reg.catalog.event("base.add", name, {"path": row["path"], "copied": copy, **(hub or {})})
    return public_base(row)


def list_items(what: str = "tasks", *, limit: int | None = None,
               registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every task (oldest first), line, version (by line and number) or base (by name);
    `limit`: only the last `limit` of them (tasks: the newest), still in that order."""
    tables = {"tasks": "tasks", "lines": "lines", "versions": "versions", "bases": "bases"}
    if what not in tables:
        raise UsageError(f"cannot list {what!r}: choose one of {', '.join(tables)}")
    last = limit or None
    with opened(registry) as reg:  # a few queries whatever the number of rows; only the columns shown are decoded
        if what == "tasks":  # public_task's keys and `profile`
            return reg.catalog.task_summaries(TASK_COLUMNS, last=last)
        if what == "lines":
            versions: dict[str, list[dict[str, Any]]] = {}
            for row in reg.catalog.rows("versions", order_by="line, number", columns=["line", "number", "parent", "task", "method", "params"]):
                versions.setdefault(row["line"], []).append(row)
            aliases: dict[str, list[dict[str, Any]]] = {}
            for row in reg.catalog.aliases():
                aliases.setdefault(row["line"], []).append(row)
            return [public_line(reg, r, versions.get(r["name"], []), aliases.get(r["name"], []))
                    for r in reg.catalog.last_rows("lines", ["name"], last)]
        if what == "bases":
            return [public_base(r) for r in reg.catalog.last_rows("bases", ["name"], last)]
        kinds = {r["name"]: r["kind"] for r in reg.catalog.rows("lines", columns=["name", "kind"])}
        alias_map = reg.catalog.alias_map()
        return [public_version(r, kinds[r["line"]], alias_map.get((r["line"], r["number"]), ()))
                for r in reg.catalog.last_rows("versions", ["line", "number"], last, columns=VERSION_COLUMNS)]


def show(ref: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """A task (`TASK`), a line and its head (`LINE`), or one version (`LINE@vN`, `LINE@ALIAS`)."""
    with opened(registry) as reg:
        if "@" in ref:
            line, version = resolve_version(reg, ref)
            kind = reg.catalog.get("lines", line, "line")["kind"]
            evaluations = {row["label"]: {**row["metrics"], "settings": row["settings"]} for row in reg.catalog.rows(
                "evaluations", "line = ? and number = ?", [line, version["number"]], order_by="id")}
            aliases = reg.catalog.alias_map(line).get((line, version["number"]), ())
            return {"type": "version", **public_version(version, kind, aliases), "weights": version["weights"],
                    "profile_blob": version["profile"], "evaluations": evaluations}
        task = reg.catalog.find("tasks", ref)
        if task:
            profile = reg.catalog.find("profiles", ref)
            fused = [f"{v['line']}@v{v['number']}" for v in reg.catalog.rows("versions", "task = ?", [ref], columns=["line", "number"])]
            return {"type": "task", **public_task(task), "weights": task["weights"], "adapter_config": task["adapter_config"],
                    "training_config": task["training_config"], "metrics": task["metrics"],
                    "validation": task.get("validation"),
                    "profile": {k: profile[k] for k in ("unit", "estimator", "scores", "layout")} if profile else None,
                    "fused_into": fused}
        line = reg.catalog.find("lines", ref)
        if line:
            return {"type": "line", **public_line(reg, line)}
        raise NotFoundError(f"no task or line named {ref!r}; see `kifmerge list tasks` / `kifmerge list lines`")


def history(line: str, *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    with opened(registry) as reg:
        row = reg.catalog.get("lines", line, "line")
        aliases = reg.catalog.alias_map(line)
        return [public_version(v, row["kind"], aliases.get((line, v["number"]), ()))
                for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number", columns=VERSION_COLUMNS)]


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


def verify(*, deep: bool = False, registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Check every blob the catalog references: present and unchanged since stored (the blob
    store's own check). `deep` re-hashes every blob with sha256 whatever its file looks like,
    and checks each stored profile against the unit layout of the weights it scores."""
    with opened(registry) as reg:
        refs = _referenced_blobs(reg, tolerant=True)
        problems: list[dict[str, Any]] = []
        advance = start_progress(progress, "verifying blobs", len(refs))
        for sha, owners in sorted(refs.items()):
            problem = _blob_problem(reg, sha, deep)
            if problem:
                problems.append({"blob": sha, "problem": problem, "needed_by": sorted(set(owners))})
            if advance:
                advance(1)
        checked = 0
        if deep:
            damaged = {p["blob"] for p in problems}
            for profile_sha, weights_sha, kind, owner in _profiled_weights(reg):
                if profile_sha in damaged or weights_sha in damaged:
                    continue  # already reported; its layout cannot be read reliably
                checked += 1
                problem = _layout_problem(reg, profile_sha, weights_sha, kind, damaged)
                if problem:
                    problems.append({"blob": profile_sha, "problem": problem, "needed_by": [owner]})
        bases = _base_problems(reg, deep)
        report = {"registry": str(reg.root.resolve()), "blobs_checked": len(refs), "deep": deep,
                  "profiles_checked": checked, "bases_checked": bases["checked"], "problems": problems,
                  "base_problems": bases["problems"], "ok": not problems and not bases["problems"]}
        if bases["problems"] and not problems:
            first = bases["problems"][0]
            raise IntegrityError(f"base {first['base']}: {first['problem']} in {first['path']} since it was registered; "
                                 "restore it, or register the changed model as another base", details=report)
        if problems:
            first = problems[0]
            raise IntegrityError(f"{len(problems)} blob(s) missing, corrupt or inconsistent, e.g. {first['blob'][:12]} "
                                 f"({first['problem']}) needed by {first['needed_by'][0]}; restore them from a copy of "
                                 "the registry", details=report)
        return report


def _base_problems(reg: Registry, deep: bool) -> dict[str, Any]:
    """Bases read from their folder (not copied into the registry) whose weight files changed since `base add`
    recorded them (`deep`: every file re-hashed); bases recorded before that are not checked."""
    from kifmerge.checkpoints import open_model
    from kifmerge.errors import InvalidInputError, NotFoundError

    checked, problems = 0, []
    for base in reg.catalog.rows("bases", order_by="name"):
        if not base.get("files") or base.get("weights"):
            continue  # nothing recorded, or a copy in the registry that the blob checks cover
        checked += 1
        try:
            problem = changed_weight_file(base, open_model(base["path"]), deep=deep)
        except (NotFoundError, InvalidInputError) as exc:
            problem = f"folder unreadable ({exc})"
        if problem:
            problems.append({"base": base["name"], "path": base["path"], "problem": problem})
    return {"checked": checked, "problems": problems}


def _blob_problem(reg: Registry, sha: str, deep: bool) -> str | None:
    path = reg.blobs.path_of(sha)
    if not path.is_file():
        return "missing"
    try:
        if deep:
            return None if sha256_file(path) == sha else "corrupt"
        reg.blobs.open_verified(sha)
    except IntegrityError:
        return "corrupt"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


def _profiled_weights(reg: Registry) -> list[tuple[str, str, str, str]]:
    """(profile blob, weights manifest, kind, owning row) for every task profile and version."""
    kinds = {row["name"]: row["kind"] for row in reg.catalog.rows("tasks")}
    pairs = [(row["scores"], reg.catalog.get("tasks", row["task"], "task")["weights"], kinds[row["task"]],
              f"profiles:{row['task']}.scores") for row in reg.catalog.rows("profiles", order_by="task")]
    lines = {row["name"]: row["kind"] for row in reg.catalog.rows("lines")}
    pairs += [(row["profile"], row["weights"], lines[row["line"]], f"versions:{row['id']}.profile")
              for row in reg.catalog.rows("versions", order_by="id")]
    return pairs


def _layout_problem(reg: Registry, profile_sha: str, weights_sha: str, kind: str, damaged: set[str]) -> str | None:
    """Why a stored profile does not fit the unit layout of its weights (None when it does)."""
    from kifmerge.checkpoints import read_headers
    from kifmerge.errors import KifError
    from kifmerge.profiles import read_profile
    from kifmerge.units import layout_for

    try:
        manifest = reg.manifest(weights_sha)
        used = set(manifest["weight_map"].values())
        files = {name: reg.blobs.path_of(blob) for name, blob in manifest["files"].items() if name in used}
        if any(manifest["files"][name] in damaged for name in files):
            return None  # the weights themselves are already reported
        read_profile(reg.blobs.path_of(profile_sha), layout_for(kind, read_headers(files).shapes))
    except (KifError, KeyError, TypeError, ValueError, OSError) as exc:
        return f"profile does not match the unit layout of its weights: {str(exc).replace(str(reg.blobs.blobs), 'blobs')}"
    return None


# the only names gc deletes: content hashes under blobs/ (blobs/ab/cdef…, 64 hex digits in all) and
# kifmerge's own staging names under tmp/ (work-PID-…, blob-PID-… from tempfile: the prefix, then
# letters, digits, '_' and '-' only; resume-KEY)
BLOB_DIR_NAME = re.compile(r"[0-9a-f]{2}\Z")
BLOB_FILE_NAME = re.compile(r"[0-9a-f]{62}\Z")
STAGING_NAME = re.compile(r"(?:work|blob)-[A-Za-z0-9_-]+\Z|resume-[0-9a-f]{20}\Z")


def gc(*, dry_run: bool = False, grace_s: float = 3600.0, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Delete blobs no row references and staging leftovers (`tmp/`: files and build folders of
    killed commands), older than `grace_s` (so a command that has stored blobs but not yet
    committed its rows keeps them). A folder's age is that of the newest file in it. Only names
    kifmerge writes are candidates (a file it did not write is never deleted, even in a folder
    that was not empty when `init --force` made a registry of it); `kept_foreign` counts the others."""
    if not (grace_s >= 0 and math.isfinite(grace_s)):
        raise UsageError(f"--grace must be a finite number of seconds >= 0, got {grace_s}")
    with opened(registry) as reg:
        needed = set(_referenced_blobs(reg))
        cutoff = time.time() - grace_s
        removed, freed = [], 0
        candidates, foreign = _own_files(reg)
        candidates = [path for path in candidates if path.parent.name + path.name not in needed or path.parent == reg.blobs.staging]
        for path in sorted(candidates):
            if _newest_mtime(path) > cutoff:
                continue
            size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            removed.append(str(path.relative_to(reg.root)))
            freed += size
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                if path.parent.parent == reg.blobs.blobs:  # a blob: its stamp goes with it
                    (reg.blobs.stamps / path.parent.name / path.name).unlink(missing_ok=True)
                fault_point("gc.removed")
        if removed and not dry_run:
            fault_point("gc.before-event")
            with reg.catalog.transaction():
                reg.catalog.event("gc", str(reg.root), {"removed": len(removed), "bytes": freed})
        return {"removed": removed, "bytes_freed": freed, "dry_run": dry_run, "kept_blobs": len(needed),
                "kept_foreign": foreign}


def _own_files(reg: Registry) -> tuple[list[Path], int]:
    """The blob files and staging entries whose names kifmerge writes (symbolic links never:
    they point elsewhere), and how many other entries `blobs/` and `tmp/` hold."""
    own, foreign = [], 0
    if reg.blobs.blobs.is_dir() and not reg.blobs.blobs.is_symlink():
        for folder in reg.blobs.blobs.iterdir():
            if not (BLOB_DIR_NAME.match(folder.name) and folder.is_dir() and not folder.is_symlink()):
                foreign += 1
                continue
            for path in folder.iterdir():
                if BLOB_FILE_NAME.match(path.name) and path.is_file() and not path.is_symlink():
                    own.append(path)
                else:
                    foreign += 1
    if reg.blobs.staging.is_dir() and not reg.blobs.staging.is_symlink():
        for path in reg.blobs.staging.iterdir():
            if STAGING_NAME.match(path.name) and not path.is_symlink():
                own.append(path)
            else:
                foreign += 1
    return own, foreign


def _newest_mtime(path: Path) -> float:
    """A staging folder is in use while anything in it is recent (a long training writes deep
    inside it, not to the folder itself)."""
    newest = path.lstat().st_mtime
    if path.is_dir():
        for inner in path.rglob("*"):
            try:
                newest = max(newest, inner.lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest
