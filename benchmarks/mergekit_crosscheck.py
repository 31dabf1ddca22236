"""Do kifmerge's baselines compute what mergekit computes? `linear`, `task-arithmetic` and
`ties` on a small full-weight Llama-style model made in code, through `kifmerge fuse` and
through `mergekit-yaml` with the equivalent YAML; reports the largest absolute difference
per method (target ≤ 1e-5) and writes benchmarks/results/mergekit_crosscheck.json.

mergekit is a benchmark/dev tool, not a dependency: install it in its own venv (it pins its
own versions) and point --mergekit at its `mergekit-yaml`:

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
    python benchmarks/mergekit_crosscheck.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_results_option, argument_parser, run_record, write_results

ALPHA, DENSITY = 0.5, 0.5
METHODS = {  # kifmerge method → (mergekit method, per-model parameters, uses the base)
    "linear": ("linear", {"weight": ALPHA}, False),
    "task-arithmetic": ("task_arithmetic", {"weight": ALPHA}, True),
    "ties": ("ties", {"weight": ALPHA, "density": DENSITY}, True),
}


def build(work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(work / "base")
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        tuned = LlamaForCausalLM(config)
        with torch.no_grad():
            for (name, param), (_, original) in zip(tuned.named_parameters(), base.named_parameters(), strict=True):
                param.copy_(original + 0.02 * torch.randn(param.shape, generator=generator))
        tuned.save_pretrained(work / f"t{seed}")
        profile = {name: torch.rand(1, generator=generator) for name, _ in tuned.named_parameters()}
        from safetensors.torch import save_file

        save_file(profile, str(work / f"t{seed}.profile.safetensors"),
                  metadata={"format": "kifmerge-profile", "version": "1", "unit": "tensor"})


def run(args: list[str], env: dict | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml")
    add_results_option(parser)
    args = parser.parse_args()
    if not args.mergekit or not Path(args.mergekit).exists():
        sys.exit("mergekit-yaml not found: install mergekit in its own venv and pass --mergekit (see the docstring)")
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        build(work)
        env = {**os.environ, "KIFMERGE_REGISTRY": str(work / "registry")}
        kif = [sys.executable, "-m", "kifmerge"]
        run([*kif, "init"], env)
        run([*kif, "base", "add", "base", str(work / "base")], env)
        for seed in (1, 2):
            run([*kif, "add-task", f"t{seed}", str(work / f"t{seed}"), "--base", "base",
                 "--profile", str(work / f"t{seed}.profile.safetensors")], env)
        for method, (mk_method, parameters, uses_base) in METHODS.items():
            run([*kif, "fuse", "t1", "--into", method], env)
            run([*kif, "fuse", "t2", "--into", method, "--method", method, "--alpha", str(ALPHA), "--density", str(DENSITY)], env)
            run([*kif, "export", method, str(work / f"kif-{method}")], env)
            config = {"merge_method": mk_method, "dtype": "float32",
                      "models": [{"model": str(work / f"t{s}"), "parameters": parameters} for s in (1, 2)]}
            if uses_base:
                config["base_model"] = str(work / "base")
            (work / f"{method}.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
            run([args.mergekit, str(work / f"{method}.yml"), str(work / f"mk-{method}")])
            ours, theirs = load_file(work / f"kif-{method}" / "model.safetensors"), {}
            for shard in sorted((work / f"mk-{method}").glob("*.safetensors")):
                theirs.update(load_file(shard))
            common = sorted(set(ours) & set(theirs))
            diffs = {name: float((ours[name].float() - theirs[name].float()).abs().max()) for name in common}
            worst = max(diffs, key=diffs.get)
            task2 = load_file(work / "t2" / "model.safetensors")  # how far the merge moved: the check is not vacuous
            moved = max(float((ours[name] - task2[name]).abs().max()) for name in common)
            rows.append({"method": method, "mergekit_method": mk_method, "tensors_compared": len(common),
                         "missing_in_mergekit": sorted(set(ours) - set(theirs)), "max_abs_diff": diffs[worst],
                         "worst_tensor": worst, "within_1e-5": diffs[worst] <= 1e-5, "max_abs_change_from_task2": moved})
            row = rows[-1]
            print(f"{method:<16} {row['tensors_compared']:>3} tensors  max |kifmerge − mergekit| = {row['max_abs_diff']:.2e}"
                  f"  (the merge moved weights by up to {moved:.3f})", flush=True)
    out = write_results(args.results / "mergekit_crosscheck.json",
                        {**run_record("mergekit_crosscheck"), "alpha": ALPHA, "density": DENSITY, "rows": rows})
    print(f"wrote {out}")
    if not all(r["within_1e-5"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
