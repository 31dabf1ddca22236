"""Content-addressed blob store: `blobs/ab/cdef…` named by the sha256 of the bytes.

Blobs are immutable. Writers stage into `tmp/` on the same filesystem and `os.replace` into
place, so a reader never sees a partial blob and a killed writer leaves only staging files
(which `gc` removes). Readers verify the hash before handing a path out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kifmerge.errors import IntegrityError

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.staging = self.root / "tmp"

    def ensure(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha[2:]

    def exists(self, sha: str) -> bool:
        return self.path_of(sha).is_file()

    def staging_dir(self) -> Path:
        """A fresh private folder under `tmp/` for building files before they become blobs."""
        self.ensure()
        return Path(tempfile.mkdtemp(prefix="work-", dir=self.staging))

    def put_file(self, source: Path, *, move: bool = False) -> str:
        """Store a file's bytes; returns its sha256. `move=True` consumes a staged file."""
        self.ensure()
        source = Path(source)
        if move and source.resolve().is_relative_to(self.staging.resolve()):
            staged = source
        else:
            fd, name = tempfile.mkstemp(prefix="blob-", dir=self.staging)
            os.close(fd)
            staged = Path(name)
            shutil.copyfile(source, staged)
        sha = sha256_file(staged)
        self._publish(staged, sha)
        return sha

    def put_bytes(self, data: bytes) -> str:
        self.ensure()
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        fd, name = tempfile.mkstemp(prefix="blob-", dir=self.staging)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._publish(Path(name), sha)
        return sha

    def _publish(self, staged: Path, sha: str) -> None:
        target = self.path_of(sha)
        if target.exists():
            staged.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        os.replace(staged, target)

    def open_verified(self, sha: str) -> Path:
        """Path to the blob after checking its bytes hash to `sha` (raises IntegrityError)."""
        path = self.path_of(sha)
        if not path.is_file():
            raise IntegrityError(f"blob {sha[:12]} is missing from {self.blobs}; run `kifmerge verify`")
        actual = sha256_file(path)
        if actual != sha:
            raise IntegrityError(f"blob {sha[:12]} is corrupt (its bytes hash to {actual[:12]}); run `kifmerge verify`")
        return path

    def read_bytes(self, sha: str) -> bytes:
        return self.open_verified(sha).read_bytes()

    def all_shas(self) -> set[str]:
        if not self.blobs.is_dir():
            return set()
        return {p.parent.name + p.name for p in self.blobs.glob("??/*") if p.is_file()}
