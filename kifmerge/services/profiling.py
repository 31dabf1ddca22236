"""Inspecting importance profiles: the most and least important units of a task's profile or of
a line version's accumulated profile, and the layer × module grid the heatmap draws.

Reads the stored profile blob with safetensors' numpy reader: no torch import, so it is as
quick as the other registry queries.
"""

from __future__ import annotations

import os
import re
from typing import Any

from kifmerge.errors import IntegrityError, NotFoundError, UsageError
from kifmerge.services.common import opened, resolve_version

OTHER_ROW = "other"
# `….layers.3.self_attn.q_proj` → stack `….layers.`, layer 3, module `self_attn.q_proj`
LAYER_PATTERN = re.compile(r"^(?P<stack>(?:.*?\.)?)(?P<index>\d+)\.(?P<module>.+)$")
WRAPPERS = ("base_model.model.",)                      # peft's prefix on adapter keys
CONTAINERS = {"model", "layers", "layer", "block", "blocks", "h", "transformer", "decoder_layers"}


def profile_show(ref: str, *, line: bool = False, top: int = 10, registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """The profile of TASK, or (`LINE@vN`, or `line=True`) the accumulated profile of a line
    version. A bare name is a task when a task has that name, otherwise the line's newest
    version; `line=True` forces the line. Scores are min–max normalised to [0, 1] (what the
    fusion rules compare), `raw` is the stored value."""
    import numpy as np

    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    with opened(registry) as reg:
        task = None if line or "@" in ref else reg.catalog.find("tasks", ref)
        if task is not None:
            row = reg.catalog.find("profiles", ref)
            if row is None:
                raise NotFoundError(f"task {ref!r} has no profile; register it with --profile or --calibrate")
            subject, kind, sha = {"type": "task", "task": ref}, task["kind"], row["scores"]
        else:
            if not line and "@" not in ref and reg.catalog.find("lines", ref) is None:
                raise NotFoundError(f"no task or line named {ref!r}; see `kifmerge list tasks` / `kifmerge list lines`")
            line_name, version = resolve_version(reg, ref)
            kind = reg.catalog.get("lines", line_name, "line")["kind"]
            subject = {"type": "version", "version": f"{line_name}@v{version['number']}", "task": version["task"]}
            sha = version["profile"]
        groups, unit, extras = _read_groups(reg.blobs.open_verified(sha))
    names = [(group, r) for group, scores in groups.items() for r in range(len(scores))]
    raw = np.concatenate([scores for scores in groups.values()]) if groups else np.zeros(0)
    normalised = _normalise(raw)
    order = np.argsort(-normalised, kind="stable")

    def entry(i: int) -> dict[str, Any]:
        group, r = names[i]
        return {"unit": _unit_name(group, r, unit), "group": group, "index": r,
                "score": float(normalised[i]), "raw": float(raw[i])}

    k = min(top, len(names))
    return {**subject, "kind": kind, "unit": unit, "groups": len(groups), "units": len(names), **extras,
            "top": [entry(i) for i in order[:k]], "bottom": [entry(i) for i in order[::-1][:k]],
            "grid": layer_module_grid({g: normalised[_slice(groups, g)] for g in groups})}


def _read_groups(path) -> tuple[dict[str, Any], str, dict[str, int]]:
    """The unit scores by group, the unit kind, and what else the file holds (which rules can read
    it): `element_scores` (tensors with them: kif-element) and `gram_matrices` (modules with one,
    stored or shared: regmean)."""
    import json

    from safetensors import SafetensorError, safe_open

    from kifmerge.profile_format import ELEMENT, GRAM, GRAM_SHARED, NOT_UNITS

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            # unit scores only: element scores and Gram matrices would count as millions of "units"
            groups = {name: handle.get_tensor(name).reshape(-1).astype("float64") for name in handle.keys()
                      if not name.startswith(NOT_UNITS)}
            keys = list(handle.keys())
    except SafetensorError as exc:
        raise IntegrityError(f"stored profile {path} cannot be read ({exc}); run `kifmerge verify --deep`") from None
    try:
        shared = len(json.loads(meta.get(GRAM_SHARED) or "{}"))
    except (ValueError, TypeError):
        shared = 0  # a malformed map is refused where the matrices are read (fuse), not when listing
    extras = {"element_scores": sum(k.startswith(ELEMENT) for k in keys),
              "gram_matrices": sum(k.startswith(GRAM) for k in keys) + shared}
    # keep the layout order the profile was written in (sorted group names, as units.py orders them)
    return dict(sorted(groups.items())), meta.get("unit", "unknown"), extras


def _slice(groups: dict[str, Any], name: str) -> slice:
    start = 0
    for group, scores in groups.items():
        if group == name:
            return slice(start, start + len(scores))
        start += len(scores)
    raise KeyError(name)


def _normalise(raw):
    import numpy as np

    if raw.size == 0 or not raw.max() > raw.min():
        return np.zeros_like(raw)
    return (raw - raw.min()) / (raw.max() - raw.min())


def _unit_name(group: str, r: int, unit: str) -> str:
    return f"{group}[{r}]" if unit == "lora-rank" else group


def split_layer(name: str) -> tuple[str, str]:
    """(row, column) of a unit group in the heatmap: `model.layers.3.self_attn.q_proj` →
    ("3", "self_attn.q_proj"); `encoder.block.1.layer.0.SelfAttention.q` →
    ("encoder.1", "layer.0.SelfAttention.q"); a name without a layer index → ("other", name)."""
    for wrapper in WRAPPERS:
        if name.startswith(wrapper):
            name = name[len(wrapper):]
    match = LAYER_PATTERN.match(name)
    if not match:
        return OTHER_ROW, name
    stack = ".".join(p for p in match.group("stack").split(".") if p and p not in CONTAINERS)
    return (f"{stack}.{match.group('index')}" if stack else match.group("index")), match.group("module")


def layer_module_grid(groups: dict[str, Any]) -> dict[str, Any]:
    """Rows = layers, columns = modules, cell = mean normalised score of the group's units
    (a LoRA module's rank units; one tensor for full fine-tunes); None where a layer lacks a
    module. Unparseable names go to the last row, "other"."""
    cells: dict[tuple[str, str], float] = {}
    rows: list[str] = []
    columns: list[str] = []
    for name, scores in groups.items():
        row, column = split_layer(name)
        cells[(row, column)] = float(scores.mean()) if len(scores) else 0.0
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []

    def row_key(row: str) -> tuple:
        if row == OTHER_ROW:
            return (1, "", 0)
        stack, _, index = row.rpartition(".")
        return (0, stack, int(index))

    rows.sort(key=row_key)
    return {"rows": rows, "columns": columns,
            "values": [[cells.get((row, column)) for column in columns] for row in rows]}
