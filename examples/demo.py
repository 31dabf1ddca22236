"""The real job, end to end, on the default registry (./registry, or $KIFMERGE_REGISTRY):
SmolLM2-135M learns two tasks of the Long Sequence benchmark (agnews, then dbpedia; the copy
vendored in examples/data/long_sequence/, see its README.md) into the line `news` as the tasks
`news-agnews` and `news-dbpedia` with `kifmerge learn` (fused by the default method), every
version is evaluated on both tasks with `kifmerge eval`, and `kifmerge report` prints the
continual-learning table. The same two tasks are then fused by a plain 0.5 average into the line
`news-average`, evaluated the same way, and the demo ends with both lines' AP and fuse cost: what
the default has to beat, on the same trained tasks and examples. Its
names are its own: the README quick start (line `demo`) and examples/quickstart_tiny.py
(line `demo-<time>`) can share the registry with it.

Run by `make demo`, which first prepares SmolLM2-135M (cached). 3.8 minutes on 2 cores from a fresh clone once SmolLM2 is prepared (measured 2026-12-06).
Re-running it reuses what the registry already holds (learned tasks, stored evaluations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "long_sequence"   # inside the checkout
MODEL = Path(os.environ.get("KIFMERGE_MODELS") or "~/.cache/kifmerge/models").expanduser() / "smollm2-135m-instruct"
TASKS = ["agnews", "dbpedia"]
LINE = "news"
AVERAGE = "news-average"  # the same tasks fused by `--method linear --alpha 0.5`
BUDGET = ["--max-steps", "20", "--batch-size", "8", "--max-length", "128", "--lr", "1e-3", "--lora-r", "8",
          "--max-examples", "160"]
EVAL = ["--max-examples", "40", "--max-new-tokens", "6", "--max-length", "128", "--batch-size", "20"]


def train_file(task: str) -> Path:
    return DATA / "train" / f"{task}.jsonl.gz"


def dev_file(task: str) -> Path:
    return DATA / "dev" / f"{task}.jsonl.gz"


def kifmerge(*args: str, capture: bool = True) -> dict | list | None:
    """One CLI command, echoed; its progress bars go to the terminal (stderr)."""
    print(f"\n$ kifmerge {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "kifmerge", *args, *(["--json"] if capture else [])],
                          stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode != 0:
        sys.exit(f"demo stopped: `kifmerge {args[0]}` exited with {done.returncode}")
    return json.loads(done.stdout) if capture else None


def main() -> None:
    started = time.perf_counter()
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run `make smollm2` (or python benchmarks/prepare_smollm2.py)")
    kifmerge("init")
    if not any(b["name"] == "smollm2" for b in kifmerge("list", "bases")):
        kifmerge("base", "add", "smollm2", str(MODEL))
    has_line = any(line["name"] == LINE for line in kifmerge("list", "lines"))
    learned = [v["task"] for v in kifmerge("history", LINE)] if has_line else []
    for number, task in enumerate(TASKS, start=1):
        name = f"{LINE}-{task}"
        if name not in learned:
            base = ["--base", "smollm2"] if number == 1 else []
            result = kifmerge("learn", name, "--data", str(train_file(task)), "--into", LINE, *base, *BUDGET)
            metrics = result["trained"]["metrics"]
            print(f"  {result['version']}: {metrics['steps']} steps in {metrics['runtime_s']:.0f} s, "
                  f"loss {metrics['train_loss']:.3f}, fused by {result['method']}")
    averaged = [v["task"] for v in kifmerge("history", AVERAGE)] if any(
        line["name"] == AVERAGE for line in kifmerge("list", "lines")) else []
    for number, task in enumerate(TASKS, start=1):
        if f"{LINE}-{task}" not in averaged:
            kifmerge("fuse", f"{LINE}-{task}", "--into", AVERAGE, *(["--method", "linear", "--alpha", "0.5"] if number > 1 else []))
    data = [arg for task in TASKS for arg in ("--data", f"{LINE}-{task}={dev_file(task)}")]
    for task in TASKS:  # each task's own weights before any fuse: `report`'s learned column
        kifmerge("eval", f"task:{LINE}-{task}", "--data", f"{LINE}-{task}={dev_file(task)}", *EVAL, capture=False)
    for line in (LINE, AVERAGE):
        for number in range(len(TASKS) + 1):
            kifmerge("eval", f"{line}@v{number}", *data, *EVAL, capture=False)
    kifmerge("report", LINE, capture=False)
    reports = {line: kifmerge("report", line) for line in (LINE, AVERAGE)}
    method = kifmerge("show", f"{LINE}@v{len(TASKS)}")["method"]
    last = f"{LINE}-{TASKS[-1]}"
    print(f"\nthe same trained tasks and examples, fused two ways (exact match ×100; fuse cost: what fusing {last} "
          "cost it at once, its own weights' score minus the line's right after the fuse):")
    for line, how in ((LINE, f"{method} (the default)"), (AVERAGE, "linear, α 0.5")):
        r = reports[line]
        print(f"  {line:<13} {how:<24} AP {100 * r['AP']:5.1f}   fuse cost {100 * (r['learned'][-1] - r['diagonal'][-1]):+5.1f}"
              f"   BWT vs learned {100 * r['BWT_vs_learned']:+5.1f}")
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min; "
          f"export the line with: kifmerge export {LINE} ./out/{LINE} --merged")


if __name__ == "__main__":
    main()
