"""What the benchmark scripts share, written once: where things are, the record every result file
carries (commit, machine, load, command line) and how it is written, a command's wall time and
peak RSS, the model session of the scripts that train or generate, the options several scripts
take, and the continual benchmark's task sequences and training names (bf16_check.py shares its
trainings).

A script run as `python benchmarks/NAME.py` has this folder on sys.path: `from common import …`.
kifmerge itself is imported as installed (`pip install -e .`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
WORK = BENCHMARKS / "work"  # gitignored: registries, built checkpoints, scratch
DATA = ROOT / "examples" / "data" / "long_sequence"  # the vendored Long Sequence tasks: train/ and dev/TASK.jsonl.gz
SMOLLM2 = (Path(os.environ.get("KIFMERGE_MODELS") or "~/.cache/kifmerge/models").expanduser() / "smollm2-135m-instruct").resolve()


# ---- the model -------------------------------------------------------------------------------
def require_model(folder: Path) -> None:
    """Exit unless `folder` holds a model, saying how to make SmolLM2 (converted once by prepare_smollm2.py)."""
    if not (folder / "config.json").exists():
        hint = ": run `make smollm2` (or python benchmarks/prepare_smollm2.py) first" if folder == SMOLLM2 else ""
        sys.exit(f"{folder} is missing{hint}")


def model_label(model: Path | str) -> str:
    """How a result's title names its model: SmolLM2-135M, else the folder's name."""
    return "SmolLM2-135M" if Path(model) == SMOLLM2 else Path(model).name


def model_session(model: Path, threads: int | None):
    """The model's tokenizer, torch set to `threads` (default: $OMP_NUM_THREADS, else the cores)
    and transformers quiet; exits when the model is missing. Returns (threads, tokenizer)."""
    require_model(model)
    import torch
    from transformers.utils import logging as hf_logging

    from kifmerge.modeling import load_tokenizer

    hf_logging.set_verbosity_error()
    env = os.environ.get("OMP_NUM_THREADS")
    threads = threads or (int(env) if env and env.isdigit() else len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads, load_tokenizer(model)


# ---- measuring -------------------------------------------------------------------------------
def timed(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, measured by GNU time."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    wall, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def timing_calls(fn, seconds: list[float]):
    """`fn`, with the wall seconds of each call appended to `seconds` (the importance callback's
    update, timed inside a training)."""
    def timed_fn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return timed_fn


# ---- what every result records -----------------------------------------------------------------
def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def git_commit() -> str | None:
    """The checkout's commit (short), None outside a git checkout."""
    return git("rev-parse", "--short", "HEAD") or None


def uncommitted_changes() -> bool:
    """Whether tracked files differ from the commit (a result of code that no commit holds)."""
    return bool(git("status", "--porcelain", "--untracked-files=no"))


def cpu_model() -> str | None:
    """The CPU's model name (Linux), None where /proc/cpuinfo is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else None


def machine() -> str:
    """The platform, CPU model, core count and torch's CPU kernel level: wall times of two machines
    differ up to 4× in float32 (a 120-step training: ~9.5 min on an AVX2 EPYC, ~2.4 min on an AMX Xeon),
    so a cell says which one measured it."""
    import torch

    parts = [platform.platform(), cpu_model(), f"{os.cpu_count()} CPUs", torch.backends.cpu.get_cpu_capability()]
    return ", ".join(part for part in parts if part)


def command_line() -> str:
    """How this run was started, as the results README gives commands."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def stamp() -> dict:
    """When and on what code a measurement ran, and how busy the machine was (the load average:
    every machine here is shared): one per run in files that keep several runs."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_commit": git_commit(),
            "load_average": round(load, 2) if load is not None else None}


def run_record(benchmark: str) -> dict:
    """The head of every result file: the benchmark, its stamp, the machine and the command line."""
    return {"benchmark": benchmark, **stamp(), "machine": machine(), "cpus": os.cpu_count(), "command": command_line()}


def options_record(args: argparse.Namespace) -> dict:
    """A run's options as its result file keeps them (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_results(out: Path, payload: dict, markdown: str | None = None) -> Path:
    """`payload` as the JSON file `out` (and `markdown` beside it, as .md). The JSON is written under
    a temporary name and renamed, so a run cut short never leaves half a file where a whole one was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(out)
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown)
    return out


# ---- options -------------------------------------------------------------------------------------
def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring, commands included, is its --help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, metavar="DIR", help="results folder (default benchmarks/results)")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=lambda folder: Path(folder).expanduser().resolve(), default=SMOLLM2, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct as prepare_smollm2.py converts it; a tiny "
                             "model checks the script in seconds)")


def check_other_model_folders(args: argparse.Namespace) -> None:
    """A model other than SmolLM2 runs in folders of its own: its trainings would otherwise sit in the
    SmolLM2 registry under names that do not say the model, and its cells beside the committed ones."""
    if args.model != SMOLLM2 and (args.work is None or args.results == RESULTS):
        sys.exit(f"--model {args.model} needs --work DIR and --results DIR of its own (the defaults hold SmolLM2's runs)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS, else the cores)")


# ---- the continual benchmark's sequences and trainings -------------------------------------------
ORDERS = {4: "dbpedia amazon yahoo agnews", 5: "dbpedia amazon agnews yahoo", 6: "yahoo amazon agnews dbpedia"}


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: Path
    dev: Path
    val: Path | None = None  # validation examples (validated fuses); default: dev examples after the reported ones


def builtin_sequence(order: int) -> list[TaskFiles]:
    return [TaskFiles(t, DATA / "train" / f"{t}.jsonl.gz", DATA / "dev" / f"{t}.jsonl.gz") for t in ORDERS[order].split()]


def add_sequence_options(parser: argparse.ArgumentParser) -> None:
    """How every task is trained and evaluated (continual.py; bf16_check.py trains the same tasks)."""
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak learning rate (default 3e-3: at 1e-3 SeqLoRA hardly forgot on orders 5 and 6, "
                             "BWT vs learned −12.8 / −10.4; benchmarks/results/ruler.md)")
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=1000, help="training records used per task")
    parser.add_argument("--eval-examples", type=int, default=300, help="dev records evaluated per task")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=6)


def train_options(args: argparse.Namespace, seed: int, precision: str) -> dict:
    """The training options of every task (also the inputs of its name's digest)."""
    return {"max_steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup, "batch_size": args.batch_size,
            "max_length": args.max_length, "lora_r": args.lora_r, "max_examples": args.train_examples,
            "seed": seed, "bf16": precision == "bf16"}


def eval_options(args: argparse.Namespace) -> dict:
    """The evaluation options of every task (precision apart)."""
    return {"max_examples": args.eval_examples, "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length, "batch_size": args.eval_batch_size}


def training_name(task: TaskFiles, start_weights: str | None, options: dict, replayed_line: str | None = None) -> str:
    """A task's training named by a digest of its inputs: the weights it starts from, its options,
    its data by content (not by where the checkout lies) and, with replay, the line it replays. Lines
    and scripts whose inputs agree find the same training in the registry and share it."""
    data = hashlib.sha256(task.train.read_bytes()).hexdigest()
    inputs = (start_weights, options, data, replayed_line)
    if options.get("gram"):  # RegMean's trainings: apart from those whose Gram sums were bfloat16 (before 2026-12-06)
        from kifmerge.profile_format import GRAM_PRECISION

        inputs += (GRAM_PRECISION,)
    key = json.dumps(inputs, sort_keys=True, default=str)
    return f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
