"""Fusion memory stays bounded by a few tensors, not by the model: a checkpoint many times
larger than its largest tensor is fused in a subprocess and its peak RSS is compared with a
process that only imports the same modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TENSORS, SHAPE = 96, (512, 1024)  # 96 × 2 MiB = 192 MiB per checkpoint; largest tensor 2 MiB


def fake_model(folder: Path, seed: int) -> Path:
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({f"layer.{i}.weight": torch.randn(SHAPE, generator=generator) for i in range(TENSORS)},
              str(folder / "model.safetensors"))
    return folder


# A fresh Python process runs the measured command as its only child and prints RUSAGE_CHILDREN:
# the figure is that one command's peak, never a larger child waited for earlier by pytest (this
# process's own RUSAGE_CHILDREN is a maximum over every child it ever had).
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(args: list[str], env: dict) -> float:
    """Peak RSS of `args` run as a process of its own, measured in a fresh child per figure."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], check=True, env=env, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


def test_fuse_memory_is_bounded_by_tensors_not_model(cli, tmp_path):
    base, t1, t2 = (fake_model(tmp_path / n, s) for n, s in (("base", 0), ("t1", 1), ("t2", 2)))
    profile = tmp_path / "p.safetensors"
    save_file({f"layer.{i}.weight": torch.rand(1) for i in range(TENSORS)}, str(profile),
              metadata={"format": "kifmerge-profile", "version": "1", "unit": "tensor"})
    cli("base", "add", "b", base)
    cli("add-task", "t1", t1, "--base", "b", "--profile", profile)
    cli("add-task", "t2", t2, "--base", "b", "--profile", profile)
    cli("fuse", "t1", "--into", "line")
    env = {**os.environ, "KIFMERGE_REGISTRY": str(cli.registry)}
    imports = peak_rss_mb([sys.executable, "-c", "import torch, safetensors.torch, kifmerge.services.fusing, kifmerge.fusion.engine"], env)
    # one thread: the engine keeps 2 × threads blocks in flight (each a few float32 buffers of up to
    # 2 MiB), a constant of the machine, not of the model; with 2 threads the fuse grows by ~65 MiB
    fused = peak_rss_mb([sys.executable, "-m", "kifmerge", "fuse", "t2", "--into", "line", "--threads", "1"], env)
    model_mb = TENSORS * SHAPE[0] * SHAPE[1] * 4 / 2**20
    # the default rule (regmean, here ties: the tasks have no Gram matrices) streams three inputs, the line's head, the task and the base: reading
    # any one of them whole would add 192 MiB; a few 2 MiB blocks per input plus bookkeeping must not
    # (measured 51 MiB growth at 96 and at 192 MiB models: a constant, not a share of the model)
    assert fused - imports < 0.5 * model_mb, f"fuse grew RSS by {fused - imports:.0f} MiB for a {model_mb:.0f} MiB model"
