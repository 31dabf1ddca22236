"""`learn` and `train` under torchrun: two CPU processes (gloo), data-parallel through the
Trainer; only the main process writes, and the result is one task and one version, whose Gram
matrices count every process's batches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import torch
from safetensors.torch import load_file

from conftest import task_records, write_jsonl

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(TORCHRUN),
                                    reason="torchrun not installed")


@pytest.mark.slow
@needs_torchrun
def test_learn_under_torchrun_with_two_processes(cli, tmp_path, llama_dir):
    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 32))
    torchrun = TORCHRUN
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "kifmerge", "learn", "p", "--data", str(data), "--into", "main",
         "--base", "llama", "--max-steps", "4", "--batch-size", "4", "--json", "--registry", str(cli.registry)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"version": "main@v1"') == 1, "only the main process reports"
    shown = cli.json("show", "p")
    assert shown["metrics"]["world_size"] == 2 and shown["metrics"]["steps"] == 4
    assert [v["version"] for v in cli.json("list", "versions")] == ["main@v1"]
    assert len(cli.json("list", "tasks")) == 1


@pytest.mark.slow
@needs_torchrun
def test_gram_matrices_under_torchrun_sum_every_process_also_across_a_resume(cli, tmp_path, llama_dir):
    """Each rank's hooks see only its share of the batches: the task's Gram matrices are the sum over
    both processes (RegMean would otherwise weigh a task trained on N GPUs by 1/N), also when the run
    was killed and resumed from a checkpoint. The data is one example repeated, so two processes at
    batch 4 see what one process sees at batch 8, and their sums must agree."""
    from kifmerge.profiles import read_grams
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "same.jsonl", task_records("parity", 1) * 64)
    steps = ["--max-steps", "4", "--save-steps", "2", "--lr", "1e-3", "--base", "llama", "--gram"]
    cli("train", "one", "--data", data, "--line", "a", "--batch-size", "8", *steps)

    def two_processes(*extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KIFMERGE_FAULT_POINT": fault} if fault else {})}
        return subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "kifmerge", "train", "two", "--data", str(data),
                               "--line", "b", "--batch-size", "4", *steps, *extra, "--registry", str(cli.registry)],
                              capture_output=True, text=True, timeout=600, env=env)

    killed = two_processes(fault="train.step#3")  # both ranks killed in step 3: step 2 is saved
    assert killed.returncode != 0 and len(cli.json("list", "tasks")) == 1, killed.stderr[-3000:]
    resumed = two_processes("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stderr
    assert cli.json("show", "two")["metrics"]["world_size"] == 2

    reg = Registry.open(cli.registry)
    profiles = {row["task"]: reg.blobs.open_verified(row["scores"]) for row in reg.catalog.rows("profiles")}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in load_file(
        reg.weights(cli.json("show", "one")["weights"]).files["adapter_model.safetensors"])})
    one, two = (read_grams(profiles[name], modules) for name in ("one", "two"))
    for module in modules:
        torch.testing.assert_close(two[module], one[module], rtol=1e-4, atol=1e-3, msg=module)
