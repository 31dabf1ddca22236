"""The registry: a folder holding the catalog (`kifmerge.db`) and the blob store (`blobs/`).

Weights are stored as a *manifest* blob (JSON) naming the safetensors blobs that hold the
tensors and which tensor lives in which file; the manifest's sha is what rows reference.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kifmerge.errors import IntegrityError, InvalidInputError, NotFoundError
from kifmerge.faults import fault_point
from kifmerge.registry.blobs import BlobStore
from kifmerge.registry.catalog import DB_NAME, Catalog

ENV_VAR = "KIFMERGE_REGISTRY"
DEFAULT_LOCATION = "registry"
MANIFEST_FORMAT = "kifmerge-weights"


def resolve_root(explicit: str | os.PathLike | None, *, discover: bool = True) -> Path:
    """`--registry PATH` > `$KIFMERGE_REGISTRY` > the nearest `registry/` holding a catalog in
    the current folder or its parents (like git; only with `discover`) > `./registry`."""
    if explicit or os.environ.get(ENV_VAR):
        return Path(explicit or os.environ[ENV_VAR])
    if discover:
        found = discover_root(Path.cwd())
        if found is not None:
            return found
    return Path(DEFAULT_LOCATION)


def discover_root(start: Path) -> Path | None:
    """The nearest `registry/` with a catalog in `start` or one of its parents."""
    for folder in (start, *start.parents):
        candidate = folder / DEFAULT_LOCATION
        if (candidate / DB_NAME).is_file():
            return candidate if folder != start else Path(DEFAULT_LOCATION)
    return None


def not_found_message(root: Path, explicit: bool) -> str:
    """Where `Registry.open` looked, and how to create one there."""
    if explicit:
        return f"no registry at {root}; create one with `kifmerge init --registry {root}`"
    if os.environ.get(ENV_VAR):
        return f"no registry at {root} (from $KIFMERGE_REGISTRY); create one with `kifmerge init`"
    return (f"no registry found: no --registry, $KIFMERGE_REGISTRY not set, and no {DEFAULT_LOCATION}/ in {Path.cwd()} "
            f"or its parents; create one here with `kifmerge init`, or name one with --registry PATH")


@dataclass(frozen=True)
class WeightSet:
    """Verified local paths of a stored checkpoint's tensor files and its tensor → file map."""

    files: dict[str, Path]          # file name → verified blob path (tensors, configs, index)
    weight_map: dict[str, str]      # tensor name → file name

    def tensor_files(self) -> dict[str, Path]:
        """Only the safetensors files (the manifest also carries configs and the index)."""
        used = set(self.weight_map.values())
        return {name: path for name, path in self.files.items() if name in used}


class Registry:
    def __init__(self, root: Path, catalog: Catalog):
        self.root = root
        self.catalog = catalog
        self.blobs = BlobStore(root)

    @classmethod
    def init(cls, root: str | os.PathLike | None = None, *, force: bool = False) -> tuple["Registry", bool]:
        """Create (or upgrade) the registry; returns it and whether it was new. A folder that
        exists, is not empty and is not a kifmerge registry is refused (InvalidInputError, exit 4)
        unless `force`: kifmerge would otherwise take it over, and `gc` clean up in it."""
        root = resolve_root(root, discover=False)  # like `git init`: here, not in a parent
        check_registry_folder(root, force)
        root.mkdir(parents=True, exist_ok=True)
        created = not (root / DB_NAME).exists()
        registry = cls(root, Catalog.create(root))
        registry.blobs.ensure()
        if created:
            with registry.catalog.transaction():
                registry.catalog.event("init", str(root))
        return registry, created

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Registry":
        explicit = root
        root = resolve_root(root)
        if not (root / DB_NAME).is_file():
            raise NotFoundError(not_found_message(root, bool(explicit)))
        catalog = Catalog(root)
        if not catalog.is_initialised():
            catalog.close()
            raise IntegrityError(f"registry at {root} has an older or incomplete schema; run `kifmerge init` to upgrade it")
        catalog.add_missing_indexes()  # only indexes missing: added in place (once; best effort)
        return cls(root, catalog)

    def close(self) -> None:
        self.catalog.close()

    # ---- weights ------------------------------------------------------------
    def put_weights(self, files: dict[str, Path], weight_map: dict[str, str], *, move: bool = False,
                    hashes: dict[str, str] | None = None) -> str:
        """Store tensor files as blobs plus a manifest; returns the manifest sha. `hashes`: the
        sha256 of staged files their writer computed on the way (they are not read again)."""
        shas = {}
        for name, path in sorted(files.items()):
            shas[name] = self.blobs.put_file(path, move=move, sha=(hashes or {}).get(name))
            fault_point("weights.file-stored")
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": shas, "weight_map": dict(sorted(weight_map.items()))}
        sha = self.blobs.put_bytes(json.dumps(manifest, sort_keys=True).encode())
        fault_point("weights.manifest-stored")
        return sha

    def manifest(self, sha: str) -> dict:
        manifest = json.loads(self.blobs.read_bytes(sha))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(f"blob {sha[:12]} is not a kifmerge weight manifest")
        return manifest

    def weights(self, sha: str) -> WeightSet:
        manifest = self.manifest(sha)
        files = {name: self.blobs.open_verified(blob) for name, blob in manifest["files"].items()}
        return WeightSet(files=files, weight_map=manifest["weight_map"])

    def copy_weights(self, sha: str, out_dir: Path) -> dict[str, str]:
        """Write a stored checkpoint's files under their original names; returns name → sha256."""
        manifest = self.manifest(sha)
        for name, blob in manifest["files"].items():
            shutil.copyfile(self.blobs.open_verified(blob), out_dir / name)
            os.chmod(out_dir / name, 0o644)
        return dict(manifest["files"])

    def blobs_of(self, sha: str) -> list[str]:
        """A weights manifest and the blobs it names (for verify / gc)."""
        return [sha, *self.manifest(sha)["files"].values()]


def check_registry_folder(root: Path, force: bool) -> None:
    """`init` only makes a registry of a new or empty folder, or of one that already is a
    kifmerge registry (its catalog records kifmerge's schema); `force` overrides."""
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{root} is a file, not a folder; choose another registry path")
    if force or not root.is_dir():
        return
    if (root / DB_NAME).is_file():
        if Catalog.is_kifmerge(root):
            return
        raise InvalidInputError(f"{root / DB_NAME} is not a kifmerge catalog; choose another registry path, "
                                "or pass --force to take the folder over")
    entries = sorted(p.name for p in root.iterdir() if not (p.name.startswith(".") or p.name == "README.md"))
    if entries:  # hidden files and a README aside: this repository's registry/ ships .gitignore and README.md
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise InvalidInputError(f"{root} is not empty ({shown}) and is not a kifmerge registry; choose a new or empty "
                                "folder, or pass --force to make a registry of it (kifmerge never deletes files it did "
                                "not write)")
