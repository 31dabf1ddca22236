"""Option groups shared by several commands (training, fusion): each becomes one dict the
command passes to its service."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from kifmerge.cli.runtime import annotate
from kifmerge.fusion import methods


def _float_list(text: str | None, count: int | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated numbers: exactly `count` of them, or any number (None)."""
    from kifmerge.errors import UsageError

    if text is None:
        return None
    how_many = f"{count} comma-separated numbers" if count else "comma-separated numbers"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes {how_many}, got {text!r}") from None
    if count is not None and len(values) != count:
        raise UsageError(f"{option} takes {count} comma-separated numbers, got {len(values)}")
    return values


def _option(default: Any, *flags: str, help: str, kind: Any, panel: str) -> inspect.Parameter:
    name = flags[0].lstrip("-").replace("-", "_")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Option(*flags, help=help, rich_help_panel=panel)])


def option_group(into: str, params: list[inspect.Parameter], convert: Callable[[dict], dict]) -> Callable:
    """A decorator adding `params` to a command's signature (Typer reads it); the command gets
    their values as one dict in its `into` argument, after `convert`."""
    names = [p.name for p in params]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **{into: convert({name: kwargs.pop(name) for name in names})}, **kwargs)

        signature = inspect.signature(fn)  # an inner option group's wrapper: annotations already resolved
        hints = typing.get_type_hints(fn, include_extras=True) if any(
            isinstance(p.annotation, str) for p in signature.parameters.values()) else {}  # resolved for Typer
        kept = [p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) else p
                for p in signature.parameters.values() if p.name != into]
        wrapper.__signature__ = signature.replace(parameters=kept + params)
        annotate(wrapper)
        del wrapper.__wrapped__
        return wrapper

    return decorate


def _train(default: Any, *flags: str, help: str, kind: Any) -> inspect.Parameter:
    return _option(default, *flags, help=help, kind=kind, panel="Training")


def _fusion(default: Any, *flags: str, help: str, kind: Any) -> inspect.Parameter:
    return _option(default, *flags, help=help, kind=kind, panel="Fusion")


def _split_modules(options: dict) -> dict:
    if options["target_modules"]:
        options["target_modules"] = tuple(m.strip() for m in options["target_modules"].split(",") if m.strip())
    return options


with_train_options = option_group("train_options", [
    _train("lora", "--mode", help="lora (peft adapter) or full fine-tuning.", kind=str),
    _train(None, "--lora-r", help="LoRA rank (default: 8; a line keeps its rank).", kind=Optional[int]),
    _train(None, "--lora-alpha", help="LoRA alpha (default: 2·r).", kind=Optional[int]),
    _train(None, "--lora-dropout", help="LoRA dropout (default: 0).", kind=Optional[float]),
    _train(None, "--target-modules", help="Comma-separated module names (default: per architecture).", kind=Optional[str]),
    _train(None, "--epochs", help="Epochs over the data (default: 1).", kind=Optional[float]),
    _train(None, "--max-steps", help="Optimizer steps (overrides --epochs).", kind=Optional[int]),
    _train(None, "--lr", help="Learning rate (default: 3e-4 LoRA, 2e-5 full).", kind=Optional[float]),
    _train(None, "--batch-size", help="Examples per device per step (default: 8).", kind=Optional[int]),
    _train(None, "--grad-accum", help="Gradient accumulation steps (default: 1).", kind=Optional[int]),
    _train(None, "--max-length", help="Max tokens per example (default: 256).", kind=Optional[int]),
    _train(None, "--seed", help="Random seed (default: 42).", kind=Optional[int]),
    _train(None, "--max-examples", help="Use only the first N records.", kind=Optional[int]),
    _train(None, "--val-fraction", help="Hold out this fraction for a validation loss (default: 0).", kind=Optional[float]),
    _train(None, "--importance", help="Sensitivity estimator: first |θ·g| | mixed | change |(θ−θ_start)·g| (default: first).", kind=Optional[str]),
    _train(None, "--beta1", help="EMA factor of the sensitivity (default: 0.85).", kind=Optional[float]),
    _train(None, "--beta2", help="EMA factor of the uncertainty (default: 0.85).", kind=Optional[float]),
    _train(None, "--orth-reg", help="LoRA orthogonality regulariser λ (default: 0, off).", kind=Optional[float]),
    _train(None, "--replay", help="Fraction of examples replayed from the line's earlier tasks (default: 0).", kind=Optional[float]),
    _train(None, "--warmup-steps", help="Linear learning-rate warmup steps before the linear decay (default: 0).", kind=Optional[int]),
    _train(False, "--gram", help="Record each LoRA module's input Gram matrix XᵀX with the profile (for fuse --method "
                                 "regmean; about in² floats per module).", kind=bool),
    _train(False, "--bf16", help="bfloat16 autocast for the forward/backward (weights and importance stay float32). On a "
                                 "CPU without native bf16 (no avx512_bf16/amx_bf16) it falls back to float32 with a warning.", kind=bool),
    _train(False, "--bf16-force", help="Use bf16 even where it is not native (measured 34× slower than float32 on an AVX2 CPU).",
           kind=bool),
    _train(False, "--fp16", help="float16 autocast with loss scaling (CUDA GPUs only; excludes --bf16).", kind=bool),
    _train(False, "--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, slower steps.", kind=bool),
    _train(None, "--report-to", help="Experiment tracker fed by the Trainer: tensorboard | mlflow | wandb | none (default: none; "
                                     "tensorboard writes to $TENSORBOARD_LOGGING_DIR, else runs/TASK).", kind=Optional[str]),
    _train(None, "--save-steps", help="Save a resumable checkpoint in the registry's staging area every N steps "
                                      "(default: 50; 0: never); removed once the task is committed.", kind=Optional[int]),
    _train(False, "--resume", help="Continue an interrupted run with the same task, start, data and options from its "
                                   "last saved step (none saved: train from the start, with a note).", kind=bool),
], _split_modules)

with_fuse_options = option_group("fuse_options", [
    _fusion("kif", "--method", help=f"A fusion method: {methods.help_text()}.", kind=str),
    _fusion(None, "--top", help="Fraction of units counted important (kif; default: 0.2).", kind=Optional[float]),
    _fusion(None, "--tau", help="Softmax temperature (kif-adaptive; default: 0.25).", kind=Optional[float]),
    _fusion(None, "--scores", help="kif-adaptive compares minmax-normalised scores or their ranks: minmax | rank (default: minmax).", kind=Optional[str]),
    _fusion(None, "--weights", help="NEW_BOTH,OLD_BOTH,NEW_NEITHER (kif; default: 0.3,0.7,0.5).", kind=Optional[str]),
    _fusion(None, "--alpha", help="Weight of the new task (linear, baselines; 1 = sequential; default: 0.5).", kind=Optional[float]),
    _fusion(None, "--density", help="Task-vector entries kept (ties, dare; default: 0.5).", kind=Optional[float]),
    _fusion(None, "--lam", help="Scale of the merged task vector (baselines; default: 1).", kind=Optional[float]),
    _fusion(None, "--merge-seed", help="Seed of DARE's random drops (default: 0).", kind=Optional[int]),
    _fusion(None, "--power", help="Exponent on the element scores (kif-element; 0: a plain 0.5 average; default: 0.5).",
            kind=Optional[float]),
    _fusion(None, "--non-diagonal", help="Scale of the Gram matrices' off-diagonal entries (regmean; 1: exact least "
                                         "squares, 0: per-feature weights; default: 0.9).", kind=Optional[float]),
    _fusion(None, "--grid", help="α values tried by --method validated, each scored on the tasks' validation examples "
                                 "(default: 0.3,0.5,0.7).", kind=Optional[str]),
    _fusion(None, "--val-examples", help="Validation examples scored per task (validated, --max-regression; default: 100).",
            kind=Optional[int]),
    _fusion(None, "--shard-size", help="Largest output shard, e.g. 5GB or 500MB (default: 5GB).", kind=Optional[str]),
    _fusion(None, "--dtype", help="Output dtype: float32 | float16 | bfloat16 (default: the task's).", kind=Optional[str]),
], lambda options: {**options, "weights": _float_list(options["weights"], 3, "--weights"),
                    "grid": _float_list(options["grid"], None, "--grid")})
