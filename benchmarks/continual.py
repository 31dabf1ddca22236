"""The continual-learning benchmark: does KIF keep what a line learned?

For one task order of the shared Long Sequence benchmark it teaches SmolLM2-135M the tasks
one after another with each method, evaluates every version on every task, and compares:

  seq           SeqLoRA: each task trained from the previous adapter, no fusion (linear, alpha 1)
  kif           KIF static rule (kifmerge defaults)
  kif-adaptive  KIF softmax rule
  linear        plain averaging with the previous version (alpha 0.5)
  ties          TIES merging of the LoRA factors (density 0.5, equal weights)
  mtl           one adapter trained on all tasks together, with the same total steps (upper bound)

Every method gets the same budget (steps, lr, LoRA r, examples). Training is shared wherever
the inputs are identical: lines whose newest versions hold the same weights train the next
task once (so the first two tasks are trained once for all sequential methods).

Resumable: state lives in a kifmerge registry under --work; finished trainings, fuses and
evaluations are found there and skipped. Writes benchmarks/results/order<N>.{json,md,png}.

    python benchmarks/continual.py --order 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "benchmarks" / "long_sequence"
SMOLLM2 = Path(os.environ.get("KIFMERGE_MODELS") or "~/.cache/kifmerge/models").expanduser() / "smollm2-135m-instruct"
ORDERS = {1: "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst-2 dbpedia agnews multirc yahoo",
          2: "multirc boolqa wic mnli cb copa qqp rte imdb sst-2 dbpedia agnews yelp amazon yahoo",
          3: "yelp amazon mnli cb copa qqp rte imdb sst-2 dbpedia agnews yahoo multirc boolqa wic",
          4: "dbpedia amazon yahoo agnews", 5: "dbpedia amazon agnews yahoo", 6: "yahoo amazon agnews dbpedia"}
FUSE = {"seq": {"method": "linear", "alpha": 1.0}, "kif": {"method": "kif"},
        "kif-adaptive": {"method": "kif-adaptive"}, "linear": {"method": "linear", "alpha": 0.5},
        "ties": {"method": "ties"}}  # TIES on the LoRA factors, zero adapter as reference, density 0.5
NOT_YET: dict[str, str] = {}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def progress_bars():
    """kifmerge's progress(description, total) protocol, drawn by rich on a terminal."""
    if not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    bars.start()

    def start(description: str, total: int):
        task = bars.add_task(description, total=total)
        return lambda n=1: bars.advance(task, n)

    return start


def dev_file(task: str) -> Path:
    return DATA / "dev" / f"{task}.json"


class Experiment:
    def __init__(self, args: argparse.Namespace):
        from kifmerge import api

        self.api, self.args = api, args
        self.tasks = ORDERS[args.order].split()[: args.tasks or None]
        self.registry = args.work / "registry"
        self.methods = [m for m in args.methods.split(",") if m]
        self.progress = progress_bars()
        self.train_options = {"max_steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                              "max_length": args.max_length, "lora_r": args.lora_r, "max_examples": args.train_examples,
                              "seed": args.seed}
        self.eval_options = {"max_examples": args.eval_examples, "max_new_tokens": args.max_new_tokens,
                             "max_length": args.max_length, "batch_size": args.eval_batch_size}
        self.wall_file = args.work / "wall.json"  # step times survive a resumed run
        self.wall: dict[str, float] = json.loads(self.wall_file.read_text()) if self.wall_file.exists() else {}
        earlier = HERE / "results" / f"order{args.order}{args.suffix}.json"
        if not self.wall and earlier.exists():  # a results file written before wall.json existed
            self.wall = json.loads(earlier.read_text()).get("step_wall_s", {})

    def setup(self) -> None:
        self.api.init(self.registry)
        if not any(b["name"] == "smollm2" for b in self.api.list_items("bases", registry=self.registry)):
            self.api.add_base("smollm2", SMOLLM2, registry=self.registry)

    def head_weights(self, line: str) -> str | None:
        history = self.api.history(line, registry=self.registry) if self._line_exists(line) else []
        return self.api.show(history[-1]["version"], registry=self.registry)["weights"] if history else None

    def _line_exists(self, line: str) -> bool:
        return any(row["name"] == line for row in self.api.list_items("lines", registry=self.registry))

    def _task_exists(self, name: str) -> bool:
        return any(row["name"] == name for row in self.api.list_items("tasks", registry=self.registry))

    def learned(self, line: str) -> list[str]:
        return [v["task"] for v in self.api.history(line, registry=self.registry)] if self._line_exists(line) else []

    def train(self, name: str, data: Path, line: str, options: dict) -> None:
        if self._task_exists(name):
            return
        log(f"train {name} from {line if self._line_exists(line) else 'the base'}")
        started = time.perf_counter()
        self.api.train(name, data, line, base="smollm2", options=options, registry=self.registry, progress=self.progress)
        self.record(f"train:{name}", started)

    def evaluate(self, line: str, number: int) -> None:
        data = {task: dev_file(task) for task in self.tasks}
        started = time.perf_counter()
        result = self.api.evaluate(f"{line}@v{number}", data, registry=self.registry, progress=self.progress, **self.eval_options)
        scores = "  ".join(f"{t} {r['exact_match']:.2f}{'*' if r['reused'] else ''}" for t, r in result["results"].items())
        log(f"eval {line}@v{number}: {scores}")
        if not all(r["reused"] for r in result["results"].values()):
            self.record(f"eval:{line}@v{number}", started)

    def record(self, step: str, started: float) -> None:
        self.wall[step] = round(time.perf_counter() - started, 1)
        self.wall_file.write_text(json.dumps(self.wall, indent=1))

    def sequential_methods(self) -> None:
        lines = [m for m in self.methods if m in FUSE]
        for step, task in enumerate(self.tasks, start=1):
            groups: dict[str | None, list[str]] = {}
            for line in lines:
                if len(self.learned(line)) < step:
                    groups.setdefault(self.head_weights(line), []).append(line)
            for head, members in groups.items():
                name = f"{task}-{head[:10] if head else 'base'}"
                self.train(name, DATA / "train" / f"{task}.json", members[0], self.train_options)
                for line in members:
                    log(f"fuse {name} into {line} ({FUSE[line]['method']})")
                    self.api.fuse(name, line, registry=self.registry, **FUSE[line])
            for line in lines:
                if step == 1:
                    self.evaluate(line, 0)
                self.evaluate(line, step)

    def multitask(self) -> None:
        mixed = self.args.work / "mtl-train.json"
        if not mixed.exists():
            records = []
            for task in self.tasks:
                records += json.loads((DATA / "train" / f"{task}.json").read_text())[: self.args.train_examples]
            random.Random(self.args.seed).shuffle(records)
            mixed.write_text(json.dumps([{"input": r["input"], "output": r["output"]} for r in records]))
        options = {**self.train_options, "max_steps": self.args.steps * len(self.tasks), "max_examples": None}
        self.train("mtl-all", mixed, "mtl", options)
        if not self.learned("mtl"):
            self.api.fuse("mtl-all", "mtl", registry=self.registry)
        self.evaluate("mtl", 0)
        self.evaluate("mtl", 1)

    def results(self) -> dict:
        rows = {}
        for method in self.methods:
            if method in NOT_YET:
                rows[method] = {"status": NOT_YET[method]}
                continue
            report = self.api.report(method, tasks=self.tasks, registry=self.registry)
            train_s = sum(self.api.show(t, registry=self.registry)["metrics"]["runtime_s"] for t in self.learned(method))
            rows[method] = {**{k: report[k] for k in ("AP", "BWT", "FWT", "matrix", "versions", "fused")},
                            "train_s_of_its_tasks": round(train_s, 1)}
        return rows


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def write_outputs(experiment: Experiment, rows: dict, elapsed: float) -> Path:
    args = experiment.args
    stem = HERE / "results" / f"order{args.order}{args.suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    payload = {"benchmark": "continual", "order": args.order, "tasks": experiment.tasks, "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)",
               "metric": "exact_match on dev (first --eval-examples records)", "settings": settings, "methods": rows,
               "wall_s_this_run": round(elapsed, 1), "wall_s_all_steps": round(sum(experiment.wall.values()), 1),
               "step_wall_s": experiment.wall, "git_commit": args.run["git_commit"], "started": args.run["started"],
               "git_commit_of_last_resume": git_commit(),
               "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "command": "python benchmarks/continual.py " + " ".join(sys.argv[1:])}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [f"# Continual learning, order {args.order}: {' → '.join(experiment.tasks)}", "",
             f"SmolLM2-135M, LoRA r {args.lora_r} (q/v), {args.steps} steps per task at batch {args.batch_size}, lr {args.lr}, "
             f"max length {args.max_length}; exact match on the first {args.eval_examples} dev examples of each task. "
             f"MTL trains on all tasks for {args.steps * len(experiment.tasks)} steps. "
             f"Wall time {sum(experiment.wall.values()) / 60:.1f} min of training and evaluation.", "",
             "| method | AP | BWT | FWT | final row |", "| --- | --- | --- | --- | --- |"]
    for method, row in rows.items():
        if "status" in row:
            lines.append(f"| {method} | — | — | — | {row['status']} |")
            continue
        final = ", ".join(f"{t} {v:.2f}" for t, v in zip(experiment.tasks, row["matrix"][-1], strict=True) if v is not None)
        lines.append(f"| {method} | {_pct(row['AP'])} | {_pct(row['BWT'])} | {_pct(row['FWT'])} | {final} |")
    lines += ["", "AP, BWT, FWT in points (×100). R matrices: the JSON file; picture: the PNG.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    try:
        draw_all(experiment, rows, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib not installed: no PNG (pip install 'kifmerge[plot]')")
    return stem


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}" if value < 0 else f"{100 * value:.1f}"


def draw_all(experiment: Experiment, rows: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {m: r for m, r in rows.items() if "matrix" in r}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for axis, (method, row) in zip(axes[0], shown.items(), strict=True):
        matrix = [[float("nan") if v is None else v for v in r] for r in row["matrix"]]
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(experiment.tasks)), experiment.tasks, rotation=40, ha="right", fontsize=7)
        axis.set_yticks(range(len(row["versions"])), row["versions"], fontsize=7)
        for i, r in enumerate(row["matrix"]):
            for j, v in enumerate(r):
                if v is not None:
                    axis.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        axis.set_title(f"{method}\nAP {_pct(row['AP'])} BWT {_pct(row['BWT'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", type=int, default=4, choices=sorted(ORDERS))
    parser.add_argument("--tasks", type=int, default=0, help="only the first N tasks of the order (0: all)")
    parser.add_argument("--methods", default="seq,kif,kif-adaptive,linear,ties,mtl")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=320, help="training records used per task")
    parser.add_argument("--eval-examples", type=int, default=100, help="dev records evaluated per task")
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None, help="state folder (default benchmarks/work/order<N>)")
    parser.add_argument("--suffix", default="", help="suffix for the results files (e.g. -smoke)")
    args = parser.parse_args()
    args.work = args.work or HERE / "work" / f"order{args.order}{args.suffix}"
    if not (SMOLLM2 / "config.json").exists():
        sys.exit(f"{SMOLLM2} is missing: run `python benchmarks/prepare_smollm2.py` first (see benchmarks/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    run_file = args.work / "run.json"  # the commit that started the experiment; resumes keep it
    if not run_file.exists():
        run_file.write_text(json.dumps({"git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    args.run = json.loads(run_file.read_text())
    started = time.perf_counter()
    experiment = Experiment(args)
    experiment.setup()
    log(f"order {args.order}: {' → '.join(experiment.tasks)}; methods {experiment.methods}; work in {args.work}")
    if any(m in FUSE for m in experiment.methods):
        experiment.sequential_methods()
    if "mtl" in experiment.methods:
        experiment.multitask()
    rows = experiment.results()
    stem = write_outputs(experiment, rows, time.perf_counter() - started)
    print(stem.with_suffix(".md").read_text())
    log(f"wrote {stem}.json / .md / .png")


if __name__ == "__main__":
    main()
