"""The continual-learning benchmark: does importance-guided fusion keep what a line learned
better than averaging?

A sequence of tasks (a built-in order of the Long Sequence benchmark, shipped in
examples/data/, or any sequence given with --sequence) is taught to SmolLM2-135M (or the model
given with --model) with every method; each method's line is evaluated where the metrics need it:

  learned   L[j]     task j's own trained adapter, before any fuse  (`eval task:NAME`)
  diagonal  R[j][j]  the line right after fusing task j
  final     R[T][j]  the line after the last task                    (--full-matrix: every row)

and summarised as AP = mean_j R[T][j], BWT vs learned = mean_{j<T} R[T][j] − L[j],
BWT after fuse = mean_{j<T} R[T][j] − R[j][j], fuse cost = mean_j L[j] − R[j][j]. Every method is
scored on the same examples, so a paired bootstrap over examples (resampled within each task,
the same resample for every method, seed and order) gives 95 % intervals for each summary and
for each method's AP difference from the tool's default fusion rule (FuseParams.method); a
difference is called only when its interval excludes 0.

Methods (each row says exactly what it is: see METHODS). Trainings with identical inputs
(same start weights, data and options) are shared between lines. Resumable at two levels:
- within a machine, state lives in a kifmerge registry under --work; finished trainings, fuses
  and evaluations are found and skipped;
- across machines and sessions, each finished method of each seed is a small committed *cell*,
  benchmarks/results/runs/<order>/seed<N>/<method>.json (its per-example answers and its wall
  time split into training, fuse and evaluation); a method whose cell exists is not run again,
  and the order's results are assembled from the cells. A cell records the settings it was
  computed with; cells of other settings (bf16 and float32 among them) are never mixed.

    python benchmarks/continual.py --order 4 --seeds 42,43      # → benchmarks/results/order4.{json,md,png}
    python benchmarks/continual.py --order 5 --export-finished   # cells of a run in progress, nothing run
    python benchmarks/continual.py --order 5 --assemble          # order5.{json,md,png} from every cell present
    python benchmarks/continual.py --sequence my-sequence.json   # any sequence: {"name", "tasks": [{"name","train","dev"}]}
    python benchmarks/continual.py --summary                     # → benchmarks/results/summary.{json,md} over orders 4–6

The committed ruler (benchmarks/results/ruler.md) ran these defaults: lr 3e-3, 120 steps, LoRA r 8;
order 4 in float32 (--precision fp32, seeds 42 and 43), orders 5 and 6 in bf16 (seed 42). A run that
adds a row to it passes the same precision; the lr 1e-3 protocol before it is in benchmarks/results/lr1e-3.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    ORDERS,
    RESULTS,
    SMOLLM2,
    WORK,
    TaskFiles,
    add_model_option,
    add_results_option,
    add_sequence_options,
    argument_parser,
    check_other_model_folders,
    builtin_sequence,
    command_line,
    eval_options,
    git_commit,
    machine,
    model_label,
    require_model,
    train_options,
    training_name,
    write_results,
)

from kifmerge.options import FuseParams  # pydantic only: the tool's own default is the reference row

DEFAULT_METHOD = FuseParams.model_fields["method"].default
# The rows of the committed ruler (benchmarks/results/order{4,5,6}, summary): the default first, then
# the rules it is paired with, the baselines and the upper bound; a run resumes in this order.
RULER_ROWS = ("seq", "regmean", "kif-element", "magmax", "linear-0.5", "ties", "kif", "dare", "mtl",
              "linear-0.3", "linear-0.7", "replay", "kif-adaptive-rank")
REPLICATES = 2000
ALPHA_ORDER = "order4"  # linear-best's α is chosen on this order and carried to the others
VALIDATION_EXAMPLES = 100  # per task, after the reported dev examples


@dataclass(frozen=True)
class Method:
    describe: str
    fuse: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    later: dict = field(default_factory=dict)  # training options from the second task on (the first is shared)


SEQ = {"method": "linear", "alpha": 1.0}
METHODS = {
    "seq": Method("SeqLoRA: each task trained from the previous version, which it replaces (linear, α 1)", SEQ),
    "kif": Method("KIF static rule, kifmerge defaults (rank units, top 20 %, both 0.3/0.7, neither 0.5)", {"method": "kif"}),
    "kif-adaptive": Method("KIF softmax rule, τ 0.25", {"method": "kif-adaptive"}),
    "linear-0.3": Method("average 0.3·new + 0.7·old of the LoRA factors", {"method": "linear", "alpha": 0.3}),
    "linear-0.5": Method("average 0.5·new + 0.5·old of the LoRA factors", {"method": "linear", "alpha": 0.5}),
    "linear-mean": Method("the running mean of the tasks: α = 1/t at the t-th task (0.5, 0.33, 0.25, …), so every task "
                          "keeps an equal weight; the weighting RegMean's summed Gram matrices give the line",
                          {"method": "linear", "alpha": "1/t"}),
    "linear-0.7": Method("average 0.7·new + 0.3·old of the LoRA factors", {"method": "linear", "alpha": 0.7}),
    "ties": Method("TIES of two task vectors against the base, the line's head and the new task, merged as ΔW = B·A "
                   "(density 0.5, weights 0.5/0.5) and re-factored to rank r by truncated SVD",
                   {"method": "ties", "density": 0.5}),
    "dare": Method("DARE-linear of the head's and the task's ΔW = B·A against the base (density 0.5, weights 0.5/0.5, "
                   "seed 0), re-factored to rank r", {"method": "dare-linear", "density": 0.5}),
    "magmax": Method("MagMax: per ΔW entry the larger-magnitude of the head's and the task's update (sign kept), "
                     "re-factored to rank r", {"method": "magmax"}),
    "tasl-lora": Method("the TaSL authors' LoRA rule (skill_consolidation_TasLoRA.py): softmax over min–max normalised "
                        "rank-unit scores, τ 0.25, line profile 0.3·new + 0.7·old, scores from the second-order "
                        "'param_mix' sensitivity |θg − ½(θg)²| (--importance mixed) for every task",
                        {"method": "kif-adaptive", "tau": 0.25}, {"importance": "mixed"}),
    # τ swept on order 4 only (issue 21 a); orders 5 and 6 would judge the chosen one
    "tasl-lora-t0.1": Method("the TaSL authors' LoRA rule as tasl-lora, at τ 0.1 (sharper: nearer a hard per-unit choice)",
                             {"method": "kif-adaptive", "tau": 0.1}, {"importance": "mixed"}),
    "tasl-lora-t1": Method("the TaSL authors' LoRA rule as tasl-lora, at τ 1 (softer: nearer a 0.5 average)",
                           {"method": "kif-adaptive", "tau": 1.0}, {"importance": "mixed"}),
    "kif-element": Method("element-level importance-weighted interpolation: head + w ⊙ Δ per LoRA factor element, "
                          "w = I_new^½ / (I_new^½ + I_line^½), element scores Ī·Ū from training (mean-1 normalised, "
                          "the line's a running mean)", {"method": "kif-element"}),
    "kif-fisher": Method("Fisher-weighted element interpolation (Fisher merging, CoFiMA-style): head + w ⊙ Δ per LoRA "
                         "factor element, w = F_new / (F_new + F_line), F the smoothed squared gradient of training "
                         "(--importance fisher; no |θ| factor, which every task trained from the head shares), mean-1 "
                         "normalised, the line's a running mean (kif-element with power 1)",
                         {"method": "kif-element", "power": 1.0}, {"importance": "fisher"}),
    "regmean": Method("RegMean in ΔW = B·A space: each module's updates weighted by the Gram matrices of the inputs "
                      "they saw in training (train --gram; the line's is the sum over its tasks), off-diagonals ×0.9, "
                      "re-factored to rank 8", {"method": "regmean"}, {"gram": True}),
    "regmean-diagonal": Method("RegMean with the Gram matrices' diagonals only (--non-diagonal 0): each input feature's "
                               "column of ΔW weighted by the tasks' energy in that feature; splits what RegMean's full "
                               "input curvature buys over a diagonal one, in the same ΔW space",
                               {"method": "regmean", "non_diagonal": 0.0}, {"gram": True}),
    "regmean-full": Method("RegMean with the Gram matrices whole (--non-diagonal 1; the default scales their "
                           "off-diagonals by 0.9, RegMean's published choice): the other end of the sweep, tuned on order 4",
                           {"method": "regmean", "non_diagonal": 1.0}, {"gram": True}),
    "validated": Method("linear with α chosen per fuse from 0.3/0.5/0.7 by the mean exact match on 100 validation examples "
                        "of every task so far (dev examples 301–400, never reported)", {"method": "validated"}),
    "replay": Method("SeqLoRA with 2 % of each training set drawn from the line's earlier tasks (--replay 0.02)",
                     SEQ, later={"replay": 0.02}),
    "recurrent-kif": Method("Recurrent-KIF (arXiv 2502.17510) inside training: every 8 steps, 4 AdamW steps on a 2 % replay "
                            "buffer of the line's earlier tasks, then inner and outer updates fused per element by their "
                            "global top-20 % importance (both 0.4/0.6, one loop 1/0, neither 0.5/0.5); the trained task "
                            "replaces the head (linear, α 1)", SEQ, later={"replay": 0.02, "recurrent": 8}),
    "replay-linear": Method("replay 2 % of the line's earlier tasks in training (--replay 0.02), then the average "
                            "0.5·new + 0.5·old of the LoRA factors", {"method": "linear", "alpha": 0.5},
                            later={"replay": 0.02}),
    "replay-kif": Method("replay 2 % of the line's earlier tasks in training (--replay 0.02), then KIF's static rule "
                         "(kifmerge defaults): the paper's KIF-M", {"method": "kif"}, later={"replay": 0.02}),
    "kif-adaptive-rank": Method("KIF softmax rule over rank-normalised profiles (--scores rank), τ 0.25",
                                {"method": "kif-adaptive", "scores": "rank"}),
    "kif-change": Method("KIF static rule; tasks after the first scored by their own change |(θ − θ_start)·g| "
                         "(--importance change; the first task is the shared one)", {"method": "kif"},
                         later={"importance": "change"}),
    "orth": Method("SeqLoRA trained with --orth-reg 0.1 (‖AAᵀ−I‖ + ‖BᵀB−I‖ per module; not O-LoRA's cross-task term)",
                   SEQ, {"orth_reg": 0.1}),
    "mtl": Method("multi-task: one adapter on all tasks' data shuffled together, the same total steps (upper bound)"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sequence_from_file(path: Path) -> tuple[str, list[TaskFiles]]:
    """{"name": …, "tasks": [{"name", "train", "dev", "val" (optional)}, …]}; paths relative to the file."""
    spec = json.loads(path.read_text())
    tasks = [TaskFiles(t["name"], (path.parent / t["train"]).resolve(), (path.parent / t["dev"]).resolve(),
                       (path.parent / t["val"]).resolve() if t.get("val") else None) for t in spec["tasks"]]
    for task in tasks:
        for file in (task.train, task.dev, *([task.val] if task.val else [])):
            if not file.is_file():
                sys.exit(f"{path}: task {task.name!r}: {file} not found")
    if len({t.name for t in tasks}) != len(tasks) or len(tasks) < 2:
        sys.exit(f"{path}: give at least two tasks with distinct names")
    return spec.get("name") or path.stem, tasks


class Experiment:
    """One sequence, one seed: every method's line in one registry under `work`, each finished
    method written as a cell under `cells`."""

    def __init__(self, args: argparse.Namespace, tasks: list[TaskFiles], seed: int, work: Path, cells: Path):
        from kifmerge import api

        self.api, self.args, self.seed, self.cells = api, args, seed, cells
        self.first = args.tasks if args.tasks and args.tasks < len(tasks) else None
        self.tasks = tasks[: self.first] if self.first else tasks
        self.registry = work / "registry"
        self.train_options = train_options(args, seed, args.precision)
        self.eval_options = eval_options(args)
        if args.precision == "bf16":
            self.eval_options["bf16"] = True
        self.settings = {"train": {k: v for k, v in self.train_options.items() if k != "seed"}, "eval": self.eval_options,
                         "precision": args.precision, "tasks": [t.name for t in self.tasks]}
        # the base: SmolLM2, registered as "smollm2", in every cell so far (their settings name no model);
        # another model's cells say which, so that they never mix with SmolLM2's
        self.base = "smollm2" if args.model == SMOLLM2 else "base"
        if args.model != SMOLLM2:
            self.settings["model"] = str(args.model)
        # step → seconds, measured when the step did work (a cache hit records nothing, and
        # never overwrites what the step cost when it ran); survives a resume
        self.wall_file = work / ("wall.json" if self.first is None else f"wall-first{self.first}.json")
        self.wall: dict[str, float] = json.loads(self.wall_file.read_text()) if self.wall_file.exists() else {}
        self.api.init(self.registry)
        if not self.api.list_items("bases", registry=self.registry):
            self.api.add_base(self.base, args.model, registry=self.registry)

    # ---- registry queries ------------------------------------------------------------------
    def versions(self, line: str) -> list[dict]:
        if not any(row["name"] == line for row in self.api.list_items("lines", registry=self.registry)):
            return []
        return self.api.history(line, registry=self.registry)

    def head_weights(self, line: str) -> str | None:
        history = self.versions(line)
        return self.api.show(f"{line}@v{history[-1]['number']}", registry=self.registry)["weights"] if history else None

    def task_exists(self, name: str) -> bool:
        return any(row["name"] == name for row in self.api.list_items("tasks", registry=self.registry))

    def timed(self, step: str, fn, did_work=lambda result: True) -> object:
        started = time.perf_counter()
        result = fn()
        if did_work(result):
            self.wall[step] = round(time.perf_counter() - started, 1)
            self.wall_file.write_text(json.dumps(self.wall, indent=1))
        return result

    # ---- the work ----------------------------------------------------------------------------
    def train(self, name: str, data: Path, line: str, options: dict) -> None:
        if self.task_exists(name):
            return
        log(f"seed {self.seed}: train {name} from {line if self.versions(line) else 'the base'}")
        val = self.validation_file(data)
        # a training cut short (a session's end) continues from its last saved step: `resume` is
        # watch-only, so neither the name nor the result changes; the wall time then counts the rest only
        resumable = {**options, **({} if options.get("recurrent") else {"resume": True})}
        self.timed(f"train:{name}", lambda: self.api.train(name, data, line, base=self.base, options=resumable, val=val,
                                                           registry=self.registry))

    def validation_file(self, train: Path) -> Path | None:
        """The task's validation examples (for validated fuses): dev examples after the ones
        reported, VALIDATION_EXAMPLES of them; none for the mixed multi-task data."""
        task = next((t for t in self.tasks if t.train == train), None)
        if task is None or task.val:
            return task.val if task else None
        out = self.registry.parent / "validation" / f"{task.name}.jsonl"
        if not out.exists():
            from kifmerge.data import load_records

            records = load_records(task.dev)[self.args.eval_examples: self.args.eval_examples + VALIDATION_EXAMPLES]
            if not records:
                return None  # a dev file with no examples beyond the reported ones: no validation
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in records))
        return out

    def build(self, method: str) -> None:
        """Teach the method's line the sequence task by task. A training is named by a digest of
        its inputs (start weights, options, data), so lines whose heads and options agree share it."""
        line = self.line(method)
        history = self.versions(line)
        for step, task in enumerate(self.tasks, start=1):
            options = self.options_for(method, step)
            start = self.api.show(f"{line}@v{history[step - 2]['number']}", registry=self.registry)["weights"] \
                if step > 1 else None
            name = training_name(task, start, options, line if options.get("replay") else None)
            if len(history) >= step:
                if history[step - 1]["task"] != name:  # a line of trainings named otherwise (older inputs)
                    raise SystemExit(f"{line}@v{history[step - 1]['number']} in {self.registry} fused "
                                     f"{history[step - 1]['task']}, not this protocol's {name}: move that line "
                                     "out of the way (or use another --work) to run it again")
                continue
            self.train(name, task.train, line, options)
            fuse = fuse_options(method, step)
            log(f"seed {self.seed}: fuse {name} into {line} ({fuse})")
            self.timed(f"fuse:{line}@{step}", lambda: self.api.fuse(name, line, registry=self.registry, **fuse))
            history = self.versions(line)

    def line(self, method: str) -> str:
        """A method's line: its name, or `METHOD-firstN` when only the first N tasks are run
        (a screen: its versions and evaluations are shared with the full lines where the weights agree)."""
        return method if self.first is None else f"{method}-first{self.first}"

    def options_for(self, method: str, step: int) -> dict:
        """The method's training options; `later` ones (replay, which needs earlier tasks) from the second task on."""
        return {**self.train_options, **METHODS[method].train, **(METHODS[method].later if step > 1 else {})}

    def multitask(self) -> None:
        mixed = self.registry.parent / ("mtl-train.jsonl" if self.first is None else f"mtl-first{self.first}-train.jsonl")
        if not mixed.exists():
            from kifmerge.data import load_records

            records = [r for t in self.tasks for r in load_records(t.train, self.args.train_examples)]
            random.Random(self.seed).shuffle(records)
            mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
        options = {**self.train_options, "max_steps": self.args.steps * len(self.tasks), "max_examples": None}
        line, task = self.line("mtl"), self.mtl_task()
        self.train(task, mixed, line, options)
        if not self.versions(line):
            self.api.fuse(task, line, registry=self.registry)

    def mtl_task(self) -> str:
        return "mtl-all" if self.first is None else f"mtl-first{self.first}"

    def evaluate(self, ref: str, tasks: list[TaskFiles]) -> None:
        data = {t.name: t.dev for t in tasks}
        result = self.timed(f"eval:{ref}:{','.join(data)}",
                            lambda: self.api.evaluate(ref, data, registry=self.registry, **self.eval_options),
                            did_work=lambda done: not all(r["reused"] for r in done["results"].values()))
        scores = "  ".join(f"{t} {r['exact_match']:.3f}{'*' if r['reused'] else ''}" for t, r in result["results"].items())
        log(f"seed {self.seed}: eval {ref}: {scores}")

    def evaluate_line(self, method: str) -> None:
        """What the metrics need: learned, diagonal and final row (every row with --full-matrix)."""
        line = self.line(method)
        if method == "mtl":
            self.evaluate(f"{line}@v1", self.tasks)
            return
        history = self.versions(line)
        for j, version in enumerate(history):
            self.evaluate(f"task:{version['task']}", [self.tasks[j]])
            if self.args.full_matrix:
                self.evaluate(f"{line}@v{version['number']}", self.tasks)
            elif j < len(history) - 1:
                self.evaluate(f"{line}@v{version['number']}", [self.tasks[j]])
        self.evaluate(f"{line}@v{history[-1]['number']}", self.tasks)

    def run(self) -> None:
        """Method by method, in the order given; each finished method is written as its cell at
        once (a run cut short leaves whole methods behind), and a method with a cell is skipped."""
        for method in self.args.methods:
            if read_cell(self.cell_path(method), self.settings) is not None:
                log(f"seed {self.seed}: {method}: cell {self.cell_path(method)} exists, skipped")
                continue
            if method == "mtl":
                self.multitask()
            else:
                self.build(method)
            self.evaluate_line(method)
            self.write_cell(method)

    def export_finished(self) -> list[str]:
        """Cells of the methods whose lines are complete and evaluated (another process may still
        be running the rest): nothing is trained, fused or evaluated."""
        written = []
        for method in self.args.methods:
            if read_cell(self.cell_path(method), self.settings) is not None:
                continue
            history = self.versions(self.line(method))
            if len(history) < (1 if method == "mtl" else len(self.tasks)):
                continue
            try:
                self.write_cell(method)
            except Exception as exc:  # not evaluated yet: the report names what is missing
                log(f"seed {self.seed}: {method}: not finished ({exc})")
                continue
            written.append(method)
        return written

    # ---- cells -------------------------------------------------------------------------------
    def cell_path(self, method: str) -> Path:
        return self.cells / f"seed{self.seed}" / f"{method}.json"

    def report(self, method: str) -> dict:
        report = self.api.report(self.line(method), tasks=[t.name for t in self.tasks], examples=True, registry=self.registry)
        if method == "mtl":  # one version that learned everything: its final row is all there is
            report["examples"]["learned"] = report["examples"]["diagonal"] = report["examples"]["final"]
        return report

    def steps_of(self, method: str) -> dict[str, float]:
        """The measured steps the method's line used: its trainings (shared ones included), fuses
        and evaluations."""
        line = self.line(method)
        tasks = {v["task"] for v in self.versions(line)}
        refs = {f"{line}@"} | {f"task:{t}:" for t in tasks}
        return {step: seconds for step, seconds in self.wall.items()
                if (step.startswith("train:") and step[6:] in tasks) or step.startswith(f"fuse:{line}@")
                or (step.startswith("eval:") and any(step[5:].startswith(r) for r in refs))}

    def write_cell(self, method: str) -> None:
        report = self.report(method)
        steps = self.steps_of(method)
        wall = {kind: round(sum(v for k, v in steps.items() if k.startswith(kind + ":")), 1) for kind in ("train", "fuse", "eval")}
        cell = {"method": method, "describe": METHODS[method].describe, "seed": self.seed, "settings": self.settings,
                "examples": {k: ["".join(str(int(v)) for v in task) for task in report["examples"][k]]
                             for k in ("final", "learned", "diagonal")},
                "per_task": report["per_task"], "matrix": report["matrix"], "wall_s": wall, "steps_s": steps,
                "git_commit": git_commit(), "machine": machine(), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = write_results(self.cell_path(method), cell)
        log(f"seed {self.seed}: {method}: wrote {path} (train {wall['train'] / 60:.1f} min, "
            f"fuse {wall['fuse']:.0f} s, eval {wall['eval'] / 60:.1f} min)")


def read_cell(path: Path, settings: dict | None = None) -> dict | None:
    """A method's cell, or None when there is none; a cell computed with other settings stops
    the run (its results must not be mixed in, nor silently replaced)."""
    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    if settings is not None and cell["settings"] != settings:
        differ = sorted(k for k in set(settings) | set(cell["settings"]) if settings.get(k) != cell["settings"].get(k))
        sys.exit(f"{path}: computed with other settings ({', '.join(differ)}: {cell['settings'].get(differ[0])!r} there, "
                 f"{settings.get(differ[0])!r} now); use another --results folder or remove the cell")
    return cell


def cells_folder(results: Path, name: str) -> Path:
    return results / "runs" / name


def with_numeric_examples(cell: dict) -> dict:
    """A cell with its per-example answers as numbers (stored as one string of 0/1 per task)."""
    cell["examples"] = {k: [[int(c) for c in task] for task in v] for k, v in cell["examples"].items()}
    return cell


def load_seed(cells: Path, seed: int, methods: list[str]) -> dict[str, dict]:
    """method → its cell with per-example scores as lists of ints (the bootstrap's input)."""
    out = {}
    for method in methods:
        cell = read_cell(cells / f"seed{seed}" / f"{method}.json")
        if cell is not None:
            out[method] = with_numeric_examples(cell)
    return out


# ---- statistics -------------------------------------------------------------------------------
def task_indices(tasks: list[str], sizes: list[int]) -> list:
    """The bootstrap resample of each task, keyed by its name: shared by methods, seeds and orders."""
    from kifmerge.stats import resample_indices

    return [resample_indices([n], REPLICATES, seed=zlib.crc32(t.encode()))[0] for t, n in zip(tasks, sizes, strict=True)]


def estimates(run: dict, indices: list, order: list[int] | None = None) -> dict:
    """(point, replicates) of AP, BWT vs learned, BWT after fuse and fuse cost of one seed's method."""
    import numpy as np

    from kifmerge.stats import average_precision, backward_transfer

    ex = run["examples"]
    pick = (lambda rows: [rows[i] for i in order]) if order else (lambda rows: rows)
    final, learned, diagonal = (pick([list(map(float, r)) for r in ex[k]]) for k in ("final", "learned", "diagonal"))
    idx = pick(indices)
    out = {"AP": average_precision(final, idx)}
    if run["method"] != "mtl":
        out["BWT_vs_learned"] = backward_transfer(final, learned, idx)
        out["BWT_after_fuse"] = backward_transfer(final, diagonal, idx)
        # over the tasks that were fused: the first task becomes v1 as it is, and counting its
        # zero would dilute the cost by 1/T
        cost = [np.asarray(l) - np.asarray(d) for l, d in zip(learned[1:], diagonal[1:], strict=True)]
        out["fuse_cost"] = average_precision(cost, idx[1:])
    return out


def method_statistics(per_seed: list[dict], tasks: list[str], linear_best: str | None = None) -> dict:
    """Across seeds (averaged on shared resamples): intervals per summary and the paired AP
    difference of every method from the default. `linear_best`: the linear row chosen on
    another order (ALPHA_ORDER); without it the best linear row here is picked, on the very
    examples it is reported on (an optimistic row: the tables say which)."""
    from kifmerge.stats import combine, interval, paired_difference

    sizes = [len(s) for s in next(iter(per_seed[0].values()))["examples"]["final"]]
    indices = task_indices(tasks, sizes)
    methods = list(per_seed[0])
    est = {m: {} for m in methods}
    for m in methods:
        per = [estimates({**seed[m], "method": m}, indices) for seed in per_seed]
        for key in per[0]:
            est[m][key] = combine([p[key] for p in per])
    out = {}
    for m in methods:
        out[m] = {key: interval(rep, point) for key, (point, rep) in est[m].items()}
        if DEFAULT_METHOD in est and m != DEFAULT_METHOD:
            out[m]["AP_minus_default"] = paired_difference(est[m]["AP"], est[DEFAULT_METHOD]["AP"])
    linear = [m for m in methods if m.startswith("linear-")]
    if linear_best in out:
        out["linear-best"] = {**out[linear_best], "is": linear_best, "chosen_on": ALPHA_ORDER}
    elif linear:
        best = max(linear, key=lambda m: est[m]["AP"][0])
        out["linear-best"] = {**out[best], "is": best, "chosen_on": "this order (optimistic)"}
    return out


def carried_linear_best(results: Path, name: str) -> str | None:
    """The linear row chosen on ALPHA_ORDER, for every other order (None on ALPHA_ORDER itself)."""
    source = results / f"{ALPHA_ORDER}.json"
    if name == ALPHA_ORDER or not source.exists():
        return None
    return json.loads(source.read_text())["statistics"].get("linear-best", {}).get("is")


def per_task_table(per_seed: list[dict], tasks: list[str]) -> dict:
    """Per method and task, averaged over seeds: learned, diagonal, final, majority class, top predictions (first seed)."""
    out = {}
    for m in per_seed[0]:
        rows = []
        for j, task in enumerate(tasks):
            cells = [seed[m]["per_task"][j] for seed in per_seed]
            mean = lambda key: (None if any(c.get(key) is None for c in cells) else round(sum(c[key] for c in cells) / len(cells), 4))
            rows.append({"task": task, "learned": mean("learned"), "diagonal": mean("diagonal"), "final": mean("final"),
                         "majority_class": cells[0].get("majority_class"), "predictions": cells[0].get("predictions")})
        out[m] = rows
    return out


# ---- outputs ------------------------------------------------------------------------------------
def pct(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def ci(cell: dict | None, signed: bool = False) -> str:
    if not cell:
        return "—"
    return f"{pct(cell['value'], signed)} [{pct(cell['low'], signed)}, {pct(cell['high'], signed)}]"


def write_order(stem: Path, title: str, tasks: list[str], per_seed: list[dict], seeds: list[int], results: Path) -> None:
    """The order's results from its cells (per seed, method → cell)."""
    first = next(iter(per_seed[0].values()))
    stats = method_statistics(per_seed, tasks, carried_linear_best(results, title))
    table = per_task_table(per_seed, tasks)
    walls = {m: {str(seed): per[m]["wall_s"] for seed, per in zip(seeds, per_seed, strict=True)} for m in per_seed[0]}
    payload = {"benchmark": "continual", "title": title, "tasks": tasks, "seeds": seeds, "default_method": DEFAULT_METHOD,
               "model": first["settings"].get("model", "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)"),
               "metric": f"exact match (case-folded) on the first {first['settings']['eval']['max_examples']} dev examples of each task",
               "methods": {m: METHODS[m].describe if m in METHODS else per_seed[0][m]["describe"] for m in per_seed[0]},
               "statistics": stats, "per_task": table,
               "examples": {m: {k: [["".join(str(int(v)) for v in task) for task in seed[m]["examples"][k]] for seed in per_seed]
                                for k in ("final", "learned", "diagonal")} for m in per_seed[0]},
               "matrix": {m: [seed[m]["matrix"] for seed in per_seed] for m in per_seed[0]},
               "wall_s": walls, "settings": first["settings"],
               "cells": {m: {str(seed): {"git_commit": per[m].get("git_commit"), "machine": per[m].get("machine"),
                                         "written": per[m].get("written")} for seed, per in zip(seeds, per_seed, strict=True)}
                         for m in per_seed[0]},
               "git_commit": git_commit(), "machine": machine(), "command": command_line()}
    write_results(stem.with_suffix(".json"), payload, render_order(payload))
    try:
        draw(payload, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib not installed: no PNG (pip install 'kifmerge[plot]')")


def render_order(p: dict) -> str:
    s = p["settings"]
    train = s["train"]
    lines = [f"# Continual learning: {p['title']} ({' → '.join(p['tasks'])})", "",
             f"{model_label(s.get('model', SMOLLM2))}, LoRA r {train['lora_r']} (q/v), {train['max_steps']} steps per task at batch {train['batch_size']}, "
             f"lr {train['lr']} with {train['warmup_steps']} warmup steps, max length {train['max_length']}, precision "
             f"{s['precision']} (training and evaluation); seeds {', '.join(map(str, p['seeds']))}. {p['metric']}. Points ×100; "
             f"[95 % paired-bootstrap interval over examples, {REPLICATES} resamples within each task, the same for every "
             f"method; seeds averaged]. Fuse cost: mean over the fused tasks (2…T) of learned − right after the fuse.", "",
             f"| method | AP | AP − {p['default_method']} | BWT vs learned | BWT after fuse | fuse cost | wall min (train / fuse / eval) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, row in p["statistics"].items():
        name = f"{m} (= {row['is']}, α chosen on {row['chosen_on']})" if "is" in row else m
        diff = row.get("AP_minus_default")
        called = f" {diff['called']}" if diff and diff["called"] != "no difference" else ""
        walls = list(p["wall_s"].get(row.get("is", m), {}).values())
        wall = " / ".join(f"{sum(w[k] for w in walls) / 60:.1f}" for k in ("train", "fuse", "eval")) if walls and all(walls) else "—"
        lines.append(f"| {name} | {ci(row['AP'])} | {ci(diff, True) + called if diff else '—'} | {ci(row.get('BWT_vs_learned'), True)} | "
                     f"{ci(row.get('BWT_after_fuse'), True)} | {ci(row.get('fuse_cost'), True)} | {wall} |")
    lines += ["", "Wall time per method counts every step its line used, the shared first-task training included; "
              "evaluations answered from the registry's cache count nothing. Cells: "
              + "; ".join(f"{m} {', '.join(sorted({c['git_commit'] or '?' for c in seeds.values()}))}" for m, seeds in p["cells"].items())]
    machines: dict[str, list[str]] = {}  # machine → its cells (method/seed)
    for m, seeds in p["cells"].items():
        for seed, cell in seeds.items():
            machines.setdefault(cell.get("machine") or "not recorded", []).append(f"{m}/{seed}")
    if len(machines) > 1:  # wall times of two CPUs differ up to 4×: say which cell ran where
        lines += ["", f"The cells ran on {len(machines)} machines; compare wall times only within one: "
                  + "; ".join(f"{name} ({', '.join(cells)})" for name, cells in machines.items()) + "."]
    lines += ["", "## What each row is", ""] + [f"- **{m}**: {d}" for m, d in p["methods"].items()]
    lines += ["", "## Per task (seeds averaged): learned / fused (diagonal) / final, majority class, most frequent answers", "",
              "| method | " + " | ".join(p["tasks"]) + " |", "| --- |" + " --- |" * len(p["tasks"])]
    for m, rows in p["per_task"].items():
        lines.append(f"| {m} | " + " | ".join(f"{pct(r['learned'])} / {pct(r['diagonal'])} / {pct(r['final'])}" for r in rows) + " |")
    majority = p["per_task"][next(iter(p["per_task"]))]
    lines.append("| majority class | " + " | ".join(pct(r["majority_class"]) for r in majority) + " |")
    lines += ["", "Most frequent final-row answers (first seed), share of the dev examples:", ""]
    for m, rows in p["per_task"].items():
        answers = "; ".join(f"{r['task']}: " + ", ".join(f"{a['answer']!r} {100 * a['share']:.0f}%" for a in (r["predictions"] or [])[:3]) for r in rows)
        lines.append(f"- {m}: {answers}")
    lines += ["", f"Command: `{p['command']}` (commit {p['git_commit']}).", ""]
    return "\n".join(lines)


def draw(p: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {m: r for m, r in p["statistics"].items() if m != "linear-best"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, title in ((axes[0], "AP", "AP (final row)"), (axes[1], "BWT_vs_learned", "BWT vs learned")):
        shown = [(m, r[key]) for m, r in rows.items() if r.get(key)]
        values = [100 * c["value"] for _, c in shown]
        errors = [[100 * (c["value"] - c["low"]) for _, c in shown], [100 * (c["high"] - c["value"]) for _, c in shown]]
        axis.bar(range(len(shown)), values, yerr=errors, capsize=3,
                 color=["tab:red" if m == p["default_method"] else "tab:blue" for m, _ in shown])
        axis.set_xticks(range(len(shown)), [m for m, _ in shown], rotation=40, ha="right", fontsize=8)
        axis.set_title(f"{title}, points, 95 % CI", fontsize=9)
        axis.axhline(0, color="black", linewidth=0.5)
    fig.suptitle(f"{p['title']}: {' → '.join(p['tasks'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def seed_averaged_estimates(payload: dict, method: str, indices: list) -> dict:
    """(point, replicates) per summary of one method in an assembled order's results, its seeds
    averaged on the shared resamples."""
    from kifmerge.stats import combine

    seeds = [{"method": method, "examples": {k: [list(map(int, s)) for s in payload["examples"][method][k][i]]
                                             for k in ("final", "learned", "diagonal")}} for i in range(len(payload["seeds"]))]
    per = [estimates(seed, indices) for seed in seeds]
    return {key: combine([p[key] for p in per]) for key in per[0]}


def order_results(results: Path, order: int, suffix: str) -> list[dict]:
    """An order's assembled results: `order{N}-SUFFIX.json` alone when a suffix is given, else
    `order{N}.json` and every `order{N}-seeds*.json` beside it (rows assembled over more seeds),
    the ones computed with other settings left out."""
    paths = ([results / f"order{order}{suffix}.json"] if suffix else
             [results / f"order{order}.json", *sorted(results.glob(f"order{order}-seeds*.json"))])
    payloads = [json.loads(p.read_text()) for p in paths if p.exists()]
    return [p for p in payloads if p["settings"] == payloads[0]["settings"] and p["tasks"] == payloads[0]["tasks"]]


def write_summary(orders: list[int], results: Path = RESULTS, reference: str = DEFAULT_METHOD, suffix: str = "") -> None:
    """Across orders: per method the mean AP and BWT vs learned with intervals (resamples
    shared per task across orders, seeds averaged first) and the AP difference from the default, or
    from `reference` (then written as `summary-vs-REFERENCE`; the summary itself keeps the default's).
    Each method on each order counts every seed it was run with (the assembled file with the most
    seeds for it: `order{N}-seeds42-43.json` over `order{N}.json`), so a row's seeds can differ
    from another's, and the table says which. `suffix`: read only `order{o}-SUFFIX.json` (e.g.
    `seeds42-43`: the rows run on both seeds) and write `summary-SUFFIX`."""
    suffix = f"-{suffix}" if suffix else ""
    from kifmerge.stats import combine, interval, paired_difference

    found = {o: payloads for o in orders if (payloads := order_results(results, o, suffix))}
    if not found:
        sys.exit(f"no order results yet ({', '.join(f'order{o}{suffix}.json' for o in orders)} under {results}): "
                 "run benchmarks/continual.py --order N first" + (" and assemble it with --out" if suffix else ""))
    # per order and method, the payload with the most seeds for it
    picked = {o: {m: max((p for p in payloads if m in p["methods"]), key=lambda p: len(p["seeds"]))
                  for m in {m for p in payloads for m in p["methods"]}} for o, payloads in found.items()}
    methods = [m for m in dict.fromkeys(m for p in next(iter(found.values())) for m in p["methods"])
               if all(m in picked[o] for o in found)]
    est: dict[str, dict] = {m: {} for m in methods}
    for o, payloads in found.items():
        tasks = payloads[0]["tasks"]
        sizes = [len(s) for s in payloads[0]["examples"][next(iter(payloads[0]["methods"]))]["final"][0]]
        indices = task_indices(tasks, sizes)
        for m in methods:
            for key, value in seed_averaged_estimates(picked[o][m], m, indices).items():
                est[m].setdefault(key, []).append(value)
    stats = {}
    for m in methods:
        stats[m] = {}
        for key, values in est[m].items():
            point, replicates = combine(values)
            stats[m][key] = interval(replicates, point)
        if m != reference and reference in est:
            stats[m]["AP_minus_default"] = paired_difference(combine(est[m]["AP"]), combine(est[reference]["AP"]))
    chosen = (found.get(int(ALPHA_ORDER.removeprefix("order"))) or [{}])[0].get("statistics", {}).get("linear-best", {}).get("is")
    if chosen in stats:
        for m in methods:  # the bar a fusion rule has to clear: the best plain average
            if m != chosen:
                stats[m]["AP_minus_linear_best"] = paired_difference(combine(est[m]["AP"]), combine(est[chosen]["AP"]))
        stats["linear-best"] = {**stats[chosen], "is": chosen, "chosen_on": ALPHA_ORDER}
    precisions = {o: ps[0]["settings"].get("precision", "bf16" if ps[0]["settings"].get("bf16") else "fp32")
                  for o, ps in found.items()}
    seeds = {m: {o: picked[o][m]["seeds"] for o in found} for m in methods}
    payload = {"benchmark": "continual-summary", "orders": sorted(found), "default_method": DEFAULT_METHOD, "reference": reference,
               "methods": {m: METHODS[m].describe for m in methods}, "statistics": stats, "precision": precisions,
               "seeds": seeds,
               "wall_s_per_order": {o: round(sum(sum((w or {}).get(k, 0) for w in picked[o][m]["wall_s"][m].values()
                                                     for k in ("train", "fuse", "eval")) for m in methods), 1) for o in found},
               "git_commit": git_commit(), "command": "python benchmarks/continual.py --summary"}
    groups: dict[str, list[str]] = {}  # "order 4: 42, 43; order 5: 42, …" → the rows run with those seeds
    for m in methods:
        groups.setdefault("; ".join(f"order {o}: {', '.join(map(str, s))}" for o, s in seeds[m].items()), []).append(m)
    lines = [f"# Continual learning across orders {', '.join(map(str, sorted(found)))}", "",
             f"Mean over orders (each order's seeds averaged first); points ×100 with 95 % paired-bootstrap intervals over "
             f"examples (resamples shared per task across methods, seeds and orders). Default method: **{DEFAULT_METHOD}** "
             f"(`kifmerge fuse` without --method). A difference is called only when its interval excludes 0. "
             f"Fuse cost: over the fused tasks. linear-best: the linear α that was best on {ALPHA_ORDER}, carried to "
             f"the other orders. Seeds, each row's every seed: "
             + " | ".join(f"{', '.join(ms) if len(groups) > 1 else 'every row'}: {g}" for g, ms in groups.items()) + ". Precision: "
             + ("; ".join(f"order {o}: {v}" for o, v in precisions.items()) if len(set(precisions.values())) > 1
                else f"{next(iter(precisions.values()))} everywhere") + ".", "",
             f"| method | AP | AP − {reference} | AP − linear-best | BWT vs learned | fuse cost |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m, row in stats.items():
        name = f"{m} (= {row['is']}, α chosen on {row['chosen_on']})" if "is" in row else m
        cells = [ci(d, True) + " " + d["called"] if d else "—" for d in (row.get("AP_minus_default"), row.get("AP_minus_linear_best"))]
        lines.append(f"| {name} | {ci(row['AP'])} | {cells[0]} | {cells[1]} | "
                     f"{ci(row.get('BWT_vs_learned'), True)} | {ci(row.get('fuse_cost'), True)} |")
    lines += ["", "Wall time per order: " + ", ".join(f"order {o}: {s / 60:.1f} min" for o, s in payload["wall_s_per_order"].items()), ""]
    if reference != DEFAULT_METHOD and reference not in est:  # the default missing: the table goes without its column
        sys.exit(f"--reference {reference}: no such row in every order ({', '.join(methods)})")
    stem = ("summary" if reference == DEFAULT_METHOD else f"summary-vs-{reference}") + suffix
    payload["command"] += ("" if reference == DEFAULT_METHOD else f" --reference {reference}") + (f" --suffix {suffix[1:]}" if suffix else "")
    write_results(results / f"{stem}.json", payload, "\n".join(lines))
    print("\n".join(lines))


# issue 21's candidates, each with the row it has to beat on the screen order (replay-based ones are
# judged against replay baselines, not replay-free rows), then rows for context
SCREEN = {
    "tasl-lora": ("a", ["linear-0.5"]),
    "tasl-lora-t0.1": ("a, τ 0.1", ["linear-0.5"]),
    "tasl-lora-t1": ("a, τ 1", ["linear-0.5"]),
    "kif-element": ("b", ["linear-0.5"]),
    "kif-fisher": ("b, Fisher", ["linear-0.5"]),
    "recurrent-kif": ("c", ["replay-linear", "replay-kif"]),
    "regmean": ("d", ["linear-0.5"]),
    "regmean-diagonal": ("d, diagonal", ["linear-0.5", "regmean", "kif-fisher"]),
    "regmean-full": ("d, whole Gram", ["regmean"]),
    "validated": ("e", ["linear-0.5"]),
    "kif": ("context", ["linear-0.5"]),
    "kif-adaptive-rank": ("context", ["linear-0.5"]),
    "replay-kif": ("context", ["replay-linear"]),
    "ties": ("context", ["linear-0.5"]),
    "dare": ("context", ["linear-0.5"]),
    "magmax": ("context", ["linear-0.5"]),
    "linear-mean": ("context", ["linear-0.5"]),
}


def fuse_options(method: str, step: int) -> dict:
    """The row's fuse options at the step-th task; `alpha: "1/t"` is the running mean of the tasks
    the line holds (α = 1/step: each task ends with the same weight in the line)."""
    fuse = dict(METHODS[method].fuse)
    if fuse.get("alpha") == "1/t":
        fuse["alpha"] = 1.0 / step
    return fuse


def write_screen(order: str, results: Path = RESULTS, suffix: str = "") -> None:
    """`screen-ORDER.{json,md}`: each candidate of issue 21 against the row it has to beat, paired
    on the same examples (AP, BWT vs learned, fuse cost), and against the default; a candidate
    without a cell yet is listed as such. Read from the assembled `ORDER.json` (`ORDER-SUFFIX.json`:
    the candidates ran on one seed, and the order's file keeps the rows of every seed)."""
    from kifmerge.stats import interval, paired_difference

    source = results / (f"{order}-{suffix}.json" if suffix else f"{order}.json")
    if not source.exists():
        sys.exit(f"no {source.name}: run or --assemble {order} first")
    payload = json.loads(source.read_text())
    tasks, present = payload["tasks"], payload["methods"]
    sizes = [len(s) for s in payload["examples"][next(iter(present))]["final"][0]]
    indices = task_indices(tasks, sizes)

    cache = {m: seed_averaged_estimates(payload, m, indices) for m in present if m != "mtl"}
    rows = {}
    for m, (candidate, against) in SCREEN.items():
        if m not in cache:
            rows[m] = {"candidate": candidate, "against": against, "status": "not run yet"}
            continue
        row = {"candidate": candidate, "against": against, "status": "screened",
               "AP": interval(cache[m]["AP"][1], cache[m]["AP"][0]),
               "BWT_vs_learned": interval(cache[m]["BWT_vs_learned"][1], cache[m]["BWT_vs_learned"][0]),
               "fuse_cost": interval(cache[m]["fuse_cost"][1], cache[m]["fuse_cost"][0]), "versus": {}}
        for other in dict.fromkeys([*against, DEFAULT_METHOD]):
            if other in cache and other != m:
                row["versus"][other] = {key: paired_difference(cache[m][key], cache[other][key])
                                        for key in ("AP", "BWT_vs_learned", "fuse_cost")}
        rows[m] = row
    out = {"benchmark": "continual-screen", "order": order, "seeds": payload["seeds"], "default_method": DEFAULT_METHOD,
           "settings": payload.get("settings"), "rows": rows, "git_commit": git_commit(),
           "command": "python benchmarks/continual.py --screen" + (f" --suffix {suffix}" if suffix else "") + f"  # from {source.name}"}
    lines = [f"# Screen of issue 21's candidates on {order}", "",
             f"Each candidate against the row it has to beat, paired on the same examples ({payload['seeds']} seed(s); "
             "points ×100, 95 % paired-bootstrap intervals; a difference is called only when its interval excludes 0). "
             f"Fuse cost: lower is better. Default method: **{DEFAULT_METHOD}**. From `{source.name}`; "
             f"rerun with `{out['command'].split('  #')[0]}` after each cell lands.", "",
             "| candidate | row | AP | against | AP − it | BWT vs learned − it | fuse cost − it |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, row in rows.items():
        if row["status"] != "screened":
            lines.append(f"| {row['candidate']} | {m} | not run yet | {', '.join(row['against'])} | | | |")
            continue
        if not row["versus"]:
            lines.append(f"| {row['candidate']} | {m} | {ci(row['AP'])} | {', '.join(row['against'])}: no cell yet | | | |")
        for other in [o for o in dict.fromkeys([*row["against"], DEFAULT_METHOD]) if o in row["versus"]]:
            d = row["versus"][other]
            lines.append(f"| {row['candidate']} | {m} | {ci(row['AP'])} | {other} | {ci(d['AP'], True)} {d['AP']['called']} | "
                         f"{ci(d['BWT_vs_learned'], True)} | {ci(d['fuse_cost'], True)} |")
    lines.append("")
    write_results(results / f"screen-{order}.json", out, "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--order", type=int, default=4, choices=sorted(ORDERS))
    parser.add_argument("--sequence", type=Path, help="a JSON sequence file instead of a built-in order")
    parser.add_argument("--summary", action="store_true", help="only write summary.{json,md} from the order results")
    parser.add_argument("--suffix", default="", help="with --summary: read order{N}-SUFFIX.json (e.g. seeds42-43, written by "
                                                     "--seeds 42,43 --assemble --out .../order{N}-seeds42-43) and write summary-SUFFIX; "
                                                     "with --screen: read <order>-SUFFIX.json (e.g. seed42: every row of one seed)")
    parser.add_argument("--reference", help="with --summary: the row every AP is paired with (default: the default method; "
                                            "written as summary-vs-REFERENCE.{json,md})")
    parser.add_argument("--screen", action="store_true",
                        help="only write screen-<order>.{json,md} from the assembled order (--order, default 4, or "
                             "--sequence): issue 21's candidates against the rows they have to beat")
    parser.add_argument("--assemble", action="store_true", help="only write the order's results from the cells present")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("CELL_A", "CELL_B"),
                        help="only compare two cells of the same tasks run under other settings (bf16 against fp32, "
                             "another --lr), paired over examples; with --out, also write OUT.{json,md}")
    parser.add_argument("--export-finished", action="store_true",
                        help="only write the cells of methods finished in the work registry (a run in progress elsewhere)")
    parser.add_argument("--methods", default=",".join(RULER_ROWS), type=lambda s: [m for m in s.split(",") if m],
                        help=f"rows to run, in this order (default: the committed ruler's {len(RULER_ROWS)} rows)")
    parser.add_argument("--tasks", type=int, default=0, help="only the first N tasks (a cheap screen: lines METHOD-firstN)")
    parser.add_argument("--seeds", default="42", type=lambda s: [int(x) for x in s.split(",")])
    add_sequence_options(parser)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training and evaluation: bf16 autocast or float32; auto: bf16 only where the CPU (or GPU) "
                             "runs it natively (without avx512_bf16 a bf16 matmul ran 34× slower than float32)")
    parser.add_argument("--full-matrix", action="store_true", help="evaluate every version on every task")
    add_model_option(parser)
    parser.add_argument("--work", type=Path, default=None, help="state folder (default benchmarks/work/<name>)")
    add_results_option(parser)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: <results>/<name>)")
    args = parser.parse_args()
    if args.suffix and not (args.summary or args.screen):
        parser.error("--suffix goes with --summary or --screen")
    if args.reference and not args.summary:
        parser.error("--reference goes with --summary")
    if args.summary and args.screen:
        parser.error("--summary and --screen write different files: give one")
    if args.compare:
        for path in args.compare:
            if not path.is_file():
                sys.exit(f"{path}: no such cell")
        result = compare_cells(*(with_numeric_examples(json.loads(p.read_text())) for p in args.compare))
        table = render_comparison(result, tuple(map(str, args.compare)))
        print(table)
        if args.out:
            result.update(benchmark="continual-compare", command="python benchmarks/continual.py --compare "
                          + " ".join(map(str, args.compare)), git_commit=git_commit())
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(table + "\n\nCommand: `" + result["command"] + "`\n")
        return
    if args.summary:
        write_summary(sorted(ORDERS), args.results, args.reference or DEFAULT_METHOD, args.suffix)
        return
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    from kifmerge.fusion.methods import METHODS as RULES  # every row fuses with a rule of kifmerge's registry

    unregistered = [m for m in args.methods if METHODS[m].fuse and METHODS[m].fuse["method"] not in RULES]
    if unregistered:
        sys.exit(f"row {unregistered[0]!r} fuses with {METHODS[unregistered[0]].fuse['method']!r}, which is not a kifmerge method")
    if args.sequence:
        name, tasks = sequence_from_file(args.sequence)
    else:
        name, tasks = f"order{args.order}", builtin_sequence(args.order)
    label = name if not args.tasks else f"{name}-first{args.tasks}"
    if args.screen:
        write_screen(label, args.results, args.suffix)
        return
    cells = cells_folder(args.results, label)
    if not args.assemble:
        if args.precision == "auto":
            from kifmerge.precision import bf16_support

            supported, why = bf16_support()
            args.precision = "bf16" if supported else "fp32"
            log(f"precision auto → {args.precision} ({why})")
        require_model(args.model)
        check_other_model_folders(args)
        work = args.work or WORK / name
        for seed in args.seeds:
            experiment = Experiment(args, tasks, seed, work / f"seed{seed}", cells)
            if args.export_finished:
                log(f"{name}, seed {seed}: cells written for {experiment.export_finished() or 'no method'}")
                continue
            log(f"{name}, seed {seed}: {' → '.join(t.name for t in tasks)}; methods {args.methods}; work in {work / f'seed{seed}'}")
            experiment.run()
    assemble(args, label, [t.name for t in tasks][: args.tasks or None], cells)


def assemble(args: argparse.Namespace, label: str, tasks: list[str], cells: Path) -> None:
    """The order's results from every cell present for the seeds asked (a method missing a seed is left out, and said so)."""
    present = sorted({p.stem for seed in args.seeds for p in (cells / f"seed{seed}").glob("*.json")},
                     key=lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS))
    per_seed = [load_seed(cells, seed, present) for seed in args.seeds]
    methods = [m for m in present if all(m in per for per in per_seed)]
    if not methods:
        sys.exit(f"no cells for seeds {args.seeds} under {cells}: run the methods first")
    left_out = [m for m in present if m not in methods]
    if left_out:
        log(f"left out of {label} (not run for every seed {args.seeds}): {', '.join(left_out)}")
    settings = {json.dumps(per[m]["settings"], sort_keys=True) for per in per_seed for m in methods}
    if len(settings) > 1:
        sys.exit(f"the cells under {cells} were computed with different settings: they are not mixed in one table")
    per_seed = [{m: per[m] for m in methods} for per in per_seed]
    stem = args.out or args.results / label
    write_order(stem, label, tasks, per_seed, args.seeds, args.results)
    print(stem.with_suffix(".md").read_text())
    log(f"wrote {stem}.json / .md / .png")


# ---- two cells of other settings, side by side -----------------------------------------------


def settings_apart(a: dict, b: dict) -> dict:
    """The settings the two cells differ in, flattened one level: {key: (A's, B's)}."""
    def flat(s: dict) -> dict:
        return {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in s.items()
                for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}
    fa, fb = flat(a["settings"]), flat(b["settings"])
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def compare_cells(a: dict, b: dict) -> dict:
    """Two cells of the same tasks under other settings (bf16 / fp32, another lr), which no table mixes: each
    one's AP, BWT vs learned and fuse cost, and B − A paired over the same dev examples."""
    if a["settings"]["tasks"] != b["settings"]["tasks"]:
        sys.exit(f"the cells ran other tasks: {a['settings']['tasks']} against {b['settings']['tasks']}")
    sizes = [len(t) for t in a["examples"]["final"]]
    if sizes != [len(t) for t in b["examples"]["final"]]:
        sys.exit(f"the cells scored other numbers of examples per task: {sizes} against "
                 f"{[len(t) for t in b['examples']['final']]}")
    from kifmerge.stats import interval, paired_difference

    indices = task_indices(a["settings"]["tasks"], sizes)
    ea, eb = estimates(a, indices), estimates(b, indices)
    rows = {}
    for name in ("AP", "BWT_vs_learned", "fuse_cost"):
        if name in ea and name in eb:
            rows[name] = {"A": interval(ea[name][1], ea[name][0]), "B": interval(eb[name][1], eb[name][0]),
                          "B_minus_A": paired_difference(eb[name], ea[name])}
    per_task = {t: {"A": 100 * sum(x) / len(x), "B": 100 * sum(y) / len(y)}
                for t, x, y in zip(a["settings"]["tasks"], a["examples"]["final"], b["examples"]["final"], strict=True)}
    return {"method": [a["method"], b["method"]], "seed": [a["seed"], b["seed"]], "settings_apart": settings_apart(a, b),
            "summaries": rows, "final_per_task": per_task}


def render_comparison(result: dict, names: tuple[str, str]) -> str:
    apart = "; ".join(f"{k}: {va!r} → {vb!r}" for k, (va, vb) in result["settings_apart"].items()) or "none"
    lines = [f"A = {names[0]}", f"B = {names[1]}", f"method {' / '.join(dict.fromkeys(result['method']))}, "
             f"seed {' / '.join(map(str, dict.fromkeys(result['seed'])))}; settings apart: {apart}", "",
             "| summary | A | B | B − A |", "| --- | --- | --- | --- |"]
    for name, row in result["summaries"].items():
        lines.append(f"| {name} | {ci(row['A'], name != 'AP')} | {ci(row['B'], name != 'AP')} | "
                     f"{ci(row['B_minus_A'], True)} {row['B_minus_A']['called']} |")
    lines += ["", "final score per task (A → B): " + ", ".join(f"{t} {v['A']:.1f} → {v['B']:.1f}"
                                                              for t, v in result["final_per_task"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
