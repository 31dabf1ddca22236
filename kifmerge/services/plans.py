"""Running a plan file: check every step against the registry before any compute, then run
the steps in order, skipping those already done.

A step's *fingerprint* hashes what it is (its kind, its fields with the plan's defaults
merged in) and what it reads (the sha256 of its data, profile and checkpoint files). A
finished step records a `plan.step` event with its fingerprint, and a rerun skips it: a plan
killed halfway resumes at the step that did not finish. A step whose effect is in the
registry without the event (killed between its commit and the event) is recognised by the
task or version it made and counted as done. Changing a finished step's inputs changes its
fingerprint; the step then conflicts with the task it already made (rename the task).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kifmerge.errors import ConflictError, InvalidInputError, NotFoundError
from kifmerge.faults import fault_point
from kifmerge.plans import AddTaskStep, EvalStep, FuseStep, LearnStep, Plan, load_plan
from kifmerge.registry import Registry, resolve_root
from kifmerge.registry.blobs import sha256_file
from kifmerge.services.common import Progress, check_name, parse_ref

FUSE_KWARGS = {"method": "method", "top": "top", "tau": "tau", "weights": "weights", "alpha": "alpha",
               "density": "density", "lam": "lam", "seed": "merge_seed", "shard_size": "shard_size", "dtype": "dtype"}


@dataclass
class PlannedStep:
    index: int
    kind: str
    subject: str                    # the task, or the version evaluated
    fingerprint: str
    status: str = "pending"         # pending | done
    estimate: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        return {"step": self.index, "kind": self.kind, "subject": self.subject, "status": self.status,
                "fingerprint": self.fingerprint, "estimate": self.estimate, **({"result": self.result} if self.result else {})}


def run_plan(path: str | Path, *, dry_run: bool = False, registry: str | os.PathLike | None = None,
             progress: Progress = None, on_step: Callable[[PlannedStep], None] | None = None) -> dict[str, Any]:
    """Validate PLAN and every reference in it, then (unless `dry_run`) run its pending steps."""
    plan, _ = load_plan(path)
    root = registry or plan.registry or resolve_root(None)  # found once: checked and run against the same one
    check_name(plan.line, "line")
    reg = _open_or_none(root)
    try:
        steps = _check(plan, reg)
    finally:
        if reg is not None:
            reg.close()
    summary = {"plan": str(path), "line": plan.line, "dry_run": dry_run, "steps": steps}
    if dry_run:
        return _public(summary)
    from kifmerge.services import evaluation, fusion, learning, registry as registry_service, tasks

    registry_service.init(registry=root)
    if plan.base and not _has_base(root, plan.base.name):
        registry_service.add_base(plan.base.name, plan.base.path, copy=plan.base.copy_files, registry=root, progress=progress)
    for planned, step in zip(steps, plan.steps):
        if planned.status == "done":
            if on_step:
                on_step(planned)
            continue
        if on_step:
            on_step(planned)
        body = step.body
        if isinstance(body, LearnStep):
            first = _head_number(root, plan.line) == 0
            planned.result = learning.learn(body.task, body.data, plan.line, base=plan.base.name if first and plan.base else None,
                                            options={**plan.train, **body.train}, **_fuse_kwargs(plan, body),
                                            registry=root, progress=progress)
        elif isinstance(body, AddTaskStep):
            planned.result = tasks.add_task(body.task, body.checkpoint, base=plan.base.name, profile=body.profile,
                                            calibrate=body.calibrate, calibrate_batches=body.calibrate_batches,
                                            registry=root, progress=progress)
        elif isinstance(body, FuseStep):
            planned.result = fusion.fuse(body.task, plan.line, **_fuse_kwargs(plan, body), registry=root, progress=progress)
        else:
            settings = plan.eval_settings(body).model_dump()
            planned.result = evaluation.evaluate(body.ref or plan.line, body.data, **settings, registry=root, progress=progress)
        fault_point("plan.step-done")
        _record(root, plan.line, planned)
        planned.status = "done"
    return _public(summary)


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    steps = summary["steps"]
    return {**summary, "steps": [s.public() for s in steps],
            "done": sum(s.status == "done" for s in steps), "pending": sum(s.status == "pending" for s in steps)}


def _open_or_none(root) -> Registry | None:
    try:
        return Registry.open(root)
    except NotFoundError:
        return None


def _has_base(root, name: str) -> bool:
    reg = Registry.open(root)
    try:
        return reg.catalog.find("bases", name) is not None
    finally:
        reg.close()


def _head_number(root, line: str) -> int:
    reg = Registry.open(root)
    try:
        head = reg.catalog.head(line) if reg.catalog.find("lines", line) else None
        return head["number"] if head else 0
    finally:
        reg.close()


def _fuse_kwargs(plan: Plan, body: LearnStep | FuseStep) -> dict[str, Any]:
    chosen = {**plan.fuse, **body.fuse}
    unknown = set(chosen) - set(FUSE_KWARGS)
    if unknown:
        raise InvalidInputError(f"fuse option {sorted(unknown)[0]!r} cannot be set in a plan")
    return {FUSE_KWARGS[key]: (tuple(value) if isinstance(value, list) else value) for key, value in chosen.items()}


def _record(root, line: str, planned: PlannedStep) -> None:
    reg = Registry.open(root)
    try:
        with reg.catalog.transaction():
            reg.catalog.event("plan.step", line, {"fingerprint": planned.fingerprint, "step": planned.index,
                                                  "kind": planned.kind, "subject": planned.subject})
    finally:
        reg.close()


# ---- checking a plan against the registry, before any compute -----------------------------
def _check(plan: Plan, reg: Registry | None) -> list[PlannedStep]:
    """Walk the steps as they would run, tracking which tasks and versions will exist; a
    reference to anything that will not exist at that point fails here, naming the step."""
    catalog = reg.catalog if reg else None
    finished = _finished_fingerprints(catalog, plan.line)
    line_row = catalog.find("lines", plan.line) if catalog else None
    head = (catalog.head(plan.line) or {}).get("number", 0) if line_row else 0
    versions_by_task = {v["task"]: v for v in catalog.rows("versions", "line = ?", [plan.line])} if line_row else {}
    known_tasks = {row["name"]: row for row in catalog.rows("tasks")} if catalog else {}
    planned_tasks: set[str] = set()
    base_known = bool(plan.base and ((catalog and catalog.find("bases", plan.base.name)) or plan.base.path))
    if plan.base and plan.base.path and not base_known:
        raise NotFoundError(f"base model folder not found: {plan.base.path}")
    weight_bytes = _weights_bytes(reg, line_row and catalog.head(plan.line))
    out: list[PlannedStep] = []
    for index, step in enumerate(plan.steps):
        body, where = step.body, f"steps[{index}].{step.kind}"
        if isinstance(body, (LearnStep, AddTaskStep)):
            _named(body.task, where)
            if body.task in planned_tasks:
                raise InvalidInputError(f"{where}: task {body.task!r} is made twice in this plan")
            planned_tasks.add(body.task)
        if isinstance(body, LearnStep):
            _exists(body.data, where, "data file")
            if head == 0 and not line_row and not plan.base:
                raise InvalidInputError(f"{where}: the line {plan.line!r} does not exist yet; give the plan a `base`")
            fingerprint = _fingerprint(step.kind, body, {"train": {**plan.train, **body.train},
                                                         "fuse": {**plan.fuse, **body.fuse}}, [body.data])
            done = fingerprint in finished or _learned(known_tasks.get(body.task), versions_by_task.get(body.task), body, where)
            options = plan.train_options(body)
            if weight_bytes is None:
                weight_bytes = _first_weights_bytes(plan, catalog, options)
            estimate = {"examples": min(_count_records(body.data), options.max_examples or 10**12), "weights_bytes": weight_bytes}
            subject = body.task
            head += 0 if done else 1
        elif isinstance(body, AddTaskStep):
            _exists(body.checkpoint, where, "checkpoint")
            for extra in (body.profile, body.calibrate):
                if extra is not None:
                    _exists(extra, where, "file")
            if not plan.base:
                raise InvalidInputError(f"{where}: add-task needs the plan's `base`")
            files = sorted(p for p in body.checkpoint.rglob("*") if p.is_file()) if body.checkpoint.is_dir() else [body.checkpoint]
            fingerprint = _fingerprint(step.kind, body, {}, [*files, *[p for p in (body.profile, body.calibrate) if p]])
            existing = known_tasks.get(body.task)
            if existing and fingerprint not in finished and existing.get("source") != str(body.checkpoint.resolve()):
                raise ConflictError(f"{where}: task {body.task!r} already exists and was not made by this step; rename it")
            done = fingerprint in finished or existing is not None
            estimate = {"weights_bytes": sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))}
            subject = body.task
        elif isinstance(body, FuseStep):
            if body.task not in known_tasks and body.task not in planned_tasks:
                raise NotFoundError(f"{where}: task {body.task!r} is neither in the registry nor made by an earlier step")
            fingerprint = _fingerprint(step.kind, body, {"fuse": {**plan.fuse, **body.fuse}}, [])
            done = fingerprint in finished or body.task in versions_by_task
            estimate = {"weights_bytes": weight_bytes}
            subject = body.task
            head += 0 if done else 1
        else:
            assert isinstance(body, EvalStep)
            for file in body.data.values():
                _exists(file, where, "data file")
            ref = body.ref or plan.line
            line, number = _parse_future_ref(ref, where)
            if line != plan.line:
                if not catalog or not catalog.find("lines", line):
                    raise NotFoundError(f"{where}: line {line!r} does not exist")
            elif isinstance(number, int) and number > head:
                raise NotFoundError(f"{where}: {ref} will not exist at this point (the line reaches v{head})")
            if isinstance(number, str) and not (catalog and catalog.find("aliases", (line, number))):
                raise NotFoundError(f"{where}: line {line!r} has no alias {number!r}")
            settings = plan.eval_settings(body)
            fingerprint = _fingerprint(step.kind, body, {"eval": settings.model_dump(), "head": head}, list(body.data.values()))
            done = fingerprint in finished
            limit = settings.max_examples
            estimate = {"examples": {label: min(_count_records(f), limit or 10**9) for label, f in body.data.items()}}
            subject = f"{line}@{number}" if isinstance(number, str) else f"{line}@v{number if number is not None else head}"
        out.append(PlannedStep(index, step.kind, subject, fingerprint, "done" if done else "pending", estimate))
    return out


def _parse_future_ref(ref: str, where: str) -> tuple[str, int | str | None]:
    """A version reference that may name a version this plan has yet to make."""
    try:
        return parse_ref(ref)
    except Exception as exc:  # noqa: BLE001 — re-raised with the step's place
        raise type(exc)(f"{where}: {exc}") from None


def _named(name: str, where: str) -> None:
    try:
        check_name(name, "task")
    except Exception as exc:  # noqa: BLE001
        raise type(exc)(f"{where}: {exc}") from None


def _exists(path: Path, where: str, what: str) -> None:
    if not path.exists():
        raise NotFoundError(f"{where}: {what} not found: {path}")


def _learned(task_row: dict | None, version: dict | None, body: LearnStep, where: str) -> bool:
    if task_row is None:
        return False
    if task_row.get("data_fingerprint") != sha256_file(body.data) or version is None:
        raise ConflictError(f"{where}: task {body.task!r} already exists and was not made by this step; rename it")
    return True


def _finished_fingerprints(catalog, line: str) -> set[str]:
    if catalog is None:
        return set()
    return {json.loads(row["payload"]).get("fingerprint") if isinstance(row["payload"], str) else row["payload"].get("fingerprint")
            for row in catalog.rows("events", "action = ? and subject = ?", ["plan.step", line])}


def _fingerprint(kind: str, body, settings: dict[str, Any], files: list[Path]) -> str:
    fields = json.loads(body.model_dump_json(by_alias=True))
    digest = {str(p): sha256_file(p) for p in files if p.is_file()}
    text = json.dumps({"kind": kind, "fields": fields, "settings": settings, "files": digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _count_records(path: Path) -> int:
    from kifmerge.training import load_records

    return len(load_records(path))


def _weights_bytes(reg: Registry | None, version: dict | None) -> int | None:
    """Size of the line's newest weights: what each new version of it adds (same layout)."""
    if reg is None or not version:
        return None
    manifest = reg.manifest(version["weights"])
    return sum(reg.blobs.path_of(sha).stat().st_size for name, sha in manifest["files"].items() if name.endswith(".safetensors"))


def _first_weights_bytes(plan: Plan, catalog, options) -> int | None:
    """A new line's first weights, from the base's tensor headers: a LoRA adapter holds
    r·(in + out) float32 values per adapted weight; a full fine-tune, the base's tensors."""
    from kifmerge.checkpoints import open_model
    from kifmerge.training import DEFAULT_TARGETS

    row = catalog.find("bases", plan.base.name) if catalog else None
    path = (row or {}).get("path") or plan.base.path
    try:
        model = open_model(path)
    except Exception:  # noqa: BLE001 — only an estimate: a base the run will register or refuse
        return None
    shapes, dtypes = model.tensors.shapes, model.tensors.dtypes
    if options.mode == "full":
        from kifmerge.fusion.writer import DTYPE_BYTES

        return sum(_numel(shape) * DTYPE_BYTES[dtypes[name]] for name, shape in shapes.items())
    targets = options.target_modules or DEFAULT_TARGETS.get(model.config.get("model_type")) or []
    adapted = [shape for name, shape in shapes.items()
               if len(shape) == 2 and name.endswith(".weight") and name.rsplit(".", 2)[-2] in targets]
    return sum(options.rank * (rows + cols) * 4 for rows, cols in adapted)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
