"""Why the importance callback costs what it does on a full fine-tune: its update against the
memory bandwidth of this machine, in-process, on float32 parameters shaped like SmolLM2-135M's.

- copy / sum: what moving 8 and 4 bytes per element costs here (the bandwidth yardstick);
- update: `ImportanceAccumulator.update(finite=True)`, the callback's per-step work (read θ and g,
  read and write Ī and Ū: at least 24 bytes per parameter);
- finiteness pass: the extra pass over every gradient the callback no longer makes (the
  Trainer's gradient norm tells it).

Minimum of --repeats runs each. Writes benchmarks/results/importance_bandwidth.{json,md}.

    python benchmarks/importance_bandwidth.py [--repeats 7] [--layers 30] [--vocab 49152]
"""

from __future__ import annotations

import time

from common import add_results_option, argument_parser, run_record, write_results

# SmolLM2-135M: 30 layers of q/k/v/o (k, v narrower) and gate/up/down, plus the tied embedding
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * min(times), 1)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"SmolLM2's layers (default {LAYERS}; fewer: a quick check)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"rows of the embedding (default SmolLM2's {VOCAB})")
    add_results_option(parser)
    args = parser.parse_args()
    import torch

    from kifmerge.importance import ImportanceAccumulator

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in LAYER * args.layers + [(args.vocab, HIDDEN)]]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    flat_a, flat_b = torch.randn(n), torch.empty(n)
    accumulator = ImportanceAccumulator([(f"p{i}", p) for i, p in enumerate(params)])
    grads = [p.grad for p in params]
    copy_ms = best_ms(lambda: flat_b.copy_(flat_a), args.repeats)
    rows = {"parameters": n, "threads": torch.get_num_threads(),
            "copy_ms": copy_ms, "copy_GBps": round(8 * n / copy_ms / 1e6, 1),
            "sum_ms": best_ms(lambda: flat_a.sum(), args.repeats),
            "update_ms": best_ms(lambda: accumulator.update(finite=True), args.repeats),
            "finiteness_pass_ms": best_ms(lambda: torch.isfinite(torch.stack(torch._foreach_norm(grads))).all(), args.repeats)}
    rows["update_floor_ms"] = round(24 * n / (rows["copy_GBps"] * 1e6), 1)  # 24 B per parameter at copy bandwidth
    result = {**run_record("importance_bandwidth"), **rows}
    lines = [f"# importance_bandwidth — {result['when']} (commit {result['git_commit']}; {result['cpus']} CPUs, "
             f"load average {result['load_average']:.2f}; best of {args.repeats})", "",
             f"{n:,} float32 parameters shaped like SmolLM2-135M, {rows['threads']} threads.", "",
             "| operation | ms |", "| --- | ---: |",
             f"| copy, 8 B per element ({rows['copy_GBps']} GB/s) | {rows['copy_ms']} |",
             f"| sum, 4 B per element | {rows['sum_ms']} |",
             f"| 24 B per parameter at copy bandwidth (the update's floor) | {rows['update_floor_ms']} |",
             f"| `ImportanceAccumulator.update(finite=True)` | {rows['update_ms']} |",
             f"| finiteness pass over every gradient (no longer made) | {rows['finiteness_pass_ms']} |", "",
             f"Command: `{result['command']}`", ""]
    write_results(args.results / "importance_bandwidth.json", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
