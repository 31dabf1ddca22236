"""Training a task (and fusing it, for `learn`) from a line's newest version."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kifmerge.errors import ConflictError, InvalidInputError, NotFoundError, UsageError
from kifmerge.faults import fault_point
from kifmerge.fusion.methods import COMPUTED_BY_THE_FUSE
from kifmerge.options import FuseParams, TrainOptions, grams_recorded, training_options
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_input
from kifmerge.services.common import (
    Progress,
    base_dir,
    check_name,
    fuse_params,
    opened,
    public_task,
    public_version,
    refuse_task_named_like_a_new_line,
)
from kifmerge.services.fusing import as_list, commit_version, stage_version, version_holding
from kifmerge.services.tasks import StagedTask, commit_task, refuse_existing_task, stage_task
from kifmerge.services.validation import store_validation


def train(task: str, data: str | Path, line: str, *, base: str | None = None, options: dict[str, Any] | None = None,
          val: str | Path | None = None, registry: str | os.PathLike | None = None,
          progress: Progress = None) -> dict[str, Any] | None:
    """Fine-tune from LINE's newest version (or from the base when the line is empty), record
    the importance profile while training, and register TASK (with its validation examples
    `val`, for validated fuses). Returns None on non-main ranks."""
    from kifmerge.training import wait_for_main_process

    opts = training_options(options)
    check_name(task, "task")
    check_name(line, "line")
    with opened(registry) as reg:
        validation = store_validation(reg, val) if val else None  # a bad file fails before the training
        with _trained_task(reg, task, Path(data), line, base, opts, progress) as staged:
            if staged is not None:
                staged.row["validation"] = validation
                with reg.catalog.transaction():
                    commit_task(reg, staged)
    wait_for_main_process()
    return staged.public() if staged else None


def learn(task: str, data: str | Path, into: str, *, base: str | None = None, options: dict[str, Any] | None = None,
          rebase: bool = False, val: str | Path | None = None, max_regression: float | None = None,
          registry: str | os.PathLike | None = None, progress: Progress = None, **fuse_options: Any) -> dict[str, Any] | None:
    """The pipeline step: train TASK from INTO's newest version, then fuse it into INTO.
    Task and version are committed in one transaction: both, or nothing.

    Run again with the same inputs, it finds the previous result instead of training again:
    when task TASK exists, was trained in INTO on data with the same sha256 and the same
    training options, and its fuse (with the same fuse options) is in INTO's head, that
    version is returned with `reused: true`. The same name with other inputs is refused
    (ConflictError, exit 6) with what differs.

    Learns run at once: two of the same TASK on one machine take turns (the second waits, then
    returns the first's result, `reused: true`); on different machines both train and the second
    to commit returns the first's result. A learn whose line gained a version while it trained
    (its task started from a head that is no longer the head) fails with exit 6 naming both, and
    leaves nothing behind, unless `rebase`: then it is fused onto the new head and the result and
    the `fuse` event record `rebased: {"trained_from", "head"}` (and `stale_start`).

    `val`: the task's validation examples, stored with it; `max_regression`: the fuse's quality
    gate (services/validation.py): a refused version leaves neither task nor version behind.
    `options`: the training options (`kifmerge.options.TrainOptions`' fields); `fuse_options`:
    the fusion parameters, as `fuse` takes them."""
    from kifmerge.services.fusing import check_max_regression
    from kifmerge.training import wait_for_main_process

    if fuse_options.get("seed") is not None:  # FuseParams' own name for DARE's seed; here it reads as the training's
        raise UsageError("learn(seed=…) is ambiguous: give the training seed as options={'seed': …} and DARE's as merge_seed=…")
    opts = training_options(options)
    params = fuse_params(**fuse_options)
    check_max_regression(max_regression)
    check_name(task, "task")
    check_name(into, "line")
    result = None
    with opened(registry) as reg:
        validation = store_validation(reg, val) if val else None  # a bad file fails before the training
        previous = _previous_learn(reg, task, Path(data), into, base, opts, params)
        if previous is not None:
            return previous if int(os.environ.get("RANK", "0")) == 0 else None
        if reg.catalog.find("lines", into) is None:  # before hours of training, not at the fuse after them
            refuse_task_named_like_a_new_line(reg, into, also=task)
        with _learn_lock(reg, task):
            previous = _previous_learn(reg, task, Path(data), into, base, opts, params)  # the learn we waited for
            if previous is not None:
                return previous if int(os.environ.get("RANK", "0")) == 0 else None
            with _trained_task(reg, task, Path(data), into, base, opts, progress) as staged:
                if staged is not None:
                    staged.row["validation"] = validation
                    fault_point("learn.task-staged")
                    result = _fuse_learned(reg, staged, task, Path(data), into, base, opts, params, rebase, progress,
                                           max_regression)
    wait_for_main_process()
    return result


class _TaskLanded(Exception):
    """Inside the commit: task TASK was committed by another learn meanwhile."""


def _fuse_learned(reg: Registry, staged: StagedTask, task: str, data: Path, into: str, base: str | None,
                  opts: TrainOptions, params: FuseParams, rebase: bool, progress: Progress,
                  max_regression: float | None = None) -> dict[str, Any]:
    """Fuse the trained task into the line and commit both, unless the line moved since the
    training started (exit 6; with `rebase`, onto the new head) or an identical learn committed
    TASK meanwhile (its result, `reused: true`)."""
    from kifmerge.services.fusing import REBASE_ATTEMPTS

    started = staged.row["trained_from"]  # LINE@vN, N = 0 for a new line
    for attempt in range(1, REBASE_ATTEMPTS + 1):
        if reg.catalog.find("tasks", task) is not None:
            return _previous_learn(reg, task, data, into, base, opts, params)
        head = reg.catalog.head(into)
        now_at = f"{into}@v{head['number'] if head else 0}"
        if now_at != started and not rebase:
            raise ConflictError(f"line {into!r} moved to {now_at} while task {task!r} trained from {started}; nothing was "
                                f"recorded. Run the command again to train from {now_at}, or pass --rebase to fuse the "
                                "task onto the new head anyway",
                                details={"error": "conflict", "reason": "line-moved", "task": task, "line": into,
                                         "trained_from": started, "head": now_at})
        version = stage_version(reg, staged.row, staged.profile_row["scores"], into, params, progress,
                                max_regression=max_regression)
        if now_at != started:
            version.notes["rebased"] = {"trained_from": started, "head": now_at}
        fault_point("learn.version-staged")
        try:
            with reg.catalog.transaction():
                if reg.catalog.find("tasks", task) is not None:
                    raise _TaskLanded
                commit_task(reg, staged)
                fault_point("learn.task-row")
                commit_version(reg, version)
            return {**version.public(), "trained": staged.public(), "reused": False}
        except _TaskLanded:
            return _previous_learn(reg, task, data, into, base, opts, params)
        except ConflictError:  # the line moved between staging and commit
            if not rebase or attempt == REBASE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


@contextmanager
def _learn_lock(reg: Registry, task: str) -> Iterator[None]:
    """One `learn` of TASK at a time on this machine (a lock file in the system's temporary
    folder, keyed by the registry and the task; nothing is written into the registry): a second
    identical learn waits and then returns the first's result instead of training again. Not
    under torchrun / accelerate, whose ranks must train together."""
    import fcntl
    import hashlib
    import sys
    import tempfile

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    key = hashlib.sha256(f"{reg.root.resolve()}\0{task}".encode()).hexdigest()[:24]
    try:  # one folder per user: another user's cannot refuse us
        folder = Path(tempfile.gettempdir()) / f"kifmerge-locks-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        handle = open(folder / f"learn-{key}", "a+")
    except OSError:  # no usable temporary folder: the commit-time check still returns one result
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kifmerge: another `learn` of task {task!r} is running on this registry; waiting for it", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _previous_learn(reg: Registry, task: str, data: Path, line: str, base: str | None, opts: TrainOptions,
                    params: FuseParams) -> dict[str, Any] | None:
    """The result of an earlier `learn` of TASK into LINE with the same inputs (None when TASK
    does not exist yet); ConflictError, saying what differs, when TASK exists otherwise."""
    row = reg.catalog.find("tasks", task)
    if row is None:
        return None
    line_row = reg.catalog.find("lines", line)
    if line_row is not None and base is not None and base != line_row["base"]:
        raise UsageError(f"line {line!r} is built on base {line_row['base']!r}, not {base!r}")
    config = row.get("training_config") or {}
    choose = "choose another task name"
    if not (config.get("data") or {}).get("sha256"):
        raise ConflictError(f"task {task!r} already exists (registered with add-task, not learned); {choose}")
    if not data.is_file():
        raise NotFoundError(f"data file not found: {data}")
    sha = sha256_input(data)
    if sha != config["data"]["sha256"]:
        raise ConflictError(f"task {task!r} already exists, trained on other data ({config['data'].get('path')}, "
                            f"sha256 {config['data']['sha256'][:12]}…; {data} has {sha[:12]}…); {choose}")
    differ = _option_differences(config, opts)
    if differ:
        raise ConflictError(f"task {task!r} already exists, trained with other options ({'; '.join(differ)}); {choose}")
    started = (row.get("trained_from") or "").rpartition("@v")[0]
    version = version_holding(reg, line, task) if line_row is not None and started == line else None
    if version is None:
        where = f"trained from {row['trained_from']}" if row.get("trained_from") else "trained"
        raise ConflictError(f"task {task!r} already exists ({where}) but line {line!r} does not hold it; fuse it with "
                            f"`kifmerge fuse {task} --into {line}`, or {choose}")
    params = _as_fused(params, opts, version)
    asked = (params.method, json.loads(json.dumps(params.recorded())))
    if version["method"] != "initial" and (version["method"], _comparable(version["params"] or {})) != asked:
        raise ConflictError(f"task {task!r} was already learned into {line}@v{version['number']} with other fuse options "
                            f"(method {version['method']}, {json.dumps(_comparable(version['params'] or {}), sort_keys=True)}); "
                            f"{choose}")
    profile = reg.catalog.find("profiles", task)
    metrics = {k: v for k, v in (row.get("metrics") or {}).items() if k != "curve"} or None
    trained = {**public_task(row), "metrics": metrics,
               "profile": {"estimator": profile["estimator"], **(profile["layout"] or {})} if profile else None}
    return {**public_version(version, line_row["kind"]), "stale_start": None, "trained": trained, "reused": True}


def _as_fused(params: FuseParams, opts: TrainOptions, version: dict[str, Any]) -> FuseParams:
    """The parameters the fuse ran with: the default's fallback where it fell back (the version
    says so) or had to (the task recorded no Gram matrices), else `params` as given."""
    from kifmerge.services.fusing import GRAM_FALLBACK

    if "method" in params.model_fields_set or params.method not in GRAM_FALLBACK:
        return params
    if "fallback" in (version["params"] or {}) or not opts.records_grams:
        return params.model_copy(update={"method": GRAM_FALLBACK[params.method]})
    return params


def _comparable(recorded: dict[str, Any]) -> dict[str, Any]:
    """A version's recorded fuse parameters less what the fuse computed (its summaries, the α a
    validated fuse chose), so that the same learn asked again matches it."""
    chosen = ("alpha",) if "selection" in recorded else ()
    return {k: v for k, v in recorded.items() if k not in COMPUTED_BY_THE_FUSE + chosen}


def _option_differences(config: dict[str, Any], opts: TrainOptions) -> list[str]:
    """`option: recorded ≠ given` for each training option that differs from a task's recorded
    training config (an option recorded before it existed counts as its default). `lr` is
    compared as the effective learning rate; the watch-only options not at all."""
    defaults = json.loads(TrainOptions().model_dump_json())
    skipped = TrainOptions.watch_only() | {"lr"}
    given = json.loads(opts.model_dump_json())
    out = []
    for key, value in given.items():
        recorded = config.get(key, defaults[key])
        if key == "gram":  # compared as what it does: None means on for LoRA (since 2026-12-06), off for full
            was, now = grams_recorded(config), opts.records_grams
            if was != now:
                out.append(f"--gram: {'on' if was else 'off'} ≠ {'on' if now else 'off'}"
                           + (" (on by default for LoRA since 2026-12-06: --no-gram matches the earlier run)" if now else ""))
            continue
        if key == "replay":  # recorded as replay_fraction (the `replay` entry lists what was replayed)
            recorded = config.get("replay_fraction", 0.0 if config.get("replay") is None else "unrecorded")
        if key not in skipped and recorded != value:
            out.append(f"--{key.replace('_', '-')}: {recorded} ≠ {value}")
    if config.get("learning_rate") is not None and config["learning_rate"] != opts.learning_rate:
        out.append(f"--lr: {config['learning_rate']} ≠ {opts.learning_rate}")
    return out


@contextmanager
def _trained_task(reg: Registry, task: str, data: Path, line: str, base: str | None, opts: TrainOptions,
                  progress: Progress) -> Iterator[StagedTask | None]:
    """Run the training for TASK and stage its blobs; the staging folder lives for the block.
    The run's resumable checkpoints (kifmerge/resume.py) outlive an interruption and are removed
    once the block has committed."""
    from kifmerge.services.preflight import check_training_environment, tracker_environment
    from kifmerge.resume import discard_if_empty, resume_folder, resume_key
    from kifmerge.data import load_records, split_records
    from kifmerge.training import run_training

    refuse_existing_task(reg, task)
    line_row = reg.catalog.find("lines", line)
    if line_row is None and base is None:
        raise UsageError(f"line {line!r} does not exist yet; give --base NAME to start it from a base model")
    if line_row is not None and base is not None and base != line_row["base"]:
        raise UsageError(f"line {line!r} is built on base {line_row['base']!r}, not {base!r}")
    base_row = reg.catalog.get("bases", line_row["base"] if line_row else base, "base")
    if line_row is not None and line_row["kind"] != opts.mode:
        raise UsageError(f"line {line!r} holds {line_row['kind']} versions; train it with --mode {line_row['kind']}")
    check_training_environment(opts)
    head = reg.catalog.head(line)
    records = load_records(data, opts.max_examples)
    train_set, val_set = split_records(records, opts.val_fraction, opts.seed)
    replayed = _replay_examples(reg, line, opts, len(train_set))
    # --recurrent: the replayed examples are the outer loop's buffer, not part of the training set
    mixed, outer = ([], replayed["examples"]) if opts.recurrent else (replayed["examples"], [])
    if opts.recurrent and not outer:
        raise InvalidInputError(f"--recurrent: --replay {opts.replay:g} of {len(train_set)} training examples replays none; "
                                "raise --replay so that the outer loop has examples")
    folder = base_dir(reg, base_row)
    data_sha = sha256_input(data)
    start = f"{line}@v{head['number']}" if head else f"base:{base_row['name']}:{base_row['fingerprint']}"
    # a --recurrent run keeps no resumable checkpoints: its cycle state is not saved with them, and a
    # resumed run would differ from an uninterrupted one (kifmerge/recurrent.py)
    resumable = opts.save_steps and not opts.recurrent
    checkpoints = resume_folder(reg.blobs.staging, resume_key(task, start, data_sha, opts)) if resumable else None
    staging = reg.blobs.staging_dir()
    try:
        init_dir = None
        if head is not None:
            if opts.mode == "lora":
                _check_rank_options(head["adapter_config"], opts, line)
            init_dir = staging / "init"
            init_dir.mkdir()
            reg.copy_weights(head["weights"], init_dir)
        with tracker_environment(opts, task, line):
            result = run_training(folder, base_row["config"], opts, init_dir, train_set + mixed, val_set,
                                  staging, progress, f"training {task}", checkpoints, run_name=task, outer=outer)
        if result is None:
            yield None
            return
        fault_point("train.done")
        training_config = {**opts.model_dump(), "learning_rate": opts.learning_rate,
                           "data": {"path": str(data.resolve()), "sha256": data_sha},
                           "replay": replayed["sources"], "replay_fraction": opts.replay,  # "replay": what was replayed
                           "started_from": f"{line}@v{head['number']}" if head else "base"}
        yield stage_task(reg, task, result.checkpoint, base_row, result.profile, f"{line}@v{head['number'] if head else 0}",
                          progress, source=f"train:{data.resolve()}", estimator=opts.importance,
                          training_config=training_config, data_fingerprint=training_config["data"]["sha256"],
                          metrics=result.metrics)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # committed: nothing left to resume
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        discard_if_empty(checkpoints)


def _check_rank_options(line_config: dict, opts: TrainOptions, line: str) -> None:
    """A line's later tasks continue its adapter: the LoRA shape options cannot change."""
    for option, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        given = getattr(opts, option)
        if given is not None and given != line_config.get(key):
            raise UsageError(f"line {line!r} has LoRA {key}={line_config.get(key)}; --{option.replace('_', '-')} {given} "
                             "cannot change it (tasks continue the line's adapter)")
    if opts.target_modules and set(opts.target_modules) != set(as_list(line_config.get("target_modules"))):
        raise UsageError(f"line {line!r} adapts {sorted(as_list(line_config.get('target_modules')))}; "
                         "--target-modules cannot change that")


def _replay_examples(reg: Registry, line: str, opts: TrainOptions, n_train: int) -> dict[str, Any]:
    """`--replay F`: that fraction of the training set drawn from the data of the line's earlier
    tasks (files found by recorded path and checked against their recorded sha256); with
    `--recurrent`, the outer loop's buffer instead of a part of the training set."""
    import random

    from kifmerge.data import load_records

    if not opts.replay:
        return {"examples": [], "sources": None}
    pool, sources = [], []
    for version in reg.catalog.rows("versions", "line = ?", [line], order_by="number"):
        task = reg.catalog.find("tasks", version["task"]) if version["task"] else None
        data = ((task or {}).get("training_config") or {}).get("data")
        if not data:
            continue
        path = Path(data["path"])
        if not path.is_file() or sha256_input(path) != data["sha256"]:
            raise InvalidInputError(f"--replay needs the data of task {task['name']!r} ({path}), which is missing or "
                                    "changed since it was trained; restore it or train without --replay")
        pool.extend(load_records(path))
        sources.append({"task": task["name"], "sha256": data["sha256"]})
    if not pool:
        raise InvalidInputError(f"--replay: line {line!r} has no earlier task with recorded training data")
    count = min(len(pool), round(n_train * opts.replay / (1 - opts.replay)))
    return {"examples": random.Random(opts.seed).sample(pool, count), "sources": {"tasks": sources, "examples": count}}
