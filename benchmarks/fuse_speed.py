"""Fusion speed and memory at two checkpoint sizes, against the I/O floor and mergekit.

Builds synthetic Llama-style full checkpoints in float16 (a base and two "fine-tunes" = base
+ seeded noise, each sharded into several safetensors files with an index) at ≈ 0.5 GB and
≈ 2 GB each, registers them, then times, interleaved and repeated (median of --repeats):

- floor:     read every tensor of the three inputs once and write one output of the same
             size (safe_open per tensor + the streaming shard writer, nothing computed);
- kif:       `kifmerge fuse t2 --into LINE --method kif` (LINE@v1 = t1);
- ties:      `kifmerge fuse t2 --into LINE --method ties --alpha 0.5 --density 0.5`;
- mergekit:  `mergekit-yaml` TIES of t1 and t2 onto the base, weight 0.5, density 0.5,
             `dtype: float16` (mergekit's default CPU path; `--lazy-unpickle` off).

Each command is its own process under GNU time (wall seconds, peak RSS). Writes
benchmarks/results/fuse_speed.{json,md}. The checkpoints are kept in benchmarks/work/fuse_speed
(gitignored), so a rerun skips building them. `--sizes tiny` (8 MiB) checks the script in seconds.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
    python benchmarks/fuse_speed.py --mergekit /tmp/mkvenv/bin/mergekit-yaml [--repeats 3] [--sizes small large]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import WORK, add_results_option, argument_parser, run_record, stamp, timed, write_results

SIZES = {  # Llama-style shapes; float16; 485 MiB and 1870 MiB per checkpoint (tiny: 8 MiB)
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "shard_mb": 150},
    "large": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "shard_mb": 600},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "shard_mb": 2},
}
VOCAB, HEADS, KV_HEADS = 32000, 16, 8


def llama_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    h, i, layers = size["hidden_size"], size["intermediate_size"], size["num_hidden_layers"]
    kv = h // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_checkpoint(folder: Path, size: dict, seed: int, noise: float) -> None:
    """A sharded float16 checkpoint: the seed-0 base plus `noise`·N(0, 1) from `seed`."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(size)
    meta = {n: torch.empty(s, dtype=torch.float16, device="meta") for n, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=size["shard_mb"] * 1000**2)
    for file, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            value = torch.randn(shapes[name], generator=torch.Generator().manual_seed(_stable(name))) * 0.02
            if noise:
                value += noise * torch.randn(shapes[name], generator=torch.Generator().manual_seed(_stable(name) + seed))
            shard[name] = value.to(torch.float16)
        save_file(shard, str(folder / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(m.numel() * 2 for m in meta.values())}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "hidden_size": size["hidden_size"], "intermediate_size": size["intermediate_size"],
              "num_hidden_layers": size["num_hidden_layers"], "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if seed:
        profile = {n: torch.rand(1, generator=torch.Generator().manual_seed(_stable(n) + 7 * seed)) for n in shapes}
        save_file(profile, str(folder.with_suffix(".profile.safetensors")),
                  metadata={"format": "kifmerge-profile", "version": "1", "unit": "tensor"})


def _stable(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def io_floor(inputs: list[Path], out: Path) -> None:
    """Read every tensor of every input once; write the last input's tensors as one output."""
    from safetensors import safe_open

    from kifmerge.checkpoints import read_headers
    from kifmerge.fusion.writer import StreamingShardWriter, TensorSpec

    headers = []
    for folder in inputs:
        index = folder / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"]
        headers.append(read_headers({f: folder / f for f in set(weight_map.values())}, weight_map))
    last = headers[-1]
    writer = StreamingShardWriter(out, {n: TensorSpec(last.dtypes[n], last.shapes[n]) for n in last.weight_map})
    for name in sorted(last.weight_map):
        for header in headers:
            with safe_open(header.files[header.weight_map[name]], framework="pt") as handle:
                tensor = handle.get_tensor(name)
        writer.add(name, tensor)
    writer.finish()


def prepare(name: str, root: Path, kif: list[str], env: dict) -> dict:
    """Build (once) and register the three checkpoints of one size under `root`."""
    size = SIZES[name]
    for folder, seed in (("base", 0), ("t1", 1), ("t2", 2)):
        if not (root / folder / "config.json").exists():
            print(f"[{name}] writing {folder} …", flush=True)
            write_checkpoint(root / folder, size, seed, 0.0 if seed == 0 else 0.002)
    subprocess.run([*kif, "init"], env=env, check=True, capture_output=True)  # creates, or upgrades the schema
    if not (root / "registry" / "done").exists():
        for command in (["base", "add", "base", str(root / "base")],
                        ["add-task", "t1", str(root / "t1"), "--base", "base", "--profile", str(root / "t1.profile.safetensors")],
                        ["add-task", "t2", str(root / "t2"), "--base", "base", "--profile", str(root / "t2.profile.safetensors")]):
            done = subprocess.run([*kif, *command], env=env, capture_output=True, text=True)
            if done.returncode not in (0, 6):  # 6: registered by an earlier, interrupted run
                raise SystemExit(f"{command} failed: {done.stderr}")
        (root / "registry" / "done").touch()
    shapes = llama_shapes(size)
    largest = max(2 * _numel(s) for s in shapes.values())
    total = sum(2 * _numel(s) for s in shapes.values())
    return {"checkpoint_mb": round(total / 2**20, 1), "largest_tensor_mb": round(largest / 2**20, 1),
            "tensors": len(shapes), "input_shards": len(list((root / "t1").glob("*.safetensors")))}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def measure(name: str, root: Path, repeats: int, mergekit: str | None) -> dict:
    env = {**os.environ, "KIFMERGE_REGISTRY": str(root / "registry")}
    kif = [sys.executable, "-m", "kifmerge"]
    info = prepare(name, root, kif, env)
    config = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float16",
              "parameters": {"normalize": True},
              "models": [{"model": str(root / t), "parameters": {"weight": 0.5, "density": 0.5}} for t in ("t1", "t2")]}
    (root / "ties.yml").write_text(json.dumps(config))
    runs: dict[str, list[tuple[float, float]]] = {"floor": [], "kif": [], "ties": [], "mergekit": []}
    started = int(time.time())  # line names unique across runs on the kept registry
    for repeat in range(repeats):
        out = root / "floor-out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        runs["floor"].append(timed([sys.executable, __file__, "--floor", str(root / "base"), str(root / "t1"), str(root / "t2"),
                                    "--out", str(out)], env))
        shutil.rmtree(out, ignore_errors=True)
        for method in ("kif", "ties"):
            line = f"{method}-{started}-{repeat}"
            subprocess.run([*kif, "fuse", "t1", "--into", line], env=env, check=True, capture_output=True)
            # every method named: a fuse without --method runs whichever rule is the default at the time
            runs[method].append(timed([*kif, "fuse", "t2", "--into", line, "--method", method, "--alpha", "0.5",
                                       "--density", "0.5"] if method == "ties" else [*kif, "fuse", "t2", "--into", line,
                                                                                     "--method", method], env))
        if mergekit:
            out = root / "mergekit-out"
            shutil.rmtree(out, ignore_errors=True)
            runs["mergekit"].append(timed([mergekit, str(root / "ties.yml"), str(out)], env))
            shutil.rmtree(out, ignore_errors=True)
        print(f"[{name}] repeat {repeat + 1}: " + "  ".join(f"{k} {v[-1][0]:.1f} s {v[-1][1]:.0f} MB" for k, v in runs.items() if v),
              flush=True)
    subprocess.run([*kif, "gc", "--grace", "0"], env=env, capture_output=True)
    result = {**info, "runs": {k: [{"wall_s": w, "peak_rss_mb": round(r, 1)} for w, r in v] for k, v in runs.items() if v}}
    result["median"] = {k: {"wall_s": statistics.median(w for w, _ in v), "peak_rss_mb": round(statistics.median(r for _, r in v), 1)}
                        for k, v in runs.items() if v}
    result["rss_target_mb"] = round(2 * info["largest_tensor_mb"] + 300, 1)
    return result


def ratios(size: dict) -> dict:
    med = size["median"]
    out = {}
    for method in ("kif", "ties"):
        out[method] = {"wall_vs_floor": round(med[method]["wall_s"] / med["floor"]["wall_s"], 2),
                       "rss_vs_floor": round(med[method]["peak_rss_mb"] / med["floor"]["peak_rss_mb"], 2)}
        if "mergekit" in med:
            out[method].update({"wall_vs_mergekit": round(med[method]["wall_s"] / med["mergekit"]["wall_s"], 2),
                                "rss_vs_mergekit": round(med[method]["peak_rss_mb"] / med["mergekit"]["peak_rss_mb"], 2)})
        out[method]["rss_within_target"] = med[method]["peak_rss_mb"] <= size["rss_target_mb"]
    return out


def markdown(result: dict) -> str:
    lines = [f"# fuse_speed — {result['when']} (commit {result['git_commit'][:8]}, {result['repeats']} repeats, median; "
             f"{result['cpus']} CPUs)", "",
             "| size | checkpoint | largest tensor | command | wall s | peak RSS MB | wall ÷ floor | wall ÷ mergekit | RSS ÷ mergekit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, size in result["sizes"].items():
        for command, med in size["median"].items():
            r = size["ratios"].get(command, {})
            lines.append(f"| {name} | {size['checkpoint_mb']:.0f} MB ({size['input_shards']} shards) | {size['largest_tensor_mb']:.0f} MB | "
                         f"{command} | {med['wall_s']:.1f} | {med['peak_rss_mb']:.0f} | {r.get('wall_vs_floor', '')} | "
                         f"{r.get('wall_vs_mergekit', '')} | {r.get('rss_vs_mergekit', '')} |")
    if set(result["sizes"]) == {"small", "large"}:
        small, large = result["sizes"]["small"], result["sizes"]["large"]
        lines += ["", "Growth small → large (checkpoint × "
                  f"{large['checkpoint_mb'] / small['checkpoint_mb']:.2f}):", ""]
        for command in large["median"]:
            lines.append(f"- {command}: wall × {large['median'][command]['wall_s'] / small['median'][command]['wall_s']:.2f}, "
                         f"peak RSS × {large['median'][command]['peak_rss_mb'] / small['median'][command]['peak_rss_mb']:.2f}")
    lines += ["", "Peak-RSS target (2 × largest tensor + 300 MB): " + ", ".join(
        f"{name} {size['rss_target_mb']:.0f} MB (kif {'met' if size['ratios']['kif']['rss_within_target'] else 'missed'}, "
        f"ties {'met' if size['ratios']['ties']['rss_within_target'] else 'missed'})" for name, size in result["sizes"].items()),
        "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml (optional)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "large"])
    parser.add_argument("--work", type=Path, default=WORK / "fuse_speed", help="checkpoints and registry, kept between runs "
                                                                              "(default benchmarks/work/fuse_speed)")
    add_results_option(parser)
    parser.add_argument("--floor", nargs="+", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        io_floor(args.floor, args.out)
        return
    if args.mergekit and not Path(args.mergekit).exists():
        sys.exit(f"{args.mergekit} not found")
    out = args.results / "fuse_speed.json"
    result = {**run_record("fuse_speed"), "repeats": args.repeats, "mergekit": bool(args.mergekit), "sizes": {}}
    if out.exists():  # resumable: a run of some sizes replaces those and keeps the others (with their commit)
        kept = json.loads(out.read_text()).get("sizes", {})
        result["sizes"] = {name: size for name, size in kept.items() if name not in args.sizes}
    for name in args.sizes:
        size = measure(name, args.work / name, args.repeats, args.mergekit)
        size["ratios"] = ratios(size)
        size.update(stamp())
        result["sizes"][name] = size
        write_results(out, result)
    table = markdown(result)
    write_results(out, result, table)
    print(table)


if __name__ == "__main__":
    main()
