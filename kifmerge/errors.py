"""Error classes. Each carries the process exit code the CLI returns for it, so scripts can
tell "you typed it wrong" from "it does not exist" from "the registry is damaged"."""

from __future__ import annotations


class KifWarning(UserWarning):
    """Something asked for was replaced by what can run here (the CLI prints it as one line on
    stderr, every time, --json included); the result records what ran."""


class FallbackWarning(KifWarning):
    """A fusion rule lacked the scores it reads and ran as the rule its missing input reduces to."""


class KifError(Exception):
    """Base class: a one-line message that says what is wrong and what to do."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details  # a machine-readable report, printed on stdout with --json


class UsageError(KifError):
    """Arguments that cannot work together (exit 2, like click's own usage errors)."""

    exit_code = 2
    kind = "usage"


class NotFoundError(KifError):
    """A named base, task, line, version or file does not exist (exit 3)."""

    exit_code = 3
    kind = "not-found"


class InvalidInputError(KifError):
    """A file or value was read but is not acceptable: wrong shapes, NaN, bad profile (exit 4)."""

    exit_code = 4
    kind = "invalid-input"


class IntegrityError(KifError):
    """Stored data does not match its recorded hash or is missing from the registry (exit 5)."""

    exit_code = 5
    kind = "integrity"


class ConflictError(KifError):
    """The name exists already, or a concurrent change moved the line under us (exit 6)."""

    exit_code = 6
    kind = "conflict"


class StorageError(KifError):
    """A file or folder could not be written or read: disk full, read-only file system,
    permission denied (exit 7). Nothing was recorded."""

    exit_code = 7
    kind = "storage"


class RemoteError(KifError):
    """A remote service (an MLflow tracking server) cannot be reached, refused the credentials or
    the request (exit 8). kifmerge's own registry is unchanged; running the command again resumes."""

    exit_code = 8
    kind = "remote"


EXIT_CODES = {cls.kind: cls.exit_code for cls in (KifError, UsageError, NotFoundError, InvalidInputError, IntegrityError,
                                                  ConflictError, StorageError, RemoteError)}
