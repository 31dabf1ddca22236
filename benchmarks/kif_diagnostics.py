"""Why does KIF fuse the way it does? For every KIF fuse of a benchmark line, from the stored
profiles: how concentrated each task's importance is, how the old and new important sets
overlap, and how many units fall in each case of the static rule.

    python benchmarks/kif_diagnostics.py [--work benchmarks/work/order4] [--line kif] [--top 0.2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kifmerge.fusion.rules import important_units
from kifmerge.profiles import normalise
from kifmerge.registry import Registry

HERE = Path(__file__).resolve().parent


def flat(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return torch.cat([handle.get_tensor(k).float() for k in sorted(handle.keys())])


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()]))[0, 1])


def unit_norms(reg: Registry, weights_sha: str) -> torch.Tensor:
    """‖A[r,:]‖·‖B[:,r]‖ per rank unit, in profile order (modules sorted by name)."""
    from safetensors.torch import load_file

    tensors = {}
    for name, path in reg.weights(weights_sha).tensor_files().items():
        tensors.update(load_file(path))
    modules = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    return torch.cat([tensors[m + ".lora_A.weight"].norm(dim=1) * tensors[m + ".lora_B.weight"].norm(dim=0) for m in modules])


def module_share(scores: torch.Tensor, rank: int) -> float:
    """Share of the profile's variance explained by which module a unit is in (units of one
    module are consecutive, `rank` of them): 1 means importance is a property of the module."""
    groups = scores.reshape(-1, rank)
    between = ((groups.mean(dim=1) - scores.mean()) ** 2).mean()
    return float(between / scores.var(unbiased=False)) if scores.var() > 0 else 0.0


def mass_in_top(scores: torch.Tensor, top: float) -> float:
    """Share of the total (min-shifted) score held by the top fraction of units."""
    shifted = scores - scores.min()
    k = max(1, round(top * len(scores)))
    return float(shifted.topk(k).values.sum() / shifted.sum()) if shifted.sum() > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "order4")
    parser.add_argument("--line", default="kif")
    parser.add_argument("--top", type=float, default=0.2)
    args = parser.parse_args()
    reg = Registry.open(args.work / "registry")
    rows = []
    versions = reg.catalog.rows("versions", "line = ?", [args.line], order_by="number")
    for previous, version in zip(versions, versions[1:], strict=False):
        task_profile = reg.catalog.find("profiles", version["task"])
        p_new = normalise(flat(reg.blobs.open_verified(task_profile["scores"])))
        p_old = flat(reg.blobs.open_verified(previous["profile"]))
        old_hot, new_hot = important_units(p_old, args.top), important_units(p_new, args.top)
        both = int((old_hot & new_hot).sum())
        rows.append({
            "version": f"{args.line}@v{version['number']}", "task": version["task"], "units": len(p_new),
            "new_top_mass": round(mass_in_top(p_new, args.top), 3), "old_top_mass": round(mass_in_top(p_old, args.top), 3),
            "new_median": round(float(p_new.median()), 3),
            "spearman_old_new": round(rank_corr(p_old, p_new), 3),
            # is a unit important because it is already large in the adapter the task started from?
            "spearman_new_vs_start_norm": round(rank_corr(p_new, unit_norms(reg, previous["weights"])), 3),
            "module_share_new": round(module_share(p_new, version["adapter_config"]["r"]), 3),
            "both": both, "old_only": int((old_hot & ~new_hot).sum()), "new_only": int((new_hot & ~old_hot).sum()),
            "neither": int((~old_hot & ~new_hot).sum()),
        })
    reg.close()
    print(f"{'version':<10} {'units':>5} {'top-mass new/old':>17} {'median new':>10} {'rank corr':>9} "
          f"{'corr |θ|':>8} {'module':>6} {'both':>5} {'old':>5} {'new':>5} {'neither':>7}")
    for r in rows:
        print(f"{r['version']:<10} {r['units']:>5} {r['new_top_mass']:>8.3f}/{r['old_top_mass']:<8.3f} {r['new_median']:>10.3f} "
              f"{r['spearman_old_new']:>9.3f} {r['spearman_new_vs_start_norm']:>8.3f} {r['module_share_new']:>6.3f} {r['both']:>5} {r['old_only']:>5} {r['new_only']:>5} {r['neither']:>7}")
    out = HERE / "results" / f"kif_diagnostics_{args.work.name}_{args.line}.json"
    out.write_text(json.dumps({"command": "python benchmarks/kif_diagnostics.py", "top": args.top, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
