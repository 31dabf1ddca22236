"""Operating a line's versions: aliases (`LINE@champion`), rollback, and the line's event log."""

from __future__ import annotations

import os
from typing import Any

from kifmerge.errors import UsageError
from kifmerge.services.common import check_alias_name, check_name, now, opened, parse_ref, resolve_version


def _public_alias(row: dict[str, Any]) -> dict[str, Any]:
    return {"alias": f"{row['line']}@{row['name']}", "line": row["line"], "name": row["name"],
            "version": f"{row['line']}@v{row['number']}", "number": row["number"], "updated": row["updated"]}


def alias_set(ref: str, name: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Point LINE@NAME at the version REF names (`LINE`, `LINE@vN` or another alias), creating
    or moving it in one transaction; a move is one `alias.set` event with `from` and `to`.
    Setting it where it already points changes nothing (`changed: false`)."""
    check_alias_name(name)
    with opened(registry) as reg:
        with reg.catalog.transaction():
            line, version = resolve_version(reg, ref)
            previous = reg.catalog.set_alias(line, name, version["number"])
        row = reg.catalog.get("aliases", (line, name), "alias")
        return {**_public_alias(row), "previous": f"v{previous}" if previous is not None else None,
                "changed": previous != version["number"]}


def alias_rm(ref: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Remove the alias LINE@NAME (the version it pointed at is untouched)."""
    line, name = parse_ref(ref)
    if not isinstance(name, str):
        raise UsageError(f"write the alias to remove as LINE@NAME (e.g. {line}@champion), got {ref!r}")
    with opened(registry) as reg:
        reg.catalog.get("lines", line, "line")
        with reg.catalog.transaction():
            number = reg.catalog.remove_alias(line, name)
        return {"alias": f"{line}@{name}", "line": line, "name": name, "removed": True,
                "version": f"{line}@v{number}", "number": number}


def alias_list(line: str | None = None, *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every alias (of one line, or of all lines), by line and name."""
    with opened(registry) as reg:
        if line is not None:
            reg.catalog.get("lines", line, "line")
        return [_public_alias(row) for row in reg.catalog.aliases(line)]


def line_events(line: str, *, registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The line's audit log, oldest first: creation, fuses, rollbacks, alias moves
    (`alias.set` / `alias.rm` with `from` and `to` version numbers), evaluations, exports."""
    with opened(registry) as reg:
        reg.catalog.get("lines", line, "line")
        return [{"id": row["id"], "ts": row["ts"], "action": row["action"], "subject": row["subject"],
                 "details": row["payload"] or {}} for row in reg.catalog.line_events(line)]


def rollback(line: str, to: str, *, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Make the version `to` names (`vN`, an alias, or `LINE@…`) the head of LINE again as a NEW
    version: same weights and accumulated-profile blobs, method `rollback`, params
    `{"to": N}`, parent the previous head; the next fuse continues from it. History is never
    rewritten. Refused (exit 2) when the head already is that version or holds exactly its
    weights and profile. The head is read and the version committed in one write
    transaction (the same `commit_version` as fuse), so concurrent writers keep numbers gapless."""
    from kifmerge.services.fusing import StagedVersion, commit_version

    check_name(line, "line")
    ref = to if "@" in to else f"{line}@{to}"
    if parse_ref(ref)[0] != line:
        raise UsageError(f"--to {to!r} names a version of another line; roll back {line!r} to one of its own versions")
    with opened(registry) as reg:
        line_row = reg.catalog.get("lines", line, "line")
        with reg.catalog.transaction():
            _, target = resolve_version(reg, ref)
            head = reg.catalog.head(line)
            if target["number"] == head["number"]:
                raise UsageError(f"{line}@v{target['number']} is already the head of line {line!r}; nothing to roll back")
            if (head["weights"], head["profile"]) == (target["weights"], target["profile"]):
                raise UsageError(f"the head {line}@v{head['number']} already holds the weights and profile of "
                                 f"{line}@v{target['number']}; nothing to roll back")
            row = {"line": line, "number": head["number"] + 1, "parent": head["number"], "task": None,
                   "method": "rollback", "params": {"to": target["number"]}, "weights": target["weights"],
                   "profile": target["profile"], "adapter_config": target["adapter_config"], "metrics": None,
                   "timings": {}, "created": now()}
            staged = StagedVersion(row, line_row["base"], line_row["kind"])
            commit_version(reg, staged)
        return {**staged.public(), "to": f"{line}@v{target['number']}"}
