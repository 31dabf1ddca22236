"""Running a plan file: check every step against the registry before any compute, then run
the steps in order, skipping those already done.

A step's *fingerprint* hashes what it is (its kind, its fields with the plan's defaults
merged in) and what it reads (the sha256 of its data and profile files, each hashed once per
run; a checkpoint's large weight files by size and mtime, so a dry run reads nothing large). A
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
from kifmerge.registry.blobs import sha256_input
from kifmerge.services.common import Progress, check_name, fuse_params, parse_ref

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
    root = registry or resolve_root(None)  # found once: checked and run against the same one (a plan cannot name it)
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
    from kifmerge.services import evaluating, fusing, learning, registry_admin, tasks

    registry_admin.init(registry=root)
    if plan.base and not _has_base(root, plan.base.name):
        registry_admin.add_base(plan.base.name, plan.base.path, copy=plan.base.copy_files, registry=root, progress=progress)
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
                                            calibrate_options={"gram": body.gram},
                                            registry=root, progress=progress)
        elif isinstance(body, FuseStep):
            planned.result = fusing.fuse(body.task, plan.line, **_fuse_kwargs(plan, body), registry=root, progress=progress)
        else:
            settings = plan.eval_settings(body).model_dump()
            planned.result = evaluating.evaluate(body.ref or plan.line, body.data, **settings, registry=root, progress=progress)
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
    """The step's fuse options as `fuse()`'s keyword arguments: the fields of FuseParams that the
    CLI offers too (kifmerge/options.py), lists as tuples."""
    from kifmerge.options import FuseParams, cli_fields

    chosen = {**plan.fuse, **body.fuse}
    if "seed" in chosen:  # DARE's seed, passed under its unambiguous name (learn's `seed` would be the training's)
        chosen["merge_seed"] = chosen.pop("seed")
    unknown = set(chosen) - set(cli_fields(FuseParams)) - {"merge_seed"}
    if unknown:
        raise InvalidInputError(f"fuse option {sorted(unknown)[0]!r} cannot be set in a plan")
    return {key: (tuple(value) if isinstance(value, list) else value) for key, value in chosen.items()}


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
    base_model = _check_base(plan, catalog, line_row)
    weight_bytes = _weights_bytes(reg, line_row and catalog.head(plan.line))
    task_bytes: dict[str, int | None] = {}  # the weights of the tasks add-task steps will register
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
            _as_run(where, _check_learn, plan, body, line_row, catalog)
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
            files = _as_run(where, _check_add_task, body, base_model)
            fingerprint = _fingerprint(step.kind, body, {}, [p for p in (body.profile, body.calibrate) if p], weights=files)
            existing = known_tasks.get(body.task)
            if existing and fingerprint not in finished and existing.get("source") != str(body.checkpoint.resolve()):
                raise ConflictError(f"{where}: task {body.task!r} already exists and was not made by this step; rename it")
            done = fingerprint in finished or existing is not None
            estimate = {"weights_bytes": sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))}
            task_bytes[body.task] = estimate["weights_bytes"]
            subject = body.task
        elif isinstance(body, FuseStep):
            if body.task not in known_tasks and body.task not in planned_tasks:
                raise NotFoundError(f"{where}: task {body.task!r} is neither in the registry nor made by an earlier step")
            _as_run(where, _check_fuse, plan, body, known_tasks.get(body.task), line_row, catalog)
            fingerprint = _fingerprint(step.kind, body, {"fuse": {**plan.fuse, **body.fuse}}, [])
            done = fingerprint in finished or body.task in versions_by_task
            if weight_bytes is None:  # the line's first version: the task's weights as they are, no new blob;
                # each later version of the line adds weights of that layout
                if body.task in task_bytes:
                    weight_bytes = task_bytes[body.task]
                else:
                    weight_bytes = _weights_bytes(reg, known_tasks.get(body.task))
                estimate = {"weights_bytes": None if weight_bytes is None else 0}
            else:
                estimate = {"weights_bytes": weight_bytes}
            subject = body.task
            head += 0 if done else 1
        else:
            assert isinstance(body, EvalStep)
            for label, file in body.data.items():
                _named(label, where, "data label")
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


def _named(name: str, where: str, what: str = "task") -> None:
    try:
        check_name(name, what)
    except Exception as exc:  # noqa: BLE001
        raise type(exc)(f"{where}: {exc}") from None


def _exists(path: Path, where: str, what: str) -> None:
    """As the run will find it: a checkpoint is a folder, any other input a regular file (a
    device, a FIFO or a folder is refused here, not when the step runs)."""
    if what == "checkpoint":
        if not path.is_dir():
            raise NotFoundError(f"{where}: checkpoint not found: {path}" + (" (not a folder)" if path.exists() else ""))
    elif not path.is_file():
        raise NotFoundError(f"{where}: {what} not found: {path}" + (" (not a regular file)" if path.exists() else ""))


def _as_run(where: str, check: Callable, *args: Any) -> Any:
    """Run one of the checks the step's command makes, its error naming the step."""
    from kifmerge.errors import KifError

    try:
        return check(*args)
    except KifError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _check_base(plan: Plan, catalog, line_row: dict | None):
    """The plan's base as the run will use it: registered (its folder still the one registered,
    or a copy in the registry), or registered by the run from `base.path` (a model folder whose
    config and tensor headers read, or a hub id). Returns the opened model, or None when only the
    run can open it (a hub id, a registered copy). Headers only: no weights read, nothing hashed."""
    from kifmerge.checkpoints import open_model
    from kifmerge.errors import IntegrityError, UsageError
    from kifmerge.hub import looks_like_hub_id

    if plan.base is None:
        return None
    check_name(plan.base.name, "base")
    if line_row is not None and line_row["base"] != plan.base.name:
        raise UsageError(f"base: line {plan.line!r} is built on base {line_row['base']!r}, not {plan.base.name!r}")
    row = catalog.find("bases", plan.base.name) if catalog else None
    if row is None:
        if not plan.base.path:
            raise NotFoundError(f"base: {plan.base.name!r} is not in the registry and the plan gives no `path` to register "
                                "it from; add `path:` or register it with `kifmerge base add`")
        if looks_like_hub_id(plan.base.path):
            return None
        return open_model(plan.base.path)
    if plan.base.path:  # registered already: the path must still name that model, or the plan says something else
        if looks_like_hub_id(plan.base.path):
            if plan.base.path != row.get("hub_id"):
                raise UsageError(f"base: {plan.base.name!r} is registered from {row.get('hub_id') or row['path']}, "
                                 f"not {plan.base.path}; drop `path:` or name the base differently")
        elif open_model(plan.base.path).fingerprint != row["fingerprint"]:
            raise UsageError(f"base: {plan.base.path} is not the model registered as {plan.base.name!r} (another "
                             "architecture or tensors); drop `path:` or name the base differently")
    folder = Path(row["path"])
    if folder.is_dir():
        try:
            model = open_model(folder)
            if model.fingerprint == row["fingerprint"]:
                return model
        except (NotFoundError, InvalidInputError):
            pass
    if not row.get("weights"):
        raise IntegrityError(f"base {row['name']}: folder {folder} is missing or changed since it was registered "
                             "(re-register it, or register with --copy to keep a copy in the registry)")
    return None


def _check_learn(plan: Plan, body: LearnStep, line_row: dict | None, catalog) -> None:
    """What `learn` checks before training: the mode against the line's, the LoRA shape options
    against its adapter, the fuse options, the tracker and precision."""
    from kifmerge.errors import UsageError
    from kifmerge.options import training_options

    options = training_options({**plan.train, **body.train})
    fuse_params(**_fuse_kwargs(plan, body))
    if line_row is not None:
        if line_row["kind"] != options.mode:
            raise UsageError(f"line {plan.line!r} holds {line_row['kind']} versions; train it with mode {line_row['kind']}")
        head = catalog.head(plan.line)
        if head is not None and options.mode == "lora":
            from kifmerge.services.learning import _check_rank_options

            _check_rank_options(head["adapter_config"], options, plan.line)
    if options.report_to != "none" or options.fp16:
        from kifmerge.services.preflight import check_training_environment

        check_training_environment(options)


def _check_add_task(body: AddTaskStep, base_model) -> list[Path]:
    """What `add-task` checks before storing anything, from file headers (no weights read, no
    pickles): the checkpoint's kind and tensors, against the base when it can be opened, and the
    profile against the checkpoint's units. Returns the files the step reads (its fingerprint's)."""
    from kifmerge.checkpoints import ADAPTER_CONFIG, open_checkpoint, validate_against_base
    from kifmerge.profiles import read_profile

    ckpt = open_checkpoint(body.checkpoint)
    if base_model is not None:
        validate_against_base(ckpt, base_model)
    if body.profile:
        read_profile(body.profile, ckpt.layout)
    if body.calibrate:
        from kifmerge.data import load_records

        load_records(body.calibrate)
    side = [ADAPTER_CONFIG] if ckpt.kind == "lora" else ["config.json", "generation_config.json", "model.safetensors.index.json"]
    return sorted({*ckpt.tensors.files.values(), *[ckpt.path / n for n in side if (ckpt.path / n).is_file()]})


def _check_fuse(plan: Plan, body: FuseStep, task_row: dict | None, line_row: dict | None, catalog) -> None:
    """What `fuse` checks before computing: its options, and for a task already registered its
    profile and that its base and kind are the line's."""
    params = fuse_params(**_fuse_kwargs(plan, body))
    if task_row is None:
        return
    from kifmerge.services.fusing import check_profile_for

    check_profile_for(params.method, task_row["name"], catalog.find("profiles", task_row["name"]),
                      chosen="method" in params.model_fields_set)
    if line_row is not None and (line_row["base"], line_row["kind"]) != (task_row["base"], task_row["kind"]):
        raise InvalidInputError(f"line {plan.line!r} holds {line_row['kind']} versions of base {line_row['base']!r}; "
                                f"task {task_row['name']!r} is {task_row['kind']} on base {task_row['base']!r}")


def _learned(task_row: dict | None, version: dict | None, body: LearnStep, where: str) -> bool:
    if task_row is None:
        return False
    if task_row.get("data_fingerprint") != sha256_input(body.data) or version is None:
        raise ConflictError(f"{where}: task {body.task!r} already exists and was not made by this step; rename it")
    return True


def _finished_fingerprints(catalog, line: str) -> set[str]:
    if catalog is None:
        return set()
    return {json.loads(row["payload"]).get("fingerprint") if isinstance(row["payload"], str) else row["payload"].get("fingerprint")
            for row in catalog.rows("events", "action = ? and subject = ?", ["plan.step", line])}


SMALL_FILE = 16 * 1024 * 1024  # a checkpoint's files larger than this enter a fingerprint by size and mtime, unread


def _fingerprint(kind: str, body, settings: dict[str, Any], files: list[Path], weights: list[Path] = ()) -> str:
    """The step's identity: its fields and settings, the sha256 of the files it reads (data and
    profiles, bounded by the data limit; each hashed once per process: `sha256_input`), and of a
    checkpoint's files (`weights`) those up to 16 MiB, the larger ones by size and mtime (a dry
    run hashes nothing large)."""
    fields = json.loads(body.model_dump_json(by_alias=True))
    if "gram" in fields and not fields["gram"]:  # an add-task field added later: absent unless on, so older runs' identities hold
        del fields["gram"]
    digest = {str(p): sha256_input(p) for p in files if p.is_file()}
    for p in weights:
        info = p.stat()
        digest[str(p)] = sha256_input(p) if info.st_size <= SMALL_FILE else f"size {info.st_size} mtime {info.st_mtime_ns}"
    text = json.dumps({"kind": kind, "fields": fields, "settings": settings, "files": digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_record_counts: dict[tuple, int] = {}


def _count_records(path: Path) -> int:
    """Records in a data file (validated as the run will read it), read once per process."""
    from kifmerge.data import load_records

    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _record_counts:
        _record_counts[key] = len(load_records(path))
    return _record_counts[key]


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
    from kifmerge.modeling import DEFAULT_TARGETS

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
