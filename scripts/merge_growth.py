"""How much each fuse of a LoRA line grew each module's update: ‖merged ΔW‖ ÷ the larger of the
head's and the task's, per version, the four largest and the range of the rest. Versions fused
since 2026-12-06 record the largest (`params.refactor.largest_growth`); this reads any line, older
ones included, from the weights (how the RegMean figures of benchmarks/results/ruler.md were read).

    python scripts/merge_growth.py benchmarks/work/probe-o5-lr3e-3/seed42/registry regmean
"""
import argparse

from safetensors import safe_open

from kifmerge.fusion.rules import lora_product
from kifmerge.registry import Registry


def products(reg: Registry, weights_sha: str) -> dict:
    factors: dict[str, dict[str, object]] = {}
    for path in reg.weights(weights_sha).tensor_files().values():
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                module, _, side = key.rpartition(".lora_")
                if side in ("A.weight", "B.weight"):
                    factors.setdefault(module, {})[side[0]] = handle.get_tensor(key)
    return {module: lora_product(f["A"], f["B"]) for module, f in factors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry")
    parser.add_argument("line")
    args = parser.parse_args()
    reg = Registry.open(args.registry)
    versions = {v["number"]: v for v in reg.catalog.rows("versions", "line = ?", [args.line])}
    for number in sorted(versions):
        version, parent = versions[number], versions.get(versions[number]["parent"])
        if parent is None or not version["task"]:
            continue
        head, task = products(reg, parent["weights"]), products(reg, reg.catalog.get("tasks", version["task"], "task")["weights"])
        merged = products(reg, version["weights"])
        growth = {m: float(merged[m].norm()) / max(float(head[m].norm()), float(task[m].norm()), 1e-30) for m in merged}
        ranked = sorted(growth.items(), key=lambda item: -item[1])
        rest = [g for _, g in ranked[4:]]
        print(f"{args.line}@v{number} ({version['method']}): "
              + ", ".join(f"{m.split('layers.')[-1]} {g:.2f}" for m, g in ranked[:4])
              + (f"; the other {len(rest)} {min(rest):.2f}–{max(rest):.2f}" if rest else ""))


if __name__ == "__main__":
    main()
