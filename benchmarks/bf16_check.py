"""Does bfloat16 autocast change what the benchmark measures? Trains the first task of an order
in float32 and in bf16 (same data, seed and options as benchmarks/continual.py), evaluates both
adapters in float32 and in bf16 on the same dev examples, and reports exact match with paired
bootstrap intervals of the differences, the share of identical answers, and the times.

Uses (and shares trainings with) the benchmark's registry: the bf16 training of task 1 is the
one the benchmark already made.

    python benchmarks/bf16_check.py --order 4        # → benchmarks/results/bf16_check.{json,md}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common import (
    ORDERS,
    SMOLLM2,
    WORK,
    add_model_option,
    add_results_option,
    add_sequence_options,
    argument_parser,
    check_other_model_folders,
    builtin_sequence,
    eval_options,
    options_record,
    require_model,
    run_record,
    train_options,
    training_name,
    write_results,
)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--order", type=int, default=4, choices=sorted(ORDERS))
    parser.add_argument("--seed", type=int, default=42)
    add_sequence_options(parser)
    add_model_option(parser)
    parser.add_argument("--work", type=Path, default=None, help="the benchmark's state folder (default benchmarks/work/orderN/seedS)")
    add_results_option(parser)
    parser.add_argument("--bf16-force", action="store_true",
                        help="run bf16 even where this machine has no native bf16 (slow: a bf16 matmul ran ~34× slower)")
    args = parser.parse_args()
    from kifmerge.precision import SLOWDOWN_WITHOUT_NATIVE_BF16, bf16_support

    native, why = bf16_support()
    if not native and not args.bf16_force:  # kifmerge would run its bf16 side in float32: nothing to compare
        sys.exit(f"no native bf16 here ({why}): the check would compare float32 with float32; run it where bf16 is "
                 f"native, or pass --bf16-force (bf16 ran ~{SLOWDOWN_WITHOUT_NATIVE_BF16}× slower than float32 on such a CPU)")
    require_model(args.model)
    check_other_model_folders(args)
    base = "smollm2" if args.model == SMOLLM2 else "base"  # another model: another registry (--work)

    from kifmerge import api
    from kifmerge.stats import average_precision, interval, paired_difference, resample_indices

    task = builtin_sequence(args.order)[0]
    registry = (args.work or WORK / f"order{args.order}" / f"seed{args.seed}") / "registry"
    api.init(registry)
    if not api.list_items("bases", registry=registry):
        api.add_base(base, args.model, registry=registry)
    existing = {row["name"] for row in api.list_items("tasks", registry=registry)}
    trained, train_s = {}, {}
    for precision in ("bf16", "fp32"):
        options = train_options(args, args.seed, precision)
        name = training_name(task, None, options)  # the first task's training from the base, as continual.py names it
        if name not in existing:
            print(f"train {name} ({precision})", file=sys.stderr, flush=True)
            api.train(name, task.train, f"bf16check-{precision}", base=base, options={**options, "bf16_force": args.bf16_force},
                      registry=registry)
        trained[precision] = name
        train_s[precision] = api.show(name, registry=registry)["metrics"]["runtime_s"]
    scores, seconds = {}, {}
    for precision, name in trained.items():
        for mode in ("fp32", "bf16"):
            t0 = time.perf_counter()
            result = api.evaluate(f"task:{name}", {task.name: task.dev}, bf16=mode == "bf16", bf16_force=args.bf16_force,
                                  registry=registry, **eval_options(args))
            seconds[f"train {precision}, eval {mode}"] = result["results"][task.name].get("seconds", round(time.perf_counter() - t0, 1))
            scores[(precision, mode)] = predictions(registry, name, task.name, mode == "bf16")
    idx = resample_indices([args.eval_examples], 2000, seed=0)
    from kifmerge.evaluation import exact_match

    est = {k: average_precision([[exact_match(p, o) for p, o in zip(pred, outs, strict=True)]], idx) for k, (pred, outs) in scores.items()}
    rows = {f"train {p}, eval {m}": interval(est[(p, m)][1], est[(p, m)][0]) for p, m in scores}
    diffs = {"eval bf16 − eval fp32 (bf16-trained adapter)": paired_difference(est[("bf16", "bf16")], est[("bf16", "fp32")]),
             "eval bf16 − eval fp32 (fp32-trained adapter)": paired_difference(est[("fp32", "bf16")], est[("fp32", "fp32")]),
             "train bf16 − train fp32 (both evaluated fp32)": paired_difference(est[("bf16", "fp32")], est[("fp32", "fp32")])}
    agree = {f"train {p}: identical answers fp32 vs bf16 eval": sum(a == b for a, b in zip(scores[(p, "fp32")][0], scores[(p, "bf16")][0]))
             for p in ("bf16", "fp32")}
    payload = {**run_record("bf16_check"), "task": task.name, "exact_match": rows, "differences": diffs,
               "identical_answers": agree, "examples": args.eval_examples, "train_runtime_s": train_s,
               "eval_seconds": seconds, "settings": options_record(args),
               "bf16": f"native ({why})" if native else f"forced (--bf16-force; {why})"}
    lines = [f"# bf16 autocast check: {task.name}, {args.steps} steps, first {args.eval_examples} dev examples", "",
             "| adapter / evaluation | exact match [95 % CI] |", "| --- | --- |"]
    lines += [f"| {k} | {100 * v['value']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}] |" for k, v in rows.items()]
    lines += ["", "| paired difference | points [95 % CI] | called |", "| --- | --- | --- |"]
    lines += [f"| {k} | {100 * v['value']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}] | {v['called']} |" for k, v in diffs.items()]
    lines += [""] + [f"- {k}: {v} of {args.eval_examples}" for k, v in agree.items()]
    lines += [f"- bf16 on this machine: {payload['bf16']}"]
    lines += [f"- training time: bf16 {train_s['bf16']:.0f} s, fp32 {train_s['fp32']:.0f} s (2 cores, as loaded as the machine was)",
              "", f"Command: `{payload['command']}` (commit {payload['git_commit']}).", ""]
    write_results(args.results / "bf16_check.json", payload, "\n".join(lines))
    print("\n".join(lines))


def predictions(registry: Path, task: str, label: str, bf16: bool) -> tuple[list[str], list[str]]:
    """(predictions, references) of the stored evaluation of a task's own weights."""
    from kifmerge.services.common import opened

    with opened(registry) as reg:
        rows = [r for r in reg.catalog.rows("evaluations", "line = ? AND label = ?", [f"task:{task}", label], order_by="id")
                if bool(r["settings"].get("bf16")) == bf16]
        stored = json.loads(reg.blobs.open_verified(rows[-1]["predictions"]).read_bytes())
    return [p["prediction"] for p in stored], [p["output"] for p in stored]


if __name__ == "__main__":
    main()
