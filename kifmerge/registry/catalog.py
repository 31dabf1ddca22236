"""The catalog: SQLite through sqlite-utils. The only module that talks SQL.

Rows reference blobs by sha256. Every change that writes several rows runs in one
transaction (`Catalog.transaction`), and appends its own row to `events`, so a crash
leaves either the whole change or none of it.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils
from sqlite_utils.migrations import Migrations

from kifmerge.errors import ConflictError, NotFoundError
from kifmerge.faults import fault_point

DB_NAME = "kifmerge.db"
BUSY_TIMEOUT_MS = 30_000
LOCK_ATTEMPTS = 12  # on top of the busy timeout: for the SQLITE_BUSY cases that skip it
JSON_COLUMNS = {"config", "params", "metrics", "timings", "training_config", "adapter_config", "payload", "layout", "settings"}

migrations = Migrations("kifmerge")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["bases"].create(
        {"name": str, "path": str, "architecture": str, "model_type": str, "fingerprint": str,
         "config": str, "weights": str, "created": str},
        pk="name", not_null={"path", "architecture", "fingerprint", "created"},
    )
    db["tasks"].create(
        {"name": str, "base": str, "kind": str, "weights": str, "adapter_config": str,
         "training_config": str, "data_fingerprint": str, "metrics": str, "trained_from": str,
         "source": str, "created": str},
        pk="name", foreign_keys=[("base", "bases", "name")],
        not_null={"base", "kind", "weights", "created"},
    )
    db["profiles"].create(
        {"task": str, "unit": str, "estimator": str, "scores": str, "layout": str, "created": str},
        pk="task", foreign_keys=[("task", "tasks", "name")], not_null={"unit", "scores", "created"},
    )
    db["lines"].create(
        {"name": str, "base": str, "kind": str, "created": str},
        pk="name", foreign_keys=[("base", "bases", "name")], not_null={"base", "created"},
    )
    db["versions"].create(
        {"id": int, "line": str, "number": int, "parent": int, "task": str, "method": str,
         "params": str, "weights": str, "profile": str, "adapter_config": str, "metrics": str,
         "timings": str, "created": str},
        pk="id", foreign_keys=[("line", "lines", "name"), ("task", "tasks", "name")],
        not_null={"line", "number", "method", "weights", "profile", "created"},
    )
    db["versions"].create_index(["line", "number"], unique=True)
    db["events"].create(
        {"id": int, "ts": str, "action": str, "subject": str, "payload": str},
        pk="id", not_null={"ts", "action", "subject"},
    )


@migrations()
def m002_evaluations(db: sqlite_utils.Database) -> None:
    """Scores of a version (number 0: the line's base) on one labelled data file. `subject` is
    what was evaluated (a weights manifest sha, or `base:<fingerprint>`), so identical weights
    reuse each other's results."""
    db["evaluations"].create(
        {"id": int, "line": str, "number": int, "label": str, "subject": str, "data_fingerprint": str,
         "settings": str, "metrics": str, "predictions": str, "created": str},
        pk="id", not_null={"line", "number", "label", "subject", "data_fingerprint", "settings", "metrics", "created"},
    )
    db["evaluations"].create_index(["subject", "data_fingerprint", "settings"])
    db["evaluations"].create_index(["line", "number"])


@migrations()
def m003_aliases(db: sqlite_utils.Database) -> None:
    """Named pointers to versions of a line (`support@champion`); moved in place, every move
    logged in `events` (`alias.set` / `alias.rm`)."""
    db["aliases"].create(
        {"line": str, "name": str, "number": int, "updated": str},
        pk=("line", "name"), foreign_keys=[("line", "lines", "name")], not_null={"number", "updated"},
    )



@migrations()
def m004_base_hub(db: sqlite_utils.Database) -> None:
    """A base registered from a Hugging Face Hub id: the id and the commit its snapshot is."""
    db["bases"].add_column("hub_id", str)
    db["bases"].add_column("revision", str)

def _is_locked(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def retry_locked(step, what: str = "the registry database"):
    """Run `step()`, retrying "database is locked" with jittered exponential backoff. The busy
    timeout covers most waits, but SQLite returns SQLITE_BUSY at once (without waiting) while
    another connection recovers a WAL after a crash, changes the journal mode, or when waiting
    could deadlock; those must not reach the user of 16 parallel jobs."""
    delay = 0.02
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            if attempt == LOCK_ATTEMPTS:
                raise ConflictError(f"{what} stayed locked by other kifmerge processes ({exc}); run the command again") from exc
        time.sleep(random.uniform(0.5, 1.0) * delay)
        delay = min(delay * 2, 1.0)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v) for k, v in row.items()}


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v, sort_keys=True) if k in JSON_COLUMNS and v is not None else v) for k, v in row.items()}


class Catalog:
    def __init__(self, root: Path):
        self.path = Path(root) / DB_NAME
        self.db = retry_locked(self._connect)

    def _connect(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db = sqlite_utils.Database(conn)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys = ON")
            return db
        except BaseException:
            conn.close()
            raise

    @classmethod
    def create(cls, root: Path) -> "Catalog":
        catalog = cls(root)
        retry_locked(catalog.db.enable_wal)
        retry_locked(lambda: migrations.apply(catalog.db))
        return catalog

    def is_initialised(self) -> bool:
        return not retry_locked(lambda: migrations.pending(self.db))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction; taken IMMEDIATE so concurrent writers queue on the busy timeout
        instead of failing at commit; the BEGIN and the COMMIT retry "database is locked"."""
        conn = self.db.conn
        retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        fault_point("catalog.begun")
        try:
            yield self.db
            fault_point("catalog.before-commit")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            retry_locked(lambda: conn.execute("COMMIT"))
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        fault_point("catalog.committed")

    # ---- generic row access -------------------------------------------------
    def insert(self, table: str, row: dict[str, Any]) -> int:
        try:
            return self.db[table].insert(_encode(row)).last_pk
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"{table[:-1]} {row.get('name') or row.get('task') or ''!s} already exists ({exc})") from exc

    def event(self, action: str, subject: str, payload: dict[str, Any] | None = None) -> None:
        self.db["events"].insert({"ts": now(), "action": action, "subject": subject,
                                  "payload": json.dumps(payload or {}, sort_keys=True)})

    def get(self, table: str, key: Any, what: str) -> dict[str, Any]:
        try:
            return _decode(self.db[table].get(key))
        except sqlite_utils.db.NotFoundError:
            raise NotFoundError(f"{what} {key!r} not found; see `kifmerge list {table}`") from None

    def find(self, table: str, key: Any) -> dict[str, Any] | None:
        try:
            return _decode(self.db[table].get(key))
        except sqlite_utils.db.NotFoundError:
            return None

    def rows(self, table: str, where: str | None = None, args: list | None = None, order_by: str | None = None) -> list[dict[str, Any]]:
        return [_decode(r) for r in self.db[table].rows_where(where, args or [], order_by=order_by)]

    # ---- versions -----------------------------------------------------------
    def head(self, line: str) -> dict[str, Any] | None:
        found = self.rows("versions", "line = ?", [line], order_by="number desc")
        return found[0] if found else None

    def version(self, line: str, number: int) -> dict[str, Any]:
        found = self.rows("versions", "line = ? and number = ?", [line, number])
        if not found:
            raise NotFoundError(f"version {line}@v{number} not found; see `kifmerge history {line}`")
        return found[0]

    def aliases(self, line: str | None = None) -> list[dict[str, Any]]:
        where, args = ("line = ?", [line]) if line is not None else (None, [])
        return self.rows("aliases", where, args, order_by="line, name")

    def alias_map(self, line: str | None = None) -> dict[tuple[str, int], list[str]]:
        """(line, number) → the alias names pointing at that version."""
        out: dict[tuple[str, int], list[str]] = {}
        for row in self.aliases(line):
            out.setdefault((row["line"], row["number"]), []).append(row["name"])
        return out

    def set_alias(self, line: str, name: str, number: int) -> int | None:
        """Inside the caller's transaction: point LINE@NAME at version `number`; returns the
        version it pointed at before (None: a new alias). A move is logged as `alias.set`."""
        current = self.find("aliases", (line, name))
        previous = current["number"] if current else None
        if previous != number:
            self.db["aliases"].upsert({"line": line, "name": name, "number": number, "updated": now()}, pk=("line", "name"))
            self.event("alias.set", f"{line}@{name}", {"line": line, "alias": name, "from": previous, "to": number})
        return previous

    def remove_alias(self, line: str, name: str) -> int:
        """Inside the caller's transaction: delete LINE@NAME (logged as `alias.rm`); returns its version."""
        current = self.find("aliases", (line, name))
        if current is None:
            raise NotFoundError(f"line {line!r} has no alias {name!r}; see `kifmerge alias list {line}`")
        self.db["aliases"].delete((line, name))
        self.event("alias.rm", f"{line}@{name}", {"line": line, "alias": name, "from": current["number"], "to": None})
        return current["number"]

    def line_events(self, line: str) -> list[dict[str, Any]]:
        """The events about a line: its creation and everything on `LINE@…` (versions, aliases)."""
        prefix = f"{line}@"
        return self.rows("events", "subject = ? or substr(subject, 1, ?) = ?", [line, len(prefix), prefix], order_by="id")

    def find_evaluation(self, subject: str, data_fingerprint: str, settings: dict) -> dict[str, Any] | None:
        found = self.rows("evaluations", "subject = ? and data_fingerprint = ? and settings = ?",
                          [subject, data_fingerprint, json.dumps(settings, sort_keys=True)], order_by="id desc")
        return found[0] if found else None

    def referenced_blobs(self) -> dict[str, list[str]]:
        """sha → the rows that reference it (as `table:key.column`). Weight manifests are
        expanded by the caller, which knows their format."""
        refs: dict[str, list[str]] = {}
        for table, key, columns in (("bases", "name", ["weights"]), ("tasks", "name", ["weights"]),
                                     ("profiles", "task", ["scores"]), ("versions", "id", ["weights", "profile"]),
                                     ("evaluations", "id", ["predictions"])):
            for row in self.db[table].rows:
                for column in columns:
                    if row.get(column):
                        refs.setdefault(row[column], []).append(f"{table}:{row[key]}.{column}")
        return refs
