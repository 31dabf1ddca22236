"""Registry-wide services: init, bases, inspection queries, verify and gc."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from kifmerge.errors import ConflictError, IntegrityError, NotFoundError, UsageError
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_file
from kifmerge.services.common import (
    Progress,
    check_name,
    now,
    opened,
    public_base,
    public_line,
    public_task,
    public_version,
    resolve_version,
    start_progress,
)


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
            advance = start_progress(progress, "copying base", 1)
            weights = reg.put_weights(files, model.tensors.weight_map)
            if advance:
                advance(1)
        row = {"name": name, "path": str(model.path), "architecture": model.architecture,
               "model_type": model.model_type, "fingerprint": model.fingerprint, "config": model.config,
               "weights": weights, "created": now()}
        with reg.catalog.transaction():
            reg.catalog.insert("bases", row)
            reg.catalog.event("base.add", name, {"path": row["path"], "copied": copy})
        return public_base(row)


def list_items(what: str = "tasks", *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    tables = {"tasks": "tasks", "lines": "lines", "versions": "versions", "bases": "bases"}
    if what not in tables:
        raise UsageError(f"cannot list {what!r}: choose one of {', '.join(tables)}")
    with opened(registry) as reg:
        if what == "tasks":
            profiled = {r["task"] for r in reg.catalog.rows("profiles")}
            return [{**public_task(r), "profile": r["name"] in profiled} for r in reg.catalog.rows("tasks", order_by="created")]
        if what == "lines":
            return [public_line(reg, r) for r in reg.catalog.rows("lines", order_by="name")]
        if what == "bases":
            return [public_base(r) for r in reg.catalog.rows("bases", order_by="name")]
        kinds = {r["name"]: r["kind"] for r in reg.catalog.rows("lines")}
        return [public_version(r, kinds[r["line"]]) for r in reg.catalog.rows("versions", order_by="line, number")]


def show(ref: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """A task (`TASK`), a line and its head (`LINE`), or one version (`LINE@vN`)."""
    with opened(registry) as reg:
        if "@" in ref:
            line, version = resolve_version(reg, ref)
            kind = reg.catalog.get("lines", line, "line")["kind"]
            evaluations = {row["label"]: {**row["metrics"], "settings": row["settings"]} for row in reg.catalog.rows(
                "evaluations", "line = ? and number = ?", [line, version["number"]], order_by="id")}
            return {"type": "version", **public_version(version, kind), "weights": version["weights"],
                    "profile_blob": version["profile"], "evaluations": evaluations}
        task = reg.catalog.find("tasks", ref)
        if task:
            profile = reg.catalog.find("profiles", ref)
            fused = [f"{v['line']}@v{v['number']}" for v in reg.catalog.rows("versions", "task = ?", [ref])]
            return {"type": "task", **public_task(task), "weights": task["weights"], "adapter_config": task["adapter_config"],
                    "training_config": task["training_config"], "metrics": task["metrics"],
                    "profile": {k: profile[k] for k in ("unit", "estimator", "scores", "layout")} if profile else None,
                    "fused_into": fused}
        line = reg.catalog.find("lines", ref)
        if line:
            return {"type": "line", **public_line(reg, line)}
        raise NotFoundError(f"no task or line named {ref!r}; see `kifmerge list tasks` / `kifmerge list lines`")


def history(line: str, *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    with opened(registry) as reg:
        row = reg.catalog.get("lines", line, "line")
        return [public_version(v, row["kind"]) for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number")]


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
        advance = start_progress(progress, "verifying blobs", len(refs))
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
