"""What does knowledge identification cost? The same training run with and without the
importance callback: median step time (ratio; target ≤ 1.03) and peak RSS of each.

Each run is a separate process (so peak RSS belongs to one run), alternating off/on to
spread machine noise evenly. Models: a tiny Llama built in code (always) and SmolLM2-135M
when prepared (`python benchmarks/prepare_smollm2.py`). Writes
benchmarks/results/importance_overhead.json.

    python benchmarks/importance_overhead.py [--steps 12] [--repeats 2] [--only tiny-lora,...]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, SMOLLM2, add_results_option, argument_parser, run_record, timing_calls, write_results

# name → (model, mode, batch size, max length, steps factor)
CASES = {
    "tiny-lora": ("tiny", "lora", 8, 64, 4),
    "tiny-full": ("tiny", "full", 8, 64, 4),
    "smollm2-lora": ("smollm2", "lora", 4, 64, 1),
    "smollm2-full": ("smollm2", "full", 4, 64, 1),
}


def tiny_model(folder: Path) -> Path:
    from kifmerge.testing import build_llama

    if not (folder / "config.json").exists():
        build_llama(folder)
    return folder


def worker(case: str, steps: int, callback: bool, model_dir: Path) -> dict:
    """One training run in this process, as `kifmerge train` sets it up (with or without the
    importance callback); returns step times and peak RSS."""
    import torch
    from transformers import TrainerCallback

    from kifmerge.data import load_records
    from kifmerge.options import TrainOptions
    from kifmerge.training import build_trainer

    _, mode, batch, length, _ = CASES[case]
    config = json.loads((model_dir / "config.json").read_text())
    options = TrainOptions(mode=mode, max_steps=steps, batch_size=batch, max_length=length, lr=1e-4)
    torch.set_num_threads(os.cpu_count() or 1)
    records = load_records(DATA / "train" / "agnews.jsonl.gz", max_examples=steps * batch)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    update_times: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer, accumulator = build_trainer(model_dir, config, options, None, records, [], Path(out), callbacks=[timer],
                                             importance=callback)
        if accumulator is not None:
            accumulator.update = timing_calls(accumulator.update, update_times)
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"step_times": timer.times[1:],  # the first step warms caches up
            "update_times": update_times[1:],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "trainable": trainable}


def run_case(case: str, steps: int, repeats: int, model_dir: Path) -> dict:
    runs = {"off": [], "on": []}
    for _ in range(repeats):
        for variant in ("off", "on"):
            done = subprocess.run([sys.executable, __file__, "--worker", case, "--steps", str(steps),
                                   "--callback", variant, "--model-dir", str(model_dir)],
                                  capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                raise SystemExit(f"{case}/{variant} failed:\n{done.stderr[-2000:]}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {v: statistics.median(t for r in runs[v] for t in r["step_times"]) for v in runs}
    return {"case": case, "steps": steps, "repeats": repeats, "trainable_parameters": runs["on"][0]["trainable"],
            "step_s_off": round(median["off"], 5), "step_s_on": round(median["on"], 5),
            "ratio": round(median["on"] / median["off"], 4),
            "callback_ms": round(1000 * statistics.median(t for r in runs["on"] for t in r["update_times"]), 3),
            "peak_rss_mb_off": round(max(r["peak_rss_mb"] for r in runs["off"]), 1),
            "peak_rss_mb_on": round(max(r["peak_rss_mb"] for r in runs["on"]), 1)}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=12, help="steps per run for SmolLM2 (tiny runs 4×)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=",".join(CASES))
    add_results_option(parser)
    parser.add_argument("--worker")
    parser.add_argument("--callback", choices=["on", "off"])
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.callback == "on", args.model_dir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for case in args.only.split(","):
            model, _, _, _, factor = CASES[case]
            if model == "smollm2" and not (SMOLLM2 / "config.json").exists():
                print(f"skip {case}: {SMOLLM2} not prepared (python benchmarks/prepare_smollm2.py)", file=sys.stderr)
                continue
            model_dir = SMOLLM2 if model == "smollm2" else tiny_model(Path(scratch) / "tiny")
            rows.append(run_case(case, args.steps * factor, args.repeats, model_dir))
            row = rows[-1]
            print(f"{row['case']:<14} step off {row['step_s_off']*1000:9.1f} ms  on {row['step_s_on']*1000:9.1f} ms  "
                  f"ratio {row['ratio']:.3f}  callback {row['callback_ms']:7.1f} ms  peak RSS off {row['peak_rss_mb_off']:7.0f} MB  on {row['peak_rss_mb_on']:7.0f} MB",
                  flush=True)
    result = {**run_record("importance_overhead"), "rows": rows}  # the load average at the end
    out = write_results(args.results / "importance_overhead.json", result, markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md').name}")


def markdown(result: dict) -> str:
    lines = [f"# importance_overhead — {result['when']} (commit {result['git_commit']}; {result['cpus']} CPUs, "
             f"load average {result['load_average']:.2f} at the end)", "",
             "Median training step with and without the importance callback, each run its own process, off/on alternated; "
             "the callback's own time is measured around each update (target: ratio ≤ 1.03).", "",
             "| case | trainable | step off ms | step on ms | ratio | callback ms (share of the step) | peak RSS off → on MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        share = r["callback_ms"] / (1000 * r["step_s_off"])
        lines.append(f"| {r['case']} | {r['trainable_parameters']:,} | {1000 * r['step_s_off']:.0f} | {1000 * r['step_s_on']:.0f} | "
                     f"{r['ratio']:.3f} | {r['callback_ms']:.1f} ({100 * share:.1f} %) | {r['peak_rss_mb_off']:.0f} → {r['peak_rss_mb_on']:.0f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
