"""`diff`: how much each skill unit changed between two versions, and what the fuses in
between did to it (kept / replaced / blended, recomputed from the stored profiles and the
recorded fusion parameters with the pure rules)."""

from __future__ import annotations

import math
import os
from typing import Any

from kifmerge.errors import InvalidInputError, UsageError
from kifmerge.fusion.methods import METHODS
from kifmerge.registry import Registry
from kifmerge.services.common import opened, resolve_version

FATES = ("kept", "replaced", "blended")


def diff(ref_a: str, ref_b: str, *, top: int = 10, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """Per-unit relative change ‖W_B − W_A‖ / ‖W_A‖ between two versions (same base, kind and
    unit layout), the fuse steps between them (same line) with each unit's fate per step, and
    the `top` most changed units."""
    from kifmerge.checkpoints import read_headers
    from kifmerge.diff import unit_norms
    from kifmerge.units import layout_for

    if top < 0:
        raise UsageError("--top must be 0 or more")
    with opened(registry) as reg:
        line_a, va = resolve_version(reg, ref_a)
        line_b, vb = resolve_version(reg, ref_b)
        row_a, row_b = reg.catalog.get("lines", line_a, "line"), reg.catalog.get("lines", line_b, "line")
        if (row_a["base"], row_a["kind"]) != (row_b["base"], row_b["kind"]):
            raise InvalidInputError(f"{line_a} holds {row_a['kind']} versions of base {row_a['base']!r} but {line_b} holds "
                                    f"{row_b['kind']} versions of base {row_b['base']!r}; diff compares versions of one layout")
        kind = row_a["kind"]
        ws_a, ws_b = reg.weights(va["weights"]), reg.weights(vb["weights"])
        layout = layout_for(kind, read_headers(ws_a.tensor_files(), ws_a.weight_map).shapes)
        if layout_for(kind, read_headers(ws_b.tensor_files(), ws_b.weight_map).shapes) != layout:
            raise InvalidInputError(f"{line_a}@v{va['number']} and {line_b}@v{vb['number']} have different unit layouts "
                                    "(other modules, ranks or tensors)")
        diff_sq, base_sq = unit_norms(ws_a.files, ws_a.weight_map, ws_b.files, ws_b.weight_map, layout)
        steps = _steps(reg, layout, line_a, va["number"], vb["number"]) if line_a == line_b else []

    units = []
    for group, part in layout.offsets().items():
        for r, index in enumerate(range(part.start, part.stop)):
            d, n = math.sqrt(diff_sq[index].item()), math.sqrt(base_sq[index].item())
            units.append({"module": group, "unit": r, "id": f"{group}[{r}]" if kind == "lora" else group,
                          "relative": _relative(d, n), "diff_norm": d, "norm": n,
                          "fates": {s["version"]: s["fates"][index] for s in steps if s["fates"] is not None}})
    modules = []
    for group, part in layout.offsets().items():
        members = units[part.start:part.stop]
        d = math.sqrt(float(diff_sq[part].sum())) if members else 0.0
        n = math.sqrt(float(base_sq[part].sum())) if members else 0.0
        modules.append({"module": group, "units": len(members), "relative": _relative(d, n),
                        "changed": sum(u["diff_norm"] > 0 for u in members),
                        "counts": {s["version"]: _count([s["fates"][i] for i in range(part.start, part.stop)])
                                   for s in steps if s["fates"] is not None}})
    finite = [u["relative"] for u in units if u["relative"] is not None]
    total_d, total_n = math.sqrt(float(diff_sq.sum())), math.sqrt(float(base_sq.sum()))
    ranked = sorted(units, key=lambda u: (-(math.inf if u["relative"] is None else u["relative"]), u["id"]))
    return {
        "from": f"{line_a}@v{va['number']}", "to": f"{line_b}@v{vb['number']}", "same_line": line_a == line_b,
        "kind": kind, "unit": layout.unit,
        "summary": {"units": layout.size, "modules": len(layout.groups), "changed": sum(u["diff_norm"] > 0 for u in units),
                    "unchanged": sum(u["diff_norm"] == 0 for u in units), "relative": _relative(total_d, total_n),
                    "max_relative": max(finite) if finite else None,
                    "mean_relative": sum(finite) / len(finite) if finite else None},
        "steps": [{k: v for k, v in s.items() if k != "fates"} for s in steps],
        "tasks": [{"version": s["version"], "task": s["task"], "method": s["method"]} for s in steps if s["task"]],
        "modules": modules,
        "units": units,
        "top": ranked[:top],
    }


def _relative(diff_norm: float, norm: float) -> float | None:
    """‖ΔW‖ / ‖W_A‖; 0 when nothing changed; None when W_A is zero and the unit changed."""
    if norm > 0:
        return diff_norm / norm
    return 0.0 if diff_norm == 0 else None


def _count(fates: list[str]) -> dict[str, int]:
    return {fate: sum(f == fate for f in fates) for fate in FATES}


def _steps(reg: Registry, layout, line: str, a: int, b: int) -> list[dict[str, Any]]:
    """The versions after min(a, b) up to max(a, b), oldest first, each with its per-unit fates
    (None for methods without per-unit coefficients: the initial version, rollbacks and the
    element-wise task-vector baselines)."""
    low, high = sorted((a, b))
    out = []
    for row in reg.catalog.rows("versions", "line = ? and number > ? and number <= ?", [line, low, high], order_by="number"):
        # the methods whose per-unit coefficients can be recomputed (a data rule: its unit rule at the recorded α)
        recomputable = row["method"] in METHODS and METHODS[row["method"]].coefficients is not None
        fates = _fates(reg, layout, line, row) if recomputable else None
        out.append({"version": f"v{row['number']}", "number": row["number"],
                    "parent": f"v{row['parent']}" if row["parent"] else None, "task": row["task"],
                    "method": row["method"], "params": row["params"],
                    "counts": _count(fates) if fates is not None else None, "fates": fates})
    return out


def _fates(reg: Registry, layout, line: str, row: dict[str, Any]) -> list[str]:
    """Recompute the step's unit coefficients as `fuse` did (parent's accumulated profile, the
    task's profile, the recorded parameters): c_new = 0 kept, c_new = 1 replaced, else blended."""
    from kifmerge.options import FuseParams
    from kifmerge.profiles import read_profile
    from kifmerge.services.fusing import unit_coefficients

    recorded = {k: v for k, v in (row["params"] or {}).items() if k in FuseParams.model_fields}
    parent = reg.catalog.version(line, row["parent"])
    p_old = read_profile(reg.blobs.open_verified(parent["profile"]), layout)
    p_new = read_profile(reg.blobs.open_verified(reg.catalog.get("profiles", row["task"], "profile")["scores"]), layout)
    c_new, _ = unit_coefficients(FuseParams(method=row["method"], **recorded), p_old, p_new)
    return ["kept" if c == 0.0 else "replaced" if c == 1.0 else "blended" for c in c_new.tolist()]
