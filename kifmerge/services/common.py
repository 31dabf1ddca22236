"""Shared by the services: registry opening, names and references, the base folder, and the
shape of the public result dicts."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from typing import TYPE_CHECKING

from kifmerge.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, UsageError
from kifmerge.limits import MAX_VERSION
from kifmerge.registry import Registry
from kifmerge.registry.catalog import held_tasks

if TYPE_CHECKING:
    from kifmerge.options import FuseParams

# progress(description, total) → advance(n=1, *, loss=None) (loss: training steps; an advance
# without the keyword gets advance(n)); None means silent
Progress = Callable[[str, int], Callable[[int], None]] | None
# Names (bases, tasks, lines, aliases, data labels) are ASCII identifiers, matched whole
# (`fullmatch`: no trailing newline slips through as `$` would let it); version numbers are ASCII
# digits. Non-ASCII letters and digits, whitespace and control characters are refused, so a name
# is exactly what it looks like.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", re.ASCII)
REF_PATTERN = re.compile(r"(?P<line>[^@]+)(@(?P<selector>[^@]+))?", re.ASCII)
VERSION_PATTERN = re.compile(r"[vV](?P<number>[0-9]+)", re.ASCII)
PROFILE_EXPORT_NAME = "kifmerge-profile.safetensors"  # the line's accumulated profile, re-importable
LORA_COMPAT_KEYS = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


def start_progress(progress: Progress, description: str, total: int) -> Callable[[int], None] | None:
    return progress(description, total) if progress else None


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"invalid {what} name {name!r}: use ASCII letters, digits, '.', '_' or '-' (max 100), starting "
                         "with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """`LINE@vN` → (LINE, N); `LINE@NAME` → (LINE, "NAME"), an alias; `LINE` → (LINE, None),
    the newest version. Only the syntax is checked here; `resolve_version` looks it up."""
    match = REF_PATTERN.fullmatch(ref) if isinstance(ref, str) else None
    selector = match.group("selector") if match else None
    if (not match or not NAME_PATTERN.fullmatch(match.group("line"))
            or (selector is not None and not (VERSION_PATTERN.fullmatch(selector) or NAME_PATTERN.fullmatch(selector)))):
        raise UsageError(f"invalid version reference {ref!r}: write LINE, LINE@vN or LINE@ALIAS (e.g. support@v3, support@champion)")
    if selector is None:
        return match.group("line"), None
    number = VERSION_PATTERN.fullmatch(selector)
    if number and int(number.group("number")) > MAX_VERSION:
        raise UsageError(f"invalid version reference {ref!r}: version numbers end at {MAX_VERSION}")
    return match.group("line"), int(number.group("number")) if number else selector


def check_alias_name(name: str) -> str:
    """Alias names follow the other names' rules and must not look like a version (`v12`)."""
    check_name(name, "alias")
    if VERSION_PATTERN.fullmatch(name):
        raise UsageError(f"invalid alias name {name!r}: it looks like a version number; choose a word such as 'champion'")
    return name


@contextmanager
def opened(root: str | os.PathLike | None) -> Iterator[Registry]:
    registry = Registry.open(root)
    try:
        yield registry
    finally:
        registry.close()


def fuse_params(**values: Any) -> FuseParams:
    """FuseParams from keyword arguments named as its fields (None: the default), or one-line UsageError."""
    from kifmerge.options import FuseParams, validated  # pydantic: not for the commands that only read the catalog

    return validated(FuseParams, "fuse", values)


def open_base(reg: Registry, base: dict[str, Any]):
    """The base's model folder, opened (config + tensor headers) and checked against its
    fingerprint; a copied base is materialised from its blobs under `cache/` when the original
    folder is gone or changed."""
    from kifmerge.checkpoints import open_model

    path = Path(base["path"])
    changed = None
    if path.is_dir():
        try:
            model = open_model(path)
            if model.fingerprint == base["fingerprint"]:
                changed = changed_weight_file(base, model)
                if changed is None:
                    return model
        except (NotFoundError, InvalidInputError):
            pass
    if not base.get("weights"):
        if changed:
            raise IntegrityError(f"base {base['name']}: {changed} in {path} since it was registered; restore it, or "
                                 "register the changed model as another base")
        raise IntegrityError(f"base {base['name']}: folder {path} is missing or changed since it was registered "
                             "(re-register it, or register with --copy to keep a copy in the registry)")
    cache = reg.root / "cache" / "bases" / f"{base['name']}-{base['fingerprint'][:16]}"
    if not cache.is_dir():
        staging = reg.blobs.staging_dir()
        reg.copy_weights(base["weights"], staging)
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, cache)
    return open_model(cache)


def weight_file_digests(model) -> dict[str, dict[str, Any]]:
    """Each weight file of an opened model as registered: size, mtime and sha256 (streamed)."""
    from kifmerge.registry.blobs import sha256_file

    digests = {}
    for name, file in sorted(model.tensors.files.items()):
        info = os.stat(file)
        digests[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256_file(Path(file))}
    return digests


def changed_weight_file(base: dict[str, Any], model, *, deep: bool = False) -> str | None:
    """What changed in the base's weight files since `base add` recorded them ("model.safetensors changed"),
    or None. A file whose size and mtime are as recorded is taken as unchanged unless `deep`; any other is
    hashed. Bases registered before the files were recorded are not checked."""
    from kifmerge.registry.blobs import sha256_file, sha256_input

    for name, recorded in sorted((base.get("files") or {}).items()):
        file = model.tensors.files.get(name)
        if file is None or not Path(file).is_file():
            return f"weight file {name} is gone"
        info = os.stat(file)
        if not deep and (info.st_size, info.st_mtime_ns) == (recorded["size"], recorded["mtime_ns"]):
            continue
        if info.st_size != recorded["size"] or (sha256_file if deep else sha256_input)(Path(file)) != recorded["sha256"]:
            return f"weight file {name} changed"
    return None


def base_dir(reg: Registry, base: dict[str, Any]) -> Path:
    return open_base(reg, base).path


def resolve_version(reg: Registry, ref: str) -> tuple[str, dict[str, Any]]:
    """The version row a reference names: `LINE` (newest), `LINE@vN` or `LINE@ALIAS`."""
    line, selector = parse_ref(ref)
    reg.catalog.get("lines", line, "line")
    if selector is None:
        head = reg.catalog.head(line)
        if head is None:
            raise NotFoundError(f"line {line!r} has no versions yet; fuse a task into it first")
        return line, head
    if isinstance(selector, str):
        alias = reg.catalog.find("aliases", (line, selector))
        if alias is None:
            known = ", ".join(row["name"] for row in reg.catalog.aliases(line)) or "none"
            raise NotFoundError(f"line {line!r} has no alias {selector!r} (aliases: {known}); "
                                f"set one with `kifmerge alias set {line}@vN {selector}`")
        selector = alias["number"]
    return line, reg.catalog.version(line, selector)


def now() -> str:
    from kifmerge.registry.catalog import now

    return now()


def public_base(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "path", "architecture", "model_type", "fingerprint", "created")} | {
        "copied": bool(row.get("weights")), "hub_id": row.get("hub_id"), "revision": row.get("revision"),
        "weights_recorded": bool(row.get("files"))}


# the columns public_task and public_version read: listing them skips decoding the others
TASK_COLUMNS = ["name", "base", "kind", "trained_from", "data_fingerprint", "source", "created"]
VERSION_COLUMNS = ["line", "number", "parent", "task", "method", "params", "timings", "created"]


def public_task(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in TASK_COLUMNS}


def refuse_task_named_like_a_new_line(reg: Registry, line: str, also: str | None = None) -> None:
    """A new line may not take a task's name (`also`: the task about to be registered): `show`, `profile
    show` and `history` would read the task, not the line."""
    if line == also or reg.catalog.find("tasks", line):
        raise ConflictError(f"{line!r} is a task's name; choose another name for the new line")


def public_line(reg: Registry, row: dict[str, Any], versions: list[dict[str, Any]] | None = None,
                aliases: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A line with its head, the tasks the head holds, and aliases; `versions` (number, parent, task, method
    and params, in order) and
    `aliases` are the line's rows when the caller has read them for many lines at once."""
    if versions is None:
        versions = reg.catalog.rows("versions", "line = ?", [row["name"]], order_by="number",
                                    columns=["number", "parent", "task", "method", "params"])
    if aliases is None:
        aliases = reg.catalog.aliases(row["name"])
    head = versions[-1] if versions else None
    return {"name": row["name"], "base": row["base"], "kind": row["kind"], "head": f"v{head['number']}" if head else None,
            "tasks": held_tasks(versions),
            "aliases": {a["name"]: f"v{a['number']}" for a in aliases}, "created": row["created"]}


def public_version(row: dict[str, Any], kind: str, aliases: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    return {"version": f"{row['line']}@v{row['number']}", "line": row["line"], "number": row["number"],
            "parent": f"v{row['parent']}" if row["parent"] else None, "task": row["task"], "kind": kind,
            "method": row["method"], "params": row["params"], "timings": row["timings"], "created": row["created"],
            "aliases": sorted(aliases)}
