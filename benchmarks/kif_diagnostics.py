"""Why does KIF fuse the way it does? For every KIF fuse of a benchmark line, from the stored
profiles: how concentrated each task's importance is, how the old and new important sets
overlap, and how many units fall in each case of the static rule.

    python benchmarks/kif_diagnostics.py [--work benchmarks/work/order4/seed42] [--line kif] [--top 0.2] [--name order4]

Also measures, for every fuse of a LoRA line, how far fusing the factors lands from fusing
their products (DESIGN's rank-unit fusion blends A rows and B columns separately), and, where
the profiles hold element scores (`train` records them), how alike the task's and the line's
element scores rank and how much of that the starting weights' |θ| explain (first-order scores
|θ·g| carry it; `--importance fisher` scores do not): `--line kif-element`, `--line kif-fisher`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import WORK, add_results_option, argument_parser, run_record, write_results

from kifmerge.fusion.rules import important_units
from kifmerge.profiles import ELEMENT, NOT_UNITS, normalise
from kifmerge.registry import Registry


def flat(path: Path) -> torch.Tensor:
    """The unit scores in layout order (element scores and Gram matrices left out)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return torch.cat([handle.get_tensor(k).float() for k in sorted(handle.keys()) if not k.startswith(NOT_UNITS)])


def element_scores(path: Path) -> dict[str, torch.Tensor]:
    """The profile's element scores by tensor name (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return {k[len(ELEMENT):]: handle.get_tensor(k).float().reshape(-1) for k in handle.keys() if k.startswith(ELEMENT)}


def element_rows(reg: Registry, line_profile: Path, task_profile: Path, start_weights: str) -> dict[str, float]:
    """Rank correlations over every LoRA factor element: the task's element scores against the
    line's, and each against |θ| of the adapter the task started from."""
    from safetensors.torch import load_file

    new, old = element_scores(task_profile), element_scores(line_profile)
    if not new or new.keys() != old.keys():
        return {}
    tensors = {}
    for _, path in reg.weights(start_weights).tensor_files().items():
        tensors.update(load_file(path))
    names = sorted(new)
    new_flat, old_flat = torch.cat([new[n] for n in names]), torch.cat([old[n] for n in names])
    start = torch.cat([tensors[n].float().abs().reshape(-1) for n in names])
    return {"elements": len(new_flat), "spearman_elements_old_new": round(rank_corr(old_flat, new_flat), 3),
            "spearman_elements_new_vs_start_abs": round(rank_corr(new_flat, start), 3),
            "spearman_elements_old_vs_start_abs": round(rank_corr(old_flat, start), 3)}


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


def lora_factors(reg: Registry, weights_sha: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (A [r, in], B [out, r]) of a stored adapter."""
    from safetensors.torch import load_file

    tensors = {}
    for name, path in reg.weights(weights_sha).tensor_files().items():
        tensors.update(load_file(path))
    modules = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    return {m: (tensors[m + ".lora_A.weight"].double(), tensors[m + ".lora_B.weight"].double()) for m in modules}


def factor_space_bias(old: dict, new: dict, fused: dict) -> dict[str, float]:
    """How far fusing LoRA factors unit by unit lands from fusing their products. Each rank
    unit's coefficient c is read back from the fused A row (A_f = c·A_new + (1 − c)·A_old); the
    exact product-space blend is Σ_r c_r·b_new,r a_new,r + (1 − c_r)·b_old,r a_old,r, and
    with new = old + Δ the factor blend misses it by Σ_r c_r(c_r − 1)·Δb_r Δa_r. Returns the
    median and max over modules of ‖B_f A_f − exact‖ / ‖exact‖, and of ‖B_f A_f − exact‖ /
    ‖B_new A_new − B_old A_old‖ (the error against the size of the task's change)."""
    rel_exact, rel_change = [], []
    for module, (a_f, b_f) in fused.items():
        (a_o, b_o), (a_n, b_n) = old[module], new[module]
        delta = a_n - a_o
        c = ((a_f - a_o) * delta).sum(dim=1) / (delta * delta).sum(dim=1).clamp_min(1e-30)
        exact = (b_n * c) @ a_n + (b_o * (1 - c)) @ a_o
        error = torch.linalg.matrix_norm(b_f @ a_f - exact)
        rel_exact.append(float(error / torch.linalg.matrix_norm(exact).clamp_min(1e-30)))
        rel_change.append(float(error / torch.linalg.matrix_norm(b_n @ a_n - b_o @ a_o).clamp_min(1e-30)))
    ordered = lambda values: sorted(values)
    return {"median_vs_fused_product": round(ordered(rel_exact)[len(rel_exact) // 2], 4), "max_vs_fused_product": round(max(rel_exact), 4),
            "median_vs_task_change": round(ordered(rel_change)[len(rel_change) // 2], 4), "max_vs_task_change": round(max(rel_change), 4)}


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
    parser = argument_parser(__doc__)
    parser.add_argument("--work", type=Path, default=WORK / "order4" / "seed42", help="a continual.py state folder")
    parser.add_argument("--line", default="kif")
    parser.add_argument("--top", type=float, default=0.2)
    parser.add_argument("--name", default=None, help="results file name part (default: the work folder's name)")
    add_results_option(parser)
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
            **element_rows(reg, reg.blobs.open_verified(previous["profile"]), reg.blobs.open_verified(task_profile["scores"]),
                           previous["weights"]),
            "factor_space_bias": factor_space_bias(lora_factors(reg, previous["weights"]),
                                                   lora_factors(reg, reg.catalog.get("tasks", version["task"], "task")["weights"]),
                                                   lora_factors(reg, version["weights"])),
        })
    reg.close()
    print(f"{'version':<10} {'units':>5} {'top-mass new/old':>17} {'median new':>10} {'rank corr':>9} "
          f"{'corr |θ|':>8} {'module':>6} {'both':>5} {'old':>5} {'new':>5} {'neither':>7}")
    for r in rows:
        print(f"{r['version']:<10} {r['units']:>5} {r['new_top_mass']:>8.3f}/{r['old_top_mass']:<8.3f} {r['new_median']:>10.3f} "
              f"{r['spearman_old_new']:>9.3f} {r['spearman_new_vs_start_norm']:>8.3f} {r['module_share_new']:>6.3f} {r['both']:>5} {r['old_only']:>5} {r['new_only']:>5} {r['neither']:>7}")
    for r in rows:
        print(f"{r['version']}: factor-space fusion vs product-space blend: {r['factor_space_bias']}")
        if "elements" in r:
            print(f"{r['version']}: element scores ({r['elements']}): rank corr line/task {r['spearman_elements_old_new']}, "
                  f"task vs |θ_start| {r['spearman_elements_new_vs_start_abs']}, line vs |θ_start| {r['spearman_elements_old_vs_start_abs']}")
    out = write_results(args.results / f"kif_diagnostics_{args.name or args.work.name}_{args.line}.json",
                        {**run_record("kif_diagnostics"), "top": args.top, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
