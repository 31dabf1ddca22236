"""Resuming an interrupted training (`train/learn --resume`).

While it trains, a run saves a Trainer checkpoint every `--save-steps` optimizer steps into a
folder of the registry's staging area, `tmp/resume-KEY/checkpoint-STEP/`. KEY fingerprints what
the run trains — task name, the version it starts from, the data's sha256 and the training
options that change the result — so a re-run with the same inputs finds it and a run with other
inputs never does. Beside the Trainer's files (weights, optimizer, scheduler and RNG state,
written by the Trainer in its own format) each checkpoint holds the importance accumulator's
EMAs as safetensors (`kifmerge-importance.safetensors`, written last: a checkpoint without it
is incomplete and ignored). `--resume` continues from the newest complete checkpoint; the
folder is removed once the task is committed. Trainer checkpoints are only ever loaded from
kifmerge's own staging folder.

`kifmerge gc` treats the folders like any staging leftover: kept while younger than its grace
period (the age of the newest file inside), reported and removed after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

from kifmerge.errors import InvalidInputError
from kifmerge.options import TrainOptions

PREFIX = "resume-"
STATE_FILE = "kifmerge-importance.safetensors"
# marks Gram sums that are every process's (GramCollector.totals); a multi-process checkpoint without it
# holds the main process's share only
GRAM_SUMS_OF_EVERY_PROCESS = ("gram-sums", "every-process")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def resume_key(task: str, start: str, data_sha256: str, opts: TrainOptions) -> str:
    """Fingerprint of a training run's inputs: task, starting point (LINE@vN, or base:NAME for a
    new line), data and the options that change the result."""
    options = {k: v for k, v in json.loads(opts.model_dump_json()).items() if k not in TrainOptions.watch_only()}
    options["gram"] = opts.records_grams  # what it does (the default is on for LoRA): a run from before keeps its key with --no-gram
    payload = json.dumps({"task": task, "start": start, "data": data_sha256, "options": options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def resume_folder(staging_root: Path, key: str) -> Path:
    return Path(staging_root) / f"{PREFIX}{key}"


def newest_checkpoint(folder: Path | None) -> Path | None:
    """The complete checkpoint with the highest step (None when there is none)."""
    if folder is None or not folder.is_dir():
        return None
    complete = [(int(m[1]), p) for p in folder.iterdir()
                if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file() and (p / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def prepare(folder: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from (with `resume`), else None; a run that does not resume
    starts the folder afresh. Notes on stderr say which."""
    found = newest_checkpoint(folder)
    if resume and found is not None:
        note(f"resuming from step {found.name.split('-')[1]} of an interrupted run ({found.parent.name})")
        return found
    if resume:
        note("--resume: no saved checkpoint of a run with these inputs; training from the start")
    elif found is not None:
        note(f"discarding the checkpoint (step {found.name.split('-')[1]}) of an interrupted run with these inputs; "
             "pass --resume to continue such a run")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def discard_if_empty(folder: Path | None) -> None:
    """Remove a checkpoint folder that holds nothing to resume from (interrupted before its first save)."""
    if folder is not None and folder.is_dir() and newest_checkpoint(folder) is None:
        shutil.rmtree(folder, ignore_errors=True)


def note(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"kifmerge: note: {message}", file=sys.stderr, flush=True)


# ---- the importance accumulator's state ------------------------------------------------------
def save_importance(accumulator, path: Path, grams: dict[str, torch.Tensor] | None = None) -> None:
    """The accumulator's EMAs (Ī, Ū) and counters as safetensors, written under a temporary name
    and renamed (the file marks its checkpoint complete); with `grams` (a GramCollector's totals),
    the Gram sums so far, packed as in a profile."""
    from kifmerge.profiles import gram_entries

    tensors = {f"ipt.{n}": t.detach().cpu().contiguous() for n, t in accumulator.ipt.items()}
    tensors |= {f"unc.{n}": t.detach().cpu().contiguous() for n, t in accumulator.unc.items()}
    metadata = {"format": "kifmerge-importance-state", "estimator": accumulator.estimator,
                "steps": str(accumulator.steps), "skipped": str(accumulator.skipped)}
    if grams is not None:
        gram_tensors, gram_meta = gram_entries({n: g.detach().cpu() for n, g in grams.items()})
        tensors |= gram_tensors
        metadata |= {"gram-modules": json.dumps(sorted(grams)), **gram_meta}
        metadata[GRAM_SUMS_OF_EVERY_PROCESS[0]] = GRAM_SUMS_OF_EVERY_PROCESS[1]
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(tensors, str(temp), metadata=metadata)
    os.replace(temp, path)


@torch.no_grad()
def load_importance(accumulator, path: Path, grams=None, *, main_process: bool = True,
                    reduced_precision: bool = False) -> None:
    """Restore what `save_importance` wrote; `grams` (a GramCollector) gets the Gram sums so far, so a
    resumed `--gram` run's matrices cover every step, not only those after the resume (in a
    data-parallel run on the main process only: the saved sums are every rank's already).
    `reduced_precision`: the run trains under --bf16/--fp16, where an older kifmerge summed them
    in bfloat16."""
    from kifmerge.profiles import GRAM, grams_precise, read_grams

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = {name for name in handle.keys() if not name.startswith(GRAM)}
        expected = {f"{kind}.{n}" for kind in ("ipt", "unc") for n in accumulator.params}
        if metadata.get("estimator") != accumulator.estimator or names != expected:
            raise InvalidInputError(f"the saved importance state in {path.parent} does not match this run's trainable "
                                    "parameters; run without --resume to start afresh")
        for name in accumulator.params:
            accumulator.ipt[name].copy_(handle.get_tensor(f"ipt.{name}"))
            accumulator.unc[name].copy_(handle.get_tensor(f"unc.{name}"))
    accumulator.steps, accumulator.skipped = int(metadata["steps"]), int(metadata["skipped"])
    if grams is not None:
        modules = json.loads(metadata.get("gram-modules", "[]"))
        saved = read_grams(path, modules) if modules else None
        if saved is None and accumulator.steps > 0:
            raise InvalidInputError(f"the checkpoint in {path.parent} was saved without --gram: its Gram matrices would "
                                    "cover only the steps after it; run without --resume to start afresh")
        if saved is not None and saved_by_several_processes(path.parent) and \
                metadata.get(GRAM_SUMS_OF_EVERY_PROCESS[0]) != GRAM_SUMS_OF_EVERY_PROCESS[1]:
            raise InvalidInputError(f"the checkpoint in {path.parent} was saved by several processes with a kifmerge "
                                    "that kept only the main process's Gram sums; run without --resume to start afresh")
        if saved is not None and reduced_precision and not grams_precise(path):
            raise InvalidInputError(f"the checkpoint in {path.parent} holds Gram sums that a kifmerge before 2026-12-06 "
                                    "took in bfloat16 under --bf16/--fp16 (too imprecise for RegMean); run without "
                                    "--resume to start afresh")
        device = next(iter(accumulator.ipt.values())).device
        # read_grams gives modules that share a matrix one tensor: moved once, they share one buffer again
        moved: dict[int, torch.Tensor] = {}
        for gram in (saved or {}).values():
            if id(gram) not in moved:
                moved[id(gram)] = gram.to(device)
        grams.start_from({name: moved[id(gram)] for name, gram in (saved or {}).items()}, main_process=main_process)


def saved_by_several_processes(checkpoint: Path) -> bool:
    """The Trainer writes one RNG state per process (`rng_state_N.pth`) when it runs on several, one
    `rng_state.pth` otherwise: the file names tell, nothing is unpickled."""
    return any(checkpoint.glob("rng_state_*.pth"))


class ImportanceCheckpoint(TrainerCallback):
    """Writes the accumulator's state into each checkpoint right after the Trainer saved it.
    The Trainer's extra save at the last step is skipped: the run is about to save its result
    anyway, and optimizer state for nothing left to train is only I/O."""

    def __init__(self, accumulator):
        self.accumulator = accumulator
        self.grams = None  # a GramCollector, when the run records Gram matrices (train --gram)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        grams = self.grams.totals() if self.grams is not None else None  # every rank takes part in the sum
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                save_importance(self.accumulator, folder / STATE_FILE, grams)
