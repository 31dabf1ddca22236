"""Fusion memory stays bounded by a few tensors, not by the model: a checkpoint many times
larger than its largest tensor is fused in a subprocess and its peak RSS is compared with a
process that only imports the same modules."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TENSORS, SHAPE = 48, (512, 1024)  # 48 × 2 MiB = 96 MiB per checkpoint; largest tensor 2 MiB


def fake_model(folder: Path, seed: int) -> Path:
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({f"layer.{i}.weight": torch.randn(SHAPE, generator=generator) for i in range(TENSORS)},
              str(folder / "model.safetensors"))
    return folder


def peak_rss_mb(args: list[str], env: dict) -> float:
    """Peak RSS of one child process (children are waited for one at a time, so the running
    maximum of RUSAGE_CHILDREN after a larger child is that child's)."""
    subprocess.run(args, check=True, env=env, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


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
    imports = peak_rss_mb([sys.executable, "-c", "import torch, safetensors.torch, kifmerge.services.fusion, kifmerge.fusion.engine"], env)
    fused = peak_rss_mb([sys.executable, "-m", "kifmerge", "fuse", "t2", "--into", "line"], env)
    model_mb = TENSORS * SHAPE[0] * SHAPE[1] * 4 / 2**20
    # reading both inputs whole would add 2 × 96 MiB; a few 2 MiB tensors plus bookkeeping must not
    assert fused - imports < 0.5 * model_mb, f"fuse grew RSS by {fused - imports:.0f} MiB for a {model_mb:.0f} MiB model"
