"""Wall time and peak RSS of `kifmerge fuse` on a real-size full checkpoint.

Two "fine-tunes" of SmolLM2-135M (its fp32 weights plus seeded noise, 538 MB each) are
registered, then `fuse --method kif` and `--method ties` run in their own processes under
`/usr/bin/time`; a process that only imports the same modules gives the RSS floor. Writes
benchmarks/results/fuse_memory.json.

    python benchmarks/fuse_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMOLLM2 = Path(os.environ.get("KIFMERGE_MODELS") or "~/.cache/kifmerge/models").expanduser() / "smollm2-135m-instruct"


def fine_tune(out: Path, seed: int) -> int:
    """A copy of SmolLM2 with every weight nudged; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(SMOLLM2, out, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in load_file(SMOLLM2 / "model.safetensors").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    profile = {k: torch.rand(1, generator=generator) for k in tensors}
    save_file(profile, str(out.with_suffix(".profile.safetensors")),
              metadata={"format": "kifmerge-profile", "version": "1", "unit": "tensor"})
    return max(v.numel() * v.element_size() for v in tensors.values())


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, measured by GNU time."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    wall, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (SMOLLM2 / "model.safetensors").exists():
        sys.exit(f"{SMOLLM2} is missing: run `python benchmarks/prepare_smollm2.py` first")
    with tempfile.TemporaryDirectory(dir=HERE) as scratch:
        work = Path(scratch)
        env = {**os.environ, "KIFMERGE_REGISTRY": str(work / "registry")}
        kifmerge = [sys.executable, "-m", "kifmerge"]
        largest = max(fine_tune(work / f"t{i}", i) for i in (1, 2))
        checkpoint_mb = (work / "t1" / "model.safetensors").stat().st_size / 2**20
        for command in (["init"], ["base", "add", "smollm2", str(SMOLLM2)],
                        ["add-task", "t1", str(work / "t1"), "--base", "smollm2", "--profile", str(work / "t1.profile.safetensors")],
                        ["add-task", "t2", str(work / "t2"), "--base", "smollm2", "--profile", str(work / "t2.profile.safetensors")]):
            subprocess.run([*kifmerge, *command], env=env, check=True, capture_output=True)
        floor = timed([sys.executable, "-c", "import torch, safetensors.torch, kifmerge.services.fusing, kifmerge.fusion.engine"], env)
        rows = []
        for method in ("kif", "ties"):
            runs = []
            for repeat in range(args.repeats):
                line = f"{method}-{repeat}"
                subprocess.run([*kifmerge, "fuse", "t1", "--into", line], env=env, check=True, capture_output=True)
                runs.append(timed([*kifmerge, "fuse", "t2", "--into", line, "--method", method], env))
            rows.append({"method": method, "wall_s": round(statistics.median(r[0] for r in runs), 2),
                         "peak_rss_mb": round(max(r[1] for r in runs), 1),
                         "rss_above_imports_mb": round(max(r[1] for r in runs) - floor[1], 1)})
            row = rows[-1]
            print(f"{method:<5} wall {row['wall_s']:6.2f} s  peak RSS {row['peak_rss_mb']:7.1f} MB  "
                  f"({row['rss_above_imports_mb']:.1f} MB above the imports)", flush=True)
    result = {"benchmark": "fuse_memory", "checkpoint_mb": round(checkpoint_mb, 1), "largest_tensor_mb": round(largest / 2**20, 1),
              "imports_rss_mb": round(floor[1], 1), "repeats": args.repeats, "rows": rows,
              "command": "python benchmarks/fuse_memory.py " + " ".join(sys.argv[1:])}
    out = HERE / "results" / "fuse_memory.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"checkpoint {checkpoint_mb:.0f} MB, largest tensor {largest / 2**20:.0f} MB, imports alone {floor[1]:.0f} MB; wrote {out}")


if __name__ == "__main__":
    main()
