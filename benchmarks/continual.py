"""The continual-learning benchmark: does importance-guided fusion keep what a line learned
better than averaging?

A sequence of tasks (a built-in order of the Long Sequence benchmark, shipped in
examples/data/, or any sequence given with --sequence) is taught to SmolLM2-135M with every
method; each method's line is evaluated where the metrics need it:

  learned   L[j]     task j's own trained adapter, before any fuse  (`eval task:NAME`)
  diagonal  R[j][j]  the line right after fusing task j
  final     R[T][j]  the line after the last task                    (--full-matrix: every row)

and summarised as AP = mean_j R[T][j], BWT vs learned = mean_{j<T} R[T][j] − L[j],
BWT after fuse = mean_{j<T} R[T][j] − R[j][j], fuse cost = mean_j L[j] − R[j][j]. Every method is
scored on the same examples, so a paired bootstrap over examples (resampled within each task,
the same resample for every method, seed and order) gives 95 % intervals for each summary and
for each method's AP difference from the default method (kif); a difference is called only when
its interval excludes 0.

Methods (each row says exactly what it is: see METHODS). Trainings with identical inputs
(same start weights, data and options) are shared between lines. Resumable: state lives in a
kifmerge registry under --work; finished trainings, fuses and evaluations are found and skipped.

    python benchmarks/continual.py --order 4 --seeds 42,43      # → benchmarks/results/order4.{json,md,png}
    python benchmarks/continual.py --sequence my-sequence.json   # any sequence: {"name", "tasks": [{"name","train","dev"}]}
    python benchmarks/continual.py --summary                     # → benchmarks/results/summary.{json,md} over orders 4–6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
DATA = ROOT / "examples" / "data" / "long_sequence"
RESULTS = HERE / "results"
SMOLLM2 = Path(os.environ.get("KIFMERGE_MODELS") or "~/.cache/kifmerge/models").expanduser() / "smollm2-135m-instruct"
ORDERS = {4: "dbpedia amazon yahoo agnews", 5: "dbpedia amazon agnews yahoo", 6: "yahoo amazon agnews dbpedia"}
DEFAULT_METHOD = "kif"
REPLICATES = 2000


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
    "linear-0.7": Method("average 0.7·new + 0.3·old of the LoRA factors", {"method": "linear", "alpha": 0.7}),
    "ties": Method("TIES on task vectors new − start (start: the version the task was trained from), density 0.5",
                   {"method": "ties", "density": 0.5}),
    "dare": Method("DARE-linear on task vectors new − start, density 0.5, weights 0.5/0.5, seed 0",
                   {"method": "dare-linear", "density": 0.5}),
    "replay": Method("SeqLoRA with 2 % of each training set drawn from the line's earlier tasks (--replay 0.02)",
                     SEQ, later={"replay": 0.02}),
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


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: Path
    dev: Path


def builtin_sequence(order: int) -> list[TaskFiles]:
    return [TaskFiles(t, DATA / "train" / f"{t}.jsonl.gz", DATA / "dev" / f"{t}.jsonl.gz") for t in ORDERS[order].split()]


def sequence_from_file(path: Path) -> tuple[str, list[TaskFiles]]:
    """{"name": …, "tasks": [{"name", "train", "dev"}, …]}; paths relative to the file."""
    spec = json.loads(path.read_text())
    tasks = [TaskFiles(t["name"], (path.parent / t["train"]).resolve(), (path.parent / t["dev"]).resolve()) for t in spec["tasks"]]
    for task in tasks:
        for file in (task.train, task.dev):
            if not file.is_file():
                sys.exit(f"{path}: task {task.name!r}: {file} not found")
    if len({t.name for t in tasks}) != len(tasks) or len(tasks) < 2:
        sys.exit(f"{path}: give at least two tasks with distinct names")
    return spec.get("name") or path.stem, tasks


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_options(args: argparse.Namespace, seed: int) -> dict:
    """The training options of every task (also the inputs of its name's digest)."""
    return {"max_steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup, "batch_size": args.batch_size,
            "max_length": args.max_length, "lora_r": args.lora_r, "max_examples": args.train_examples,
            "seed": seed, "bf16": args.bf16}


class Experiment:
    """One sequence, one seed: every method's line in one registry under `work`."""

    def __init__(self, args: argparse.Namespace, tasks: list[TaskFiles], seed: int, work: Path):
        from kifmerge import api

        self.api, self.args, self.seed = api, args, seed
        self.first = args.tasks if args.tasks and args.tasks < len(tasks) else None
        self.tasks = tasks[: self.first] if self.first else tasks
        self.registry = work / "registry"
        self.train_options = train_options(args, seed)
        self.eval_options = {"max_examples": args.eval_examples, "max_new_tokens": args.max_new_tokens,
                             "max_length": args.max_length, "batch_size": args.eval_batch_size}
        if args.bf16_eval:
            self.eval_options["bf16"] = True
        self.wall_file = work / ("wall.json" if self.first is None else f"wall-first{self.first}.json")  # survive a resume
        self.wall: dict[str, float] = json.loads(self.wall_file.read_text()) if self.wall_file.exists() else {}
        self.api.init(self.registry)
        if not self.api.list_items("bases", registry=self.registry):
            self.api.add_base("smollm2", SMOLLM2, registry=self.registry)

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

    def timed(self, step: str, fn) -> object:
        started = time.perf_counter()
        result = fn()
        self.wall[step] = round(time.perf_counter() - started, 1)
        self.wall_file.write_text(json.dumps(self.wall, indent=1))
        return result

    # ---- the work ----------------------------------------------------------------------------
    def train(self, name: str, data: Path, line: str, options: dict) -> None:
        if self.task_exists(name):
            return
        log(f"seed {self.seed}: train {name} from {line if self.versions(line) else 'the base'}")
        self.timed(f"train:{name}", lambda: self.api.train(name, data, line, base="smollm2", options=options, registry=self.registry))

    def build(self, method: str) -> None:
        """Teach the method's line the sequence task by task. A training is named by a digest of
        its inputs (start weights, options, data), so lines whose heads and options agree share it."""
        line = self.line(method)
        for step, task in enumerate(self.tasks, start=1):
            if len(self.versions(line)) >= step:
                continue
            options = self.options_for(method, step)
            key = digest(self.head_weights(line), options, str(task.train), line if options.get("replay") else None)
            name = f"{task.name}-{key}"
            self.train(name, task.train, line, options)
            log(f"seed {self.seed}: fuse {name} into {line} ({METHODS[method].fuse})")
            self.timed(f"fuse:{line}@{step}", lambda: self.api.fuse(name, line, registry=self.registry, **METHODS[method].fuse))

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
            from kifmerge.training import load_records

            records = [r for t in self.tasks for r in load_records(t.train, self.args.train_examples)]
            random.Random(self.seed).shuffle(records)
            mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
        options = {**self.train_options, "max_steps": self.args.steps * len(self.tasks), "max_examples": None}
        line, task = self.line("mtl"), "mtl-all" if self.first is None else f"mtl-first{self.first}"
        self.train(task, mixed, line, options)
        if not self.versions(line):
            self.api.fuse(task, line, registry=self.registry)

    def evaluate(self, ref: str, tasks: list[TaskFiles]) -> None:
        data = {t.name: t.dev for t in tasks}
        result = self.timed(f"eval:{ref}:{','.join(data)}", lambda: self.api.evaluate(ref, data, registry=self.registry, **self.eval_options))
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
        """Method by method, in the order given (a run cut short leaves whole methods behind)."""
        for line in self.args.methods:
            if line == "mtl":
                self.multitask()
            else:
                self.build(line)
            self.evaluate_line(line)

    def collect(self) -> dict:
        """Per method: the report with per-example scores (the bootstrap's input)."""
        labels = [t.name for t in self.tasks]
        rows = {}
        for method in self.args.methods:
            report = self.api.report(self.line(method), tasks=labels, examples=True, registry=self.registry)
            if method == "mtl":  # one version that learned everything: its final row is all there is
                report["examples"]["learned"] = report["examples"]["diagonal"] = report["examples"]["final"]
            rows[method] = report
        return rows


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
        cost = [np.asarray(l) - np.asarray(d) for l, d in zip(learned, diagonal, strict=True)]
        out["fuse_cost"] = average_precision(cost, idx)
    return out


def method_statistics(per_seed: list[dict], tasks: list[str]) -> dict:
    """Across seeds (averaged on shared resamples): intervals per summary and the paired AP
    difference of every method from the default."""
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
    if linear:
        best = max(linear, key=lambda m: est[m]["AP"][0])
        out["linear-best"] = {**out[best], "is": best}
    return out


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


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def write_order(stem: Path, title: str, tasks: list[str], args: argparse.Namespace, per_seed: list[dict], walls: dict) -> None:
    stats = method_statistics(per_seed, tasks)
    table = per_task_table(per_seed, tasks)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("summary",)}
    payload = {"benchmark": "continual", "title": title, "tasks": tasks, "seeds": args.seeds, "default_method": DEFAULT_METHOD,
               "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
               "metric": f"exact match (case-folded) on the first {args.eval_examples} dev examples of each task",
               "methods": {m: METHODS[m].describe for m in per_seed[0]}, "statistics": stats, "per_task": table,
               "examples": {m: {k: [["".join(str(int(v)) for v in task) for task in seed[m]["examples"][k]] for seed in per_seed]
                                for k in ("final", "learned", "diagonal")} for m in per_seed[0]},
               "matrix": {m: [seed[m]["matrix"] for seed in per_seed] for m in per_seed[0]},
               "wall_s": walls, "settings": settings, "git_commit": git_commit(),
               "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
               "command": "python benchmarks/continual.py " + " ".join(sys.argv[1:])}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(render_order(payload))
    try:
        draw(payload, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib not installed: no PNG (pip install 'kifmerge[plot]')")


def render_order(p: dict) -> str:
    s = p["settings"]
    total = sum(p["wall_s"].values())
    lines = [f"# Continual learning: {p['title']} ({' → '.join(p['tasks'])})", "",
             f"SmolLM2-135M, LoRA r {s['lora_r']} (q/v), {s['steps']} steps per task at batch {s['batch_size']}, lr {s['lr']} "
             f"with {s['warmup']} warmup steps, max length {s['max_length']}, bf16 training {s['bf16']}, bf16 eval {s['bf16_eval']}; "
             f"seeds {', '.join(map(str, p['seeds']))}. {p['metric']}. Points ×100; [95 % paired-bootstrap interval over examples, "
             f"{REPLICATES} resamples within each task, the same for every method; seeds averaged]. "
             f"Wall time {total / 60:.1f} min ({', '.join(f'seed {k}: {v / 60:.1f} min' for k, v in p['wall_s'].items())}) on {p['machine']}.", "",
             f"| method | AP | AP − {p['default_method']} | BWT vs learned | BWT after fuse | fuse cost |", "| --- | --- | --- | --- | --- | --- |"]
    for m, row in p["statistics"].items():
        name = f"{m} (= {row['is']})" if "is" in row else m
        diff = row.get("AP_minus_default")
        called = f" {diff['called']}" if diff and diff["called"] != "no difference" else ""
        lines.append(f"| {name} | {ci(row['AP'])} | {ci(diff, True) + called if diff else '—'} | {ci(row.get('BWT_vs_learned'), True)} | "
                     f"{ci(row.get('BWT_after_fuse'), True)} | {ci(row.get('fuse_cost'), True)} |")
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


def write_summary(orders: list[int], results: Path = RESULTS) -> None:
    """Across orders: per method the mean AP and BWT vs learned with intervals (resamples
    shared per task across orders, seeds averaged first) and the AP difference from the default."""
    from kifmerge.stats import combine, interval, paired_difference

    found = {o: json.loads((results / f"order{o}.json").read_text()) for o in orders if (results / f"order{o}.json").exists()}
    if not found:
        sys.exit("no order results yet: run benchmarks/continual.py --order N first")
    methods = [m for m in next(iter(found.values()))["methods"] if all(m in r["methods"] for r in found.values())]
    est: dict[str, dict] = {m: {} for m in methods}
    for o, payload in found.items():
        tasks = payload["tasks"]
        sizes = [len(s) for s in payload["examples"][methods[0]]["final"][0]]
        indices = task_indices(tasks, sizes)
        for m in methods:
            seeds = [{"method": m, "examples": {k: [list(map(int, s)) for s in payload["examples"][m][k][i]]
                                                for k in ("final", "learned", "diagonal")}} for i in range(len(payload["seeds"]))]
            per = [estimates(seed, indices) for seed in seeds]
            for key in per[0]:
                est[m].setdefault(key, []).append(combine([p[key] for p in per]))
    stats = {}
    for m in methods:
        stats[m] = {}
        for key, values in est[m].items():
            point, replicates = combine(values)
            stats[m][key] = interval(replicates, point)
        if m != DEFAULT_METHOD and DEFAULT_METHOD in est:
            stats[m]["AP_minus_default"] = paired_difference(combine(est[m]["AP"]), combine(est[DEFAULT_METHOD]["AP"]))
    payload = {"benchmark": "continual-summary", "orders": sorted(found), "default_method": DEFAULT_METHOD,
               "methods": {m: METHODS[m].describe for m in methods}, "statistics": stats,
               "wall_s_per_order": {o: round(sum(p["wall_s"].values()), 1) for o, p in found.items()},
               "git_commit": git_commit(), "command": "python benchmarks/continual.py --summary"}
    (results / "summary.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Continual learning across orders {', '.join(map(str, sorted(found)))}", "",
             f"Mean over orders (each order's seeds averaged first); points ×100 with 95 % paired-bootstrap intervals over "
             f"examples (resamples shared per task across methods, seeds and orders). Default method: **{DEFAULT_METHOD}** "
             f"(`kifmerge fuse` without --method). A difference is called only when its interval excludes 0.", "",
             f"| method | AP | AP − {DEFAULT_METHOD} | BWT vs learned | fuse cost |", "| --- | --- | --- | --- | --- |"]
    for m, row in stats.items():
        diff = row.get("AP_minus_default")
        lines.append(f"| {m} | {ci(row['AP'])} | {ci(diff, True) + (' ' + diff['called'] if diff else '') if diff else '—'} | "
                     f"{ci(row.get('BWT_vs_learned'), True)} | {ci(row.get('fuse_cost'), True)} |")
    lines += ["", "Wall time per order: " + ", ".join(f"order {o}: {s / 60:.1f} min" for o, s in payload["wall_s_per_order"].items()), ""]
    (results / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", type=int, default=4, choices=sorted(ORDERS))
    parser.add_argument("--sequence", type=Path, help="a JSON sequence file instead of a built-in order")
    parser.add_argument("--summary", action="store_true", help="only write summary.{json,md} from the order results")
    parser.add_argument("--methods", default="seq,kif,linear-0.5,mtl,ties,linear-0.7,linear-0.3,dare,replay,orth",
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--tasks", type=int, default=0, help="only the first N tasks (a cheap screen: lines METHOD-firstN)")
    parser.add_argument("--seeds", default="42", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=1000, help="training records used per task")
    parser.add_argument("--eval-examples", type=int, default=300, help="dev records evaluated per task")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    parser.add_argument("--bf16-eval", action="store_true", help="bf16 autocast for evaluation too")
    parser.add_argument("--full-matrix", action="store_true", help="evaluate every version on every task")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default benchmarks/work/<name>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: <results>/<name>)")
    args = parser.parse_args()
    if args.summary:
        write_summary(sorted(ORDERS), args.results)
        return
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if not (SMOLLM2 / "config.json").exists():
        sys.exit(f"{SMOLLM2} is missing: run `make smollm2` (or python benchmarks/prepare_smollm2.py) first")
    if args.sequence:
        name, tasks = sequence_from_file(args.sequence)
    else:
        name, tasks = f"order{args.order}", builtin_sequence(args.order)
    work = args.work or HERE / "work" / name
    walls, per_seed = {}, []
    for seed in args.seeds:
        experiment = Experiment(args, tasks, seed, work / f"seed{seed}")
        log(f"{name}, seed {seed}: {' → '.join(t.name for t in tasks)}; methods {args.methods}; work in {work / f'seed{seed}'}")
        experiment.run()
        per_seed.append(experiment.collect())
        walls[str(seed)] = round(sum(experiment.wall.values()), 1)
    stem = args.out or args.results / (name if not args.tasks else f"{name}-first{args.tasks}")
    write_order(stem, name, [t.name for t in tasks][: args.tasks or None], args, per_seed, walls)
    print(stem.with_suffix(".md").read_text())
    log(f"wrote {stem}.json / .md / .png")


if __name__ == "__main__":
    main()
