"""Wall time and peak RSS of `kifmerge fuse` on a real-size full checkpoint.

Two "fine-tunes" of SmolLM2-135M (its fp32 weights plus seeded noise, 538 MB each) are
registered, then `fuse --method kif` and `--method ties` run in their own processes under
`/usr/bin/time`; a process that only imports the same modules gives the RSS floor. Writes
benchmarks/results/fuse_memory.json.

    python benchmarks/fuse_memory.py [--repeats 3] [--model DIR]   # any single-file safetensors model
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import WORK, add_model_option, add_results_option, argument_parser, require_model, run_record, timed, write_results


def fine_tune(model: Path, out: Path, seed: int) -> int:
    """A copy of `model` with every weight nudged; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in load_file(model / "model.safetensors").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    profile = {k: torch.rand(1, generator=generator) for k in tensors}
    save_file(profile, str(out.with_suffix(".profile.safetensors")),
              metadata={"format": "kifmerge-profile", "version": "1", "unit": "tensor"})
    return max(v.numel() * v.element_size() for v in tensors.values())


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    add_model_option(parser)
    parser.add_argument("--work", type=Path, default=WORK,
                        help="where the scratch checkpoints go (default benchmarks/work: on disk, where /tmp may be memory)")
    add_results_option(parser)
    args = parser.parse_args()
    require_model(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        env = {**os.environ, "KIFMERGE_REGISTRY": str(work / "registry")}
        kifmerge = [sys.executable, "-m", "kifmerge"]
        largest = max(fine_tune(args.model, work / f"t{i}", i) for i in (1, 2))
        checkpoint_mb = (work / "t1" / "model.safetensors").stat().st_size / 2**20
        for command in (["init"], ["base", "add", "base", str(args.model)],
                        ["add-task", "t1", str(work / "t1"), "--base", "base", "--profile", str(work / "t1.profile.safetensors")],
                        ["add-task", "t2", str(work / "t2"), "--base", "base", "--profile", str(work / "t2.profile.safetensors")]):
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
    result = {**run_record("fuse_memory"), "model": str(args.model), "checkpoint_mb": round(checkpoint_mb, 1),
              "largest_tensor_mb": round(largest / 2**20, 1), "imports_rss_mb": round(floor[1], 1), "repeats": args.repeats,
              "rows": rows}
    out = write_results(args.results / "fuse_memory.json", result)
    print(f"checkpoint {checkpoint_mb:.0f} MB, largest tensor {largest / 2**20:.0f} MB, imports alone {floor[1]:.0f} MB; wrote {out}")


if __name__ == "__main__":
    main()
