"""A task's validation examples, and fuses that look at them.

`train`, `learn` and `add-task --val FILE` store a task's validation records in the registry (a
content-hashed blob, like every other; the task row says which). A fuse can then
- choose its mixing weight on them (`--method validated`): every α of a small grid is tried as
  `linear`, each candidate scored on the validation examples of every task the line holds and
  of the new one, and the best mean wins; the choice and every score are recorded;
- refuse to create a version that costs an earlier task more than `--max-regression` points
  on its validation examples against the head (exit 6, nothing written): a quality gate.

Candidates are scored in memory on one model (base + a LoRA adapter whose weights are swapped
per candidate), by greedy generation and exact match, as `kifmerge eval` scores; answers stop
after the longest reference's tokens plus one, which cannot change a match. LoRA lines only:
a full line's candidate would be a whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kifmerge.errors import ConflictError, InvalidInputError
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_input

VALIDATION_BATCH = 32
MAX_ANSWER_TOKENS = 64


def store_validation(reg: Registry, path: str | os.PathLike) -> dict[str, Any]:
    """Read a validation file (the formats training reads) into a registry blob; the task row's
    `validation` column holds what this returns."""
    from kifmerge.data import load_records

    records = load_records(Path(path))
    if not records:
        raise InvalidInputError(f"{path}: no validation records")
    blob = reg.blobs.put_bytes(json.dumps([{"input": r["input"], "output": r["output"]} for r in records]).encode())
    return {"blob": blob, "records": len(records), "data_fingerprint": sha256_input(Path(path)), "source": str(Path(path).resolve())}


def read_validation(reg: Registry, task_row: dict, max_examples: int) -> list[dict] | None:
    """The first `max_examples` validation records of a task (verified read), or None."""
    validation = task_row.get("validation")
    if not validation:
        return None
    return json.loads(reg.blobs.read_bytes(validation["blob"]))[:max_examples]


def held_tasks(reg: Registry, line: str) -> list[str]:
    """The tasks LINE's head holds, in the order they were fused (a rollback to vN holds what vN held)."""
    from kifmerge.registry.catalog import held_tasks as of_versions

    return of_versions(reg.catalog.rows("versions", "line = ?", [line]))


def validation_sets(reg: Registry, line: str, task_row: dict, max_examples: int) -> dict[str, list[dict]]:
    """Task name → validation records, for every task the line holds that has some, and the new task."""
    sets = {}
    for name in [*held_tasks(reg, line), task_row["name"]]:
        row = task_row if name == task_row["name"] else reg.catalog.find("tasks", name)
        records = read_validation(reg, row, max_examples) if row else None
        if records:
            sets[name] = records
    return sets


@dataclass
class CandidateScorer:
    """One model (the base with a LoRA adapter) whose adapter weights are swapped per candidate."""

    model: Any
    tokenizer: Any
    seq2seq: bool
    bf16: bool
    max_length: int
    scored: int = 0

    def score(self, state: dict[str, Any], sets: dict[str, list[dict]]) -> dict[str, float]:
        """Exact match per task of the adapter `state` (tensor name → tensor, as stored)."""
        from peft import set_peft_model_state_dict

        from kifmerge.evaluation import generate_answers, score

        set_peft_model_state_dict(self.model, state)
        out = {}
        for name, records in sets.items():
            answers = generate_answers(self.model, self.tokenizer, [r["input"] for r in records], seq2seq=self.seq2seq,
                                       max_new_tokens=MAX_ANSWER_TOKENS, max_length=self.max_length,
                                       batch_size=VALIDATION_BATCH, bf16=self.bf16, references=[r["output"] for r in records])
            out[name] = round(score(answers, [r["output"] for r in records])["exact_match"], 6)
            self.scored += len(records)
        return out


def open_scorer(reg: Registry, base_row: dict, adapter_weights: str, max_length: int) -> CandidateScorer:
    """The base model with the adapter of `adapter_weights` (a weights manifest sha) attached, unmerged."""
    import shutil

    from kifmerge.modeling import is_seq2seq, load_model, load_tokenizer
    from kifmerge.precision import bf16_support
    from kifmerge.services.common import base_dir

    folder = base_dir(reg, base_row)
    staging = reg.blobs.staging_dir()
    try:
        reg.copy_weights(adapter_weights, staging)
        model = load_model(folder, base_row["config"], adapter_dir=staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    model.eval()
    return CandidateScorer(model, load_tokenizer(folder), is_seq2seq(base_row["config"]), bf16_support()[0], max_length)


def adapter_tensors(files: dict[str, Path]) -> dict[str, Any]:
    """Every tensor of an adapter's safetensors files (small: an adapter, not a model)."""
    from safetensors.torch import load_file

    state = {}
    for name, path in files.items():
        if name.endswith(".safetensors"):
            state.update(load_file(path))
    return state


@dataclass
class ValidatedFuse:
    """What a fuse with validation needs: the scorer, the validation sets, the head's scores."""

    scorer: CandidateScorer
    sets: dict[str, list[dict]]
    head_state: dict[str, Any]
    new_state: dict[str, Any]
    head_scores: dict[str, float] = field(default_factory=dict)

    def earlier(self, new_task: str) -> list[str]:
        return [name for name in self.sets if name != new_task]

    def choose_alpha(self, grid: tuple[float, ...], new_task: str) -> tuple[float, dict]:
        """The α of the grid whose linear mix has the best mean exact match over the tasks with
        validation examples (a tie goes to the α nearest 0.5); every candidate's scores."""
        scores = {}
        for alpha in grid:
            state = {k: (1 - alpha) * self.head_state[k].float() + alpha * self.new_state[k].float() for k in self.new_state}
            scores[alpha] = self.scorer.score(state, self.sets)
        mean = {a: sum(s.values()) / len(s) for a, s in scores.items()}
        best = max(grid, key=lambda a: (round(mean[a], 9), -abs(a - 0.5)))
        return best, {"grid": list(grid), "mean": {str(a): round(m, 6) for a, m in mean.items()},
                      "scores": {str(a): s for a, s in scores.items()}}

    def check_regression(self, fused: dict[str, Any], max_regression: float, new_task: str, version: str) -> dict:
        """Scores of the fused adapter; ConflictError when an earlier task loses more than
        `max_regression` points (×100 exact match) against the head."""
        earlier = self.earlier(new_task)
        if not earlier:
            return {"max_regression": max_regression, "checked": [], "note": "no earlier task has validation examples"}
        if not self.head_scores:
            self.head_scores = self.scorer.score(self.head_state, {n: self.sets[n] for n in earlier})
        after = self.scorer.score(fused, {n: self.sets[n] for n in earlier})
        drops = {n: round(100 * (self.head_scores[n] - after[n]), 2) for n in earlier}
        worst = max(drops, key=drops.get)
        if drops[worst] > max_regression + 1e-9:
            raise ConflictError(
                f"{version} not created: task {worst!r} would drop {drops[worst]:.1f} points on its validation examples "
                f"({100 * self.head_scores[worst]:.1f} → {100 * after[worst]:.1f}), more than --max-regression "
                f"{max_regression:g}; nothing was written",
                details={"error": "conflict", "reason": "max-regression", "version": version, "drops": drops,
                         "head": self.head_scores, "fused": after, "max_regression": max_regression})
        return {"max_regression": max_regression, "drops": drops, "head": self.head_scores, "fused": after}


def open_validated_fuse(reg: Registry, task_row: dict, line: str, head: dict, *, val_examples: int,
                        max_length: int = 256) -> ValidatedFuse:
    """Load what a validated fuse of a LoRA task into LINE's head needs; refused with one line
    when the line is not LoRA or no task has validation examples."""
    if task_row["kind"] != "lora":
        raise InvalidInputError("validated fuses (--method validated, --max-regression) need a LoRA line; "
                                f"task {task_row['name']!r} is a full checkpoint")
    sets = validation_sets(reg, line, task_row, val_examples)
    if not sets:
        raise InvalidInputError(f"neither task {task_row['name']!r} nor any task in line {line!r} has validation examples; "
                                "register them with `train/learn/add-task … --val FILE`")
    base_row = reg.catalog.get("bases", task_row["base"], "base")
    head_ws, new_ws = reg.weights(head["weights"]), reg.weights(task_row["weights"])
    scorer = open_scorer(reg, base_row, head["weights"], max_length)
    return ValidatedFuse(scorer, sets, adapter_tensors(head_ws.files), adapter_tensors(new_ws.files))

