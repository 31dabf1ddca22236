"""`learn` under torchrun: two CPU processes (gloo), data-parallel through the Trainer; only
the main process writes, and the result is one task and one version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import task_records, write_jsonl


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_learn_under_torchrun_with_two_processes(cli, tmp_path, llama_dir):
    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 32))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
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
