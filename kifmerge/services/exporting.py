"""Exporting a version as a Hugging Face folder."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

from kifmerge.errors import ConflictError
from kifmerge.faults import fault_point
from kifmerge.services.common import PROFILE_EXPORT_NAME, Progress, base_dir, opened, resolve_version, start_progress


def export(ref: str, out: str | Path, *, merged: bool = False, registry: str | os.PathLike | None = None,
           progress: Progress = None, record: bool = True) -> dict[str, Any]:
    """Write LINE[@vN] as an adapter folder, or with `merged` as a full model folder. The folder
    appears whole (built beside it, then renamed); re-running into a folder that already holds
    exactly this export succeeds without changing it (a pipeline killed after the rename).
    `record=False` leaves the catalog untouched (no `export` event): `mlflow push` reads the
    registry only."""
    from kifmerge import export as exporter

    out = Path(out)
    existing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if existing and not (out / "README.md").is_file():
        raise ConflictError(f"output {out} exists and is not empty; choose a new folder")
    with opened(registry) as reg:
        line, version = resolve_version(reg, ref)
        line_row = reg.catalog.get("lines", line, "line")
        base_row = reg.catalog.get("bases", line_row["base"], "base")
        folder = base_dir(reg, base_row)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(out)
        staging = Path(out.parent / f".{out.name}.kifmerge-tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
        except FileNotFoundError:  # the folder exists, yet nothing can be made in it: /proc, /sys
            from kifmerge.errors import StorageError

            raise StorageError(f"cannot write or read ({out.parent}): nothing can be created there (a special file system "
                               "such as /proc?); choose another output folder; nothing was recorded") from None
        advance = start_progress(progress, f"exporting {line}@v{version['number']}", 2)
        base_model = None  # what an adapter export's config names its base by
        try:
            if line_row["kind"] == "lora":
                adapter_dir = staging / "adapter" if merged else staging
                adapter_dir.mkdir(exist_ok=True)
                reg.copy_weights(version["weights"], adapter_dir)
                fault_point("export.weights-copied")
                base_model = exporter.point_adapter_at_base(adapter_dir, base_row, folder)
                if advance:
                    advance(1)
                if not merged:
                    exporter.copy_tokenizer_files(folder, adapter_dir)
                else:
                    exporter.merge_adapter_into_base(adapter_dir, folder, base_row["config"], staging)
                    fault_point("export.merged")
                    shutil.rmtree(adapter_dir)
            else:
                reg.copy_weights(version["weights"], staging)
                fault_point("export.weights-copied")
                exporter.copy_model_side_files(folder, staging, include_config=True)
                if advance:
                    advance(1)
            shutil.copyfile(reg.blobs.open_verified(version["profile"]), staging / PROFILE_EXPORT_NAME)
            os.chmod(staging / PROFILE_EXPORT_NAME, 0o644)
            lineage = [v for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number")
                       if v["number"] <= version["number"]]
            evaluations = {row["label"]: row["metrics"] for row in reg.catalog.rows(
                "evaluations", "line = ? and number = ?", [line, version["number"]], order_by="id")}
            hashes = exporter.write_model_card(staging, line=line, version={**version, "kind": line_row["kind"]},
                                               base=base_row, lineage=lineage, merged=merged, evaluations=evaluations)
            exporter.make_readable(staging)
            if advance:
                advance(1)
            fault_point("export.card-written")
            if existing:
                if not _same_files(staging, out):
                    raise ConflictError(f"output {out} exists and is not empty; choose a new folder")
                shutil.rmtree(staging)
            else:
                if out.exists():
                    out.rmdir()
                os.replace(staging, out)
                fault_point("export.renamed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if record:
            with reg.catalog.transaction():
                reg.catalog.event("export", f"{line}@v{version['number']}", {"out": str(out.resolve()), "merged": merged})
        kind = "adapter" if line_row["kind"] == "lora" and not merged else "model"
        return {"version": f"{line}@v{version['number']}", "out": str(out.resolve()), "kind": kind,
                "files": sorted(p.name for p in out.iterdir()), "sha256": hashes,
                "base_model_name_or_path": base_model if kind == "adapter" else None}


def _remove_dead_staging(out: Path) -> None:
    """Build folders (`.OUT.kifmerge-tmp-PID`) left by an export that was killed: their process
    is gone, so nothing will finish or remove them."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.kifmerge-tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _same_files(a: Path, b: Path) -> bool:
    """Same file names and bytes (the fresh export vs what OUT already holds)."""
    from kifmerge.export import sha256_of

    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).is_file() and (b / n).is_file() and sha256_of(a / n) == sha256_of(b / n) for n in names)
