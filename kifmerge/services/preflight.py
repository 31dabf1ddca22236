"""Checks on a training's environment that must fail before any work, in one line: the
experiment tracker named by `--report-to` is installed, and the precision asked for is one
the Trainer accepts on this machine (it refuses fp16 without a GPU, deep inside its set-up)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kifmerge.errors import UsageError
from kifmerge.options import TrainOptions

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # --report-to → package to install


def check_training_environment(opts: TrainOptions) -> None:
    """UsageError (one line) when the tracker is not installed or fp16 is asked without a GPU."""
    if opts.report_to != "none" and not tracker_available(opts.report_to):
        raise UsageError(f"--report-to {opts.report_to} needs the {TRACKERS[opts.report_to]} package; install it "
                         f"(pip install {TRACKERS[opts.report_to]}) or drop --report-to")
    if opts.report_to == "mlflow":
        from kifmerge.services.mlflow_sync import check_tracking_server

        check_tracking_server()  # an unreachable server or wrong credentials: one line, before any work
    if opts.fp16:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--fp16 needs a CUDA GPU (the Trainer refuses it on a CPU); use --bf16 on CPUs that support it, "
                             "or neither")


def tracker_available(name: str) -> bool:
    """As the Trainer decides it (transformers.integrations)."""
    from transformers.integrations import integration_utils as hf

    return {"tensorboard": hf.is_tensorboard_available, "mlflow": hf.is_mlflow_available,
            "wandb": hf.is_wandb_available}[name]()


@contextmanager
def tracker_environment(opts: TrainOptions, task: str, line: str | None = None) -> Iterator[None]:
    """TensorBoard writes under the Trainer's output folder, which is kifmerge's staging area
    (removed after the run): unless $TENSORBOARD_LOGGING_DIR says where, its event files go to
    `runs/TASK` in the current folder instead. MLflow: the run goes to the experiment `mlflow
    push` uses, tagged with the task and line (kifmerge/services/mlflow_sync.py)."""
    if opts.report_to == "mlflow":
        from kifmerge.services.mlflow_sync import training_environment

        with training_environment(task, line):
            yield
        return
    if opts.report_to != "tensorboard" or os.environ.get("TENSORBOARD_LOGGING_DIR"):
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path("runs", task).resolve())
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
