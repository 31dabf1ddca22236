"""Content-addressed blob store: `blobs/ab/cdef…` named by the sha256 of the bytes.

Blobs are immutable. Writers stage into `tmp/` on the same filesystem and `os.replace` into
place, so a reader never sees a partial blob and a killed writer leaves only staging files
(which `gc` removes).

Readers verify before handing a path out. Hashing a multi-GB checkpoint on every read would
cost more than the fusion itself, so each blob has a *stamp* (`stamps/ab/cdef…`: size, inode,
mtime and ctime, taken when its hash was last computed); a read re-hashes only a blob whose
stamp is missing or differs. Any write to the file changes its ctime, which user space cannot
set back, so edits and replacements are still caught on read; silent media corruption that
leaves the inode untouched is what `kifmerge verify --deep` (which always re-hashes) is for.
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


_input_hashes: dict[tuple, str] = {}


def sha256_input(path: Path) -> str:
    """sha256 of an input file (data a command reads), computed once per process while the file
    is unchanged: keyed by its resolved path, size, inode, mtime and ctime (any write changes
    the ctime), so a plan run hashes each data file once however many steps read it. Blobs are
    never hashed through this (`verify --deep` must read them)."""
    path = Path(path)
    info = os.stat(path)
    key = (str(path.resolve()), info.st_size, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _input_hashes:
        _input_hashes[key] = sha256_file(path)
    return _input_hashes[key]


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.staging = self.root / "tmp"
        self.stamps = self.root / "stamps"

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
        return Path(tempfile.mkdtemp(prefix=f"work-{os.getpid()}-", dir=self.staging))

    def put_file(self, source: Path, *, move: bool = False, sha: str | None = None) -> str:
        """Store a file's bytes; returns its sha256. `move=True` consumes a staged file; `sha`
        is the hash of a staged file its writer computed while writing it (saves a re-read)."""
        self.ensure()
        source = Path(source)
        if move and source.resolve().is_relative_to(self.staging.resolve()):
            staged = source
        else:
            sha = None
            fd, name = tempfile.mkstemp(prefix=f"blob-{os.getpid()}-", dir=self.staging)
            os.close(fd)
            staged = Path(name)
            try:
                shutil.copyfile(source, staged)
            except BaseException:
                staged.unlink(missing_ok=True)  # a full disk leaves nothing behind
                raise
        sha = sha or sha256_file(staged)
        self._publish(staged, sha)
        return sha

    def put_bytes(self, data: bytes) -> str:
        self.ensure()
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            self._touch(sha)
            return sha
        fd, name = tempfile.mkstemp(prefix=f"blob-{os.getpid()}-", dir=self.staging)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        self._publish(Path(name), sha)
        return sha

    def _publish(self, staged: Path, sha: str) -> None:
        target = self.path_of(sha)
        if target.exists():
            staged.unlink(missing_ok=True)
            self._touch(sha)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        os.replace(staged, target)
        self._stamp(sha)

    def _touch(self, sha: str) -> None:
        """A blob stored again is young again: `gc` must not take it while its new owner
        commits. (Touching changes the ctime, so a stamp that held is renewed.)"""
        stamped = self.is_stamped(sha)
        try:
            os.utime(self.path_of(sha))
        except OSError:
            return
        if stamped:
            self._stamp(sha)

    def _stamp_path(self, sha: str) -> Path:
        return self.stamps / sha[:2] / sha[2:]

    @staticmethod
    def _identity(path: Path) -> str:
        info = os.stat(path)
        return f"{info.st_size} {info.st_ino} {info.st_mtime_ns} {info.st_ctime_ns}"

    def _stamp(self, sha: str) -> None:
        """Record that the blob's bytes hashed to its name as the file is now (best effort:
        a read-only registry simply re-hashes on every read)."""
        stamp = self._stamp_path(sha)
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            temp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
            temp.write_text(self._identity(self.path_of(sha)))
            os.replace(temp, stamp)
        except OSError:
            pass

    def is_stamped(self, sha: str) -> bool:
        try:
            return self._stamp_path(sha).read_text() == self._identity(self.path_of(sha))
        except OSError:
            return False

    def open_verified(self, sha: str) -> Path:
        """Path to the blob after checking its bytes hash to `sha` (raises IntegrityError)."""
        path = self.path_of(sha)
        if not path.is_file():
            raise IntegrityError(f"blob {sha[:12]} is missing from {self.blobs}; run `kifmerge verify`")
        if self.is_stamped(sha):
            return path
        actual = sha256_file(path)
        if actual != sha:
            raise IntegrityError(f"blob {sha[:12]} is corrupt (its bytes hash to {actual[:12]}); run `kifmerge verify`")
        self._stamp(sha)
        return path

    def read_bytes(self, sha: str) -> bytes:
        return self.open_verified(sha).read_bytes()

    def all_shas(self) -> set[str]:
        if not self.blobs.is_dir():
            return set()
        return {p.parent.name + p.name for p in self.blobs.glob("??/*") if p.is_file()}
