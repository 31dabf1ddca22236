"""The catalog: SQLite. The only module that talks SQL.

Rows reference blobs by sha256. Every change that writes several rows runs in one
transaction (`Catalog.transaction`), and appends its own row to `events`, so a crash
leaves either the whole change or none of it.

The schema is created and upgraded by sqlite-utils migrations; rows are read and written
with plain `sqlite3`. sqlite-utils is imported only to apply migrations (`init`, or an
index upgrade): importing it imports pandas and numpy when they are installed, a third of a
second that `kifmerge list` should not pay.
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

from kifmerge.errors import ConflictError, NotFoundError
from kifmerge.faults import fault_point

DB_NAME = "kifmerge.db"
BUSY_TIMEOUT_MS = 30_000
LOCK_ATTEMPTS = 12  # on top of the busy timeout: for the SQLITE_BUSY cases that skip it
JSON_COLUMNS = {"config", "params", "metrics", "timings", "training_config", "adapter_config", "payload", "layout", "settings",
                "validation", "files"}

# every table's primary key (Catalog.get / find / insert); a migration adding a table adds it here
PRIMARY_KEYS = {"bases": ("name",), "tasks": ("name",), "profiles": ("task",), "lines": ("name",), "versions": ("id",),
                "events": ("id",), "evaluations": ("id",), "aliases": ("line", "name")}
MIGRATION_SET = "kifmerge"
MIGRATIONS: list = []  # the schema's migrations, in order: functions of a sqlite_utils.Database
# migrations that only add indexes or nullable columns: a registry without them is complete (only
# slower, or without the new optional data), so opening it applies them (best effort) instead of
# asking for `kifmerge init`; code that predates them reads such a registry as before
INDEX_MIGRATIONS = {"m005_indexes", "m006_task_validation", "m007_base_files"}


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


_migration_set = None


def migration_set():
    """The migrations as a sqlite-utils `Migrations` set (imports sqlite-utils)."""
    global _migration_set
    if _migration_set is None:
        from sqlite_utils.migrations import Migrations

        _migration_set = Migrations(MIGRATION_SET)
        for fn in MIGRATIONS:
            _migration_set()(fn)
    return _migration_set


def __getattr__(name: str):
    if name == "migrations":  # the set under its former module-level name
        return migration_set()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@migration
def m001_initial(db) -> None:
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


@migration
def m002_evaluations(db) -> None:
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


@migration
def m003_aliases(db) -> None:
    """Named pointers to versions of a line (`support@champion`); moved in place, every move
    logged in `events` (`alias.set` / `alias.rm`)."""
    db["aliases"].create(
        {"line": str, "name": str, "number": int, "updated": str},
        pk=("line", "name"), foreign_keys=[("line", "lines", "name")], not_null={"number", "updated"},
    )



@migration
def m004_base_hub(db) -> None:
    """A base registered from a Hugging Face Hub id: the id and the commit its snapshot is."""
    db["bases"].add_column("hub_id", str)
    db["bases"].add_column("revision", str)


@migration
def m005_indexes(db) -> None:
    """Indexes for the registry commands at scale (issue 14): `show TASK` finds the versions a
    task was fused into (versions.task), `history --events` and plan re-runs find a line's events
    (events.subject, searched by prefix), `list tasks` reads tasks in creation order."""
    db["versions"].create_index(["task"], if_not_exists=True)
    db["events"].create_index(["subject"], if_not_exists=True)
    db["tasks"].create_index(["created"], if_not_exists=True)


@migration
def m006_task_validation(db) -> None:
    """A task's validation examples (`--val FILE`): {blob, records, data_fingerprint, source}."""
    db["tasks"].add_column("validation", str)


def held_versions_of(versions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Of a line's versions (number, parent, task, method, params), those whose fuses brought what the newest
    holds, newest first: walk back from it through parents, a rollback to vN holding what vN held."""
    by_number = {v["number"]: v for v in versions}
    number, seen = max(by_number, default=None), set()
    while number is not None and number in by_number and number not in seen:
        seen.add(number)
        version = by_number[number]
        if version["method"] == "rollback":
            number = (version.get("params") or {}).get("to")
            continue
        yield version
        number = version["parent"]


def held_tasks(versions: list[dict[str, Any]]) -> list[str]:
    """The tasks the newest of a line's `versions` holds, in the order learned (rolled-back ones are gone)."""
    return [version["task"] for version in held_versions_of(versions) if version["task"]][::-1]


@migration
def m007_base_files(db) -> None:
    """A base's weight files as registered, {file: {size, mtime_ns, sha256}}: a base read from its folder is
    checked against them, so weights changed in place are noticed (the fingerprint covers headers only)."""
    db["bases"].add_column("files", str)


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
    return {k: (json.dumps(v, sort_keys=True) if k in JSON_COLUMNS and v is not None
                else json.dumps(v, default=repr, ensure_ascii=False) if isinstance(v, (dict, list, tuple)) else v)
            for k, v in row.items()}


def _key(table: str, key: Any) -> tuple[str, list]:
    """The WHERE clause and arguments selecting one row by its primary key."""
    pks = PRIMARY_KEYS[table]
    values = list(key) if isinstance(key, (list, tuple)) else [key]
    if len(values) != len(pks):
        raise ValueError(f"{table} is keyed by {', '.join(pks)}, got {key!r}")
    return " AND ".join(f"[{pk}] = ?" for pk in pks), values


class Catalog:
    def __init__(self, root: Path):
        self.path = Path(root) / DB_NAME
        self.conn = retry_locked(self._connect)
        self._db = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            return conn
        except BaseException:
            conn.close()
            raise

    @property
    def db(self):
        """The connection as a sqlite_utils.Database (for migrations; imports sqlite-utils)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    @classmethod
    def create(cls, root: Path) -> "Catalog":
        catalog = cls(root)
        retry_locked(catalog.db.enable_wal)
        retry_locked(lambda: migration_set().apply(catalog.db))
        return catalog

    def pending_migrations(self) -> list[str]:
        """Names of the schema migrations not yet applied to this catalog, in order (read only)."""
        def applied() -> set[str]:
            if not self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'").fetchone():
                return set()
            return {row[0] for row in self.conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = ?", [MIGRATION_SET])}

        done = retry_locked(applied)
        return [fn.__name__ for fn in MIGRATIONS if fn.__name__ not in done]

    @staticmethod
    def is_kifmerge(root: Path) -> bool:
        """Whether `root/kifmerge.db` is a kifmerge catalog: SQLite with kifmerge's migration set
        applied (read only; a file that is not SQLite is not one)."""
        try:
            conn = sqlite3.connect(f"file:{Path(root) / DB_NAME}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error:
            return False
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master").fetchone():
                return True  # empty: an init killed before its schema (kifmerge's own)
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'").fetchone():
                return False
            return bool(conn.execute("SELECT 1 FROM _sqlite_migrations WHERE migration_set = ?", [MIGRATION_SET]).fetchone())
        except sqlite3.Error:
            return False
        finally:
            conn.close()

    def is_initialised(self) -> bool:
        """Every migration is applied, except perhaps index-only ones (see `add_missing_indexes`)."""
        return all(name in INDEX_MIGRATIONS for name in self.pending_migrations())

    def add_missing_indexes(self) -> bool:
        """Apply pending index-only migrations, under the write lock so that concurrent commands
        apply them once. Best effort: a read-only registry, or one locked for long, is used
        without them (queries are only slower). Returns whether the schema is now complete."""
        if not self.pending_migrations():
            return True
        if not self.is_initialised():
            return False
        conn = self.conn
        try:
            retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                migration_set().apply(self.db)  # re-reads what is pending, under the lock
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            retry_locked(lambda: conn.execute("COMMIT"))
        except (sqlite3.OperationalError, ConflictError):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
        return True

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator["Catalog"]:
        """One write transaction; taken IMMEDIATE so concurrent writers queue on the busy timeout
        instead of failing at commit; the BEGIN and the COMMIT retry "database is locked"."""
        conn = self.conn
        retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        fault_point("catalog.begun")
        try:
            yield self
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
    def query(self, sql: str, args: list | tuple = ()) -> list[dict[str, Any]]:
        """Rows of a SELECT as dicts, JSON columns decoded."""
        cursor = self.conn.execute(sql, args)
        names = [column[0] for column in cursor.description]
        decode = [name in JSON_COLUMNS for name in names]
        if not any(decode):
            return [dict(zip(names, row)) for row in cursor]
        return [{name: json.loads(value) if json_column and isinstance(value, str) else value
                 for name, json_column, value in zip(names, decode, row)} for row in cursor]

    def insert(self, table: str, row: dict[str, Any]) -> Any:
        """Insert one row; returns its primary key (the rowid for tables keyed by `id`)."""
        encoded = _encode(row)
        try:
            cursor = self.conn.execute(f"INSERT INTO [{table}] ({', '.join(f'[{c}]' for c in encoded)}) "
                                       f"VALUES ({', '.join('?' * len(encoded))})", list(encoded.values()))
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"{table[:-1]} {row.get('name') or row.get('task') or ''!s} already exists ({exc})") from exc
        pks = PRIMARY_KEYS[table]
        if pks == ("id",):
            return cursor.lastrowid
        return encoded[pks[0]] if len(pks) == 1 else tuple(encoded[pk] for pk in pks)

    def event(self, action: str, subject: str, payload: dict[str, Any] | None = None) -> None:
        self.conn.execute("INSERT INTO events (ts, action, subject, payload) VALUES (?, ?, ?, ?)",
                          [now(), action, subject, json.dumps(payload or {}, sort_keys=True)])

    def get(self, table: str, key: Any, what: str) -> dict[str, Any]:
        found = self.find(table, key)
        if found is None:
            raise NotFoundError(f"{what} {key!r} not found; see `kifmerge list {table}`")
        return found

    def find(self, table: str, key: Any) -> dict[str, Any] | None:
        where, args = _key(table, key)
        found = self.query(f"SELECT * FROM [{table}] WHERE {where}", args)
        return found[0] if found else None

    def rows(self, table: str, where: str | None = None, args: list | None = None, order_by: str | None = None,
             columns: list[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of one table (`columns`: only those; `limit`: at most that many)."""
        sql = f"SELECT {', '.join(f'[{c}]' for c in columns) if columns else '*'} FROM [{table}]"
        sql += f" WHERE {where}" if where else ""
        sql += f" ORDER BY {order_by}" if order_by else ""
        sql += f" LIMIT {int(limit)}" if limit is not None else ""
        return self.query(sql, args or [])

    def last_rows(self, table: str, order: list[str], last: int | None = None, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows ordered by the `order` columns; with `last`, only the last `last` of them (read
        backwards with a LIMIT, so the others are never read), still in that order."""
        if not last:
            return self.rows(table, order_by=", ".join(order), columns=columns)
        return self.rows(table, order_by=", ".join(f"{c} DESC" for c in order), columns=columns, limit=last)[::-1]

    def task_summaries(self, columns: list[str], last: int | None = None) -> list[dict[str, Any]]:
        """Every task, oldest first (only the newest `last` when given): `columns` and `profile`
        (whether it has one), in one query."""
        rows = self.query(f"SELECT {', '.join(f't.[{c}]' for c in columns)}, "
                          "EXISTS (SELECT 1 FROM profiles p WHERE p.task = t.name) AS profile FROM tasks t "
                          + (f"ORDER BY t.created DESC LIMIT {int(last)}" if last else "ORDER BY t.created"))
        for row in rows:
            row["profile"] = bool(row["profile"])
        return rows[::-1] if last else rows

    # ---- versions -----------------------------------------------------------
    def head(self, line: str) -> dict[str, Any] | None:
        found = self.rows("versions", "line = ?", [line], order_by="number desc", limit=1)
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
            self.conn.execute("INSERT INTO aliases (line, name, number, updated) VALUES (?, ?, ?, ?) ON CONFLICT (line, name) "
                              "DO UPDATE SET number = excluded.number, updated = excluded.updated", [line, name, number, now()])
            self.event("alias.set", f"{line}@{name}", {"line": line, "alias": name, "from": previous, "to": number})
        return previous

    def remove_alias(self, line: str, name: str) -> int:
        """Inside the caller's transaction: delete LINE@NAME (logged as `alias.rm`); returns its version."""
        current = self.find("aliases", (line, name))
        if current is None:
            raise NotFoundError(f"line {line!r} has no alias {name!r}; see `kifmerge alias list {line}`")
        self.conn.execute("DELETE FROM aliases WHERE line = ? AND name = ?", [line, name])
        self.event("alias.rm", f"{line}@{name}", {"line": line, "alias": name, "from": current["number"], "to": None})
        return current["number"]

    def line_events(self, line: str) -> list[dict[str, Any]]:
        """The events about a line: its creation and everything on `LINE@…` (versions, aliases)."""
        # `subject` starts with "LINE@" exactly when "LINE@" <= subject < "LINEA" ('A' follows '@'):
        # a range the index on events.subject answers, where substr() would scan every event
        return self.rows("events", "subject = ? OR (subject >= ? AND subject < ?)", [line, f"{line}@", f"{line}A"], order_by="id")

    def find_evaluation(self, subject: str, data_fingerprint: str, settings: dict, base: str) -> dict[str, Any] | None:
        """The newest stored evaluation of the same weights, data and settings on the same base (an adapter's
        weights, or a base's fingerprint, mean another model on another base)."""
        found = self.rows("evaluations", "subject = ? and data_fingerprint = ? and settings = ?",
                          [subject, data_fingerprint, json.dumps(settings, sort_keys=True)], order_by="id desc")
        return next((row for row in found if self.evaluated_base(row) == base), None)

    def evaluated_base(self, evaluation: dict[str, Any]) -> str | None:
        """The base an evaluation row's model stood on: its task's (line `task:NAME`) or its line's."""
        line = evaluation["line"]
        table, name = ("tasks", line[len("task:"):]) if line.startswith("task:") else ("lines", line)
        owner = self.find(table, name)
        return owner["base"] if owner else None

    def referenced_blobs(self) -> dict[str, list[str]]:
        """sha → the rows that reference it (as `table:key.column`). Weight manifests are
        expanded by the caller, which knows their format."""
        refs: dict[str, list[str]] = {}
        for table, key, columns in (("bases", "name", ["weights"]), ("tasks", "name", ["weights"]),
                                     ("profiles", "task", ["scores"]), ("versions", "id", ["weights", "profile"]),
                                     ("evaluations", "id", ["predictions"])):
            for row in self.rows(table, columns=[key, *columns]):
                for column in columns:
                    if row.get(column):
                        refs.setdefault(row[column], []).append(f"{table}:{row[key]}.{column}")
        return refs
