"""Evaluation throughput: examples/s of `kifmerge eval`'s greedy generation on SmolLM2-135M, today's
loop against kifmerge's (kifmerge/evaluation.py `generate_answers`), in float32 and under bf16.

"before" is the generation loop as it was before issue 14 (sorted by length, left-padded, every
prompt run whole, `max_new_tokens` tokens at most, bf16 by autocast alone), kept here verbatim as
the reference. "after" is kifmerge's: the prompt prefix every example shares (the task's
instruction) runs once, and under bf16 the linear weights are cast once. "label stop" (`--label-stop`)
adds `generate_answers(references=…)`: generation stops after the labels' longest answer plus one token
(not used by `kifmerge eval`: it cuts the stored text of longer answers). The settings are the continual benchmark's (`max_new_tokens` 6, `max_length` 128,
batches of 32). Every variant answers the same dev examples; the examples are cut into chunks and
the variants take turns chunk by chunk (rotating who goes first) so machine drift hits all of them.
Reported per task and variant: examples/s (wall and process CPU time), exact match, and how many
answers are identical to "before, float32" (today's default).

    python benchmarks/eval_speed.py                         # → benchmarks/results/eval_speed.{json,md}
    python benchmarks/eval_speed.py --tasks agnews,dbpedia --examples 300 --label-stop --adapter ADAPTER_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (
    DATA,
    RESULTS,
    add_model_option,
    add_threads_option,
    argument_parser,
    model_label,
    model_session,
    options_record,
    run_record,
    write_results,
)

VARIANTS = ("before fp32", "after fp32", "before bf16", "after bf16")
LABEL_STOP = "after fp32, label stop"


def before_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, max_length: int, batch_size: int,
                    bf16: bool) -> list[str]:
    """kifmerge's generation loop before issue 14 (causal LMs), verbatim but for seq2seq."""
    import torch

    from kifmerge.evaluation import first_line
    from kifmerge.data import Encoder

    encoder = Encoder(tokenizer, False, max_length)
    model.eval()
    encoded = [encoder.prompt_ids(p, max_length - max_new_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str | None] = [None] * len(encoded)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        chunk = [encoded[i] for i in members]
        width = max(map(len, chunk))
        ids = [[pad] * (width - len(c)) + c for c in chunk]
        mask = [[0] * (width - len(c)) + [1] * len(c) for c in chunk]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for i, text in zip(members, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), strict=True):
            answers[i] = first_line(text)
    return answers


def run_task(task: str, model, tokenizer, args: argparse.Namespace) -> dict:
    from kifmerge.evaluation import exact_match, generate_answers, longest_answer
    from kifmerge.data import load_records

    records = load_records(DATA / "dev" / f"{task}.jsonl.gz", max_examples=args.examples)
    settings = {"max_new_tokens": args.max_new_tokens, "max_length": args.max_length, "batch_size": args.batch_size}
    variants = VARIANTS + ((LABEL_STOP,) if args.label_stop else ())
    answers: dict[str, list[str]] = {v: [] for v in variants}
    seconds = {v: [0.0, 0.0] for v in variants}
    for n, start in enumerate(range(0, len(records), args.chunk)):
        chunk = records[start:start + args.chunk]
        prompts, references = [r["input"] for r in chunk], [r["output"] for r in chunk]
        turn = variants[n % len(variants):] + variants[:n % len(variants)]
        for variant in turn:
            bf16 = "bf16" in variant
            wall, cpu = time.perf_counter(), time.process_time()
            if variant.startswith("before"):
                got = before_generate(model, tokenizer, prompts, bf16=bf16, **settings)
            else:
                got = generate_answers(model, tokenizer, prompts, seq2seq=False, bf16=bf16,
                                       references=references if variant.endswith("label stop") else None, **settings)
            seconds[variant][0] += time.perf_counter() - wall
            seconds[variant][1] += time.process_time() - cpu
            answers[variant] += got
        print(f"  {task}: {start + len(chunk)}/{len(records)} examples", file=sys.stderr, flush=True)
    outputs = [r["output"] for r in records]
    today = answers["before fp32"]
    rows = {}
    for variant in variants:
        wall, cpu = seconds[variant]
        rows[variant] = {"examples_per_s_wall": round(len(records) / wall, 3), "examples_per_s_cpu": round(len(records) / cpu, 3),
                         "seconds_wall": round(wall, 2), "seconds_cpu": round(cpu, 2),
                         "exact_match": round(sum(map(exact_match, answers[variant], outputs)) / len(records), 4),
                         "identical_to_before_fp32": sum(a == b for a, b in zip(answers[variant], today, strict=True))}
    base = rows["before fp32"]
    for variant in variants:
        rows[variant]["speedup_wall"] = round(rows[variant]["examples_per_s_wall"] / base["examples_per_s_wall"], 3)
        rows[variant]["speedup_cpu"] = round(rows[variant]["examples_per_s_cpu"] / base["examples_per_s_cpu"], 3)
    prompts = [r["input"] for r in records]
    return {"task": task, "examples": len(records),
            "longest_label_tokens": longest_answer(tokenizer, prompts, outputs, False),
            "identical_after_bf16_vs_after_fp32": sum(a == b for a, b in zip(answers["after bf16"], answers["after fp32"], strict=True)),
            "identical_before_bf16_vs_after_bf16": sum(a == b for a, b in zip(answers["after bf16"], answers["before bf16"], strict=True)),
            "variants": rows,
            "differing_examples": [{"index": i, **{v: answers[v][i] for v in variants}, "output": outputs[i]}
                                   for i in range(len(records)) if len({answers[v][i] for v in VARIANTS}) > 1][:20]}


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [f"# Evaluation throughput: {model_label(s['model'])}{' + ' + s['adapter'] if s['adapter'] else ' (base, zero-shot)'}", "",
             f"Greedy answers to the first {s['examples']} dev examples of each task, `max_new_tokens` {s['max_new_tokens']}, "
             f"`max_length` {s['max_length']}, batches of {s['batch_size']}; {s['threads']} threads, {payload['cpus']} CPUs "
             f"(load average at start {payload['load_average']}). The variants take turns on chunks of {s['chunk']} examples. "
             "Speed-up: examples/s over \"before, fp32\" (today's default). Identical: answers equal to \"before, fp32\"'s.", "",
             "| task | variant | examples/s (wall) | speed-up (wall) | examples/s (CPU) | speed-up (CPU) | exact match | identical |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in payload["tasks"]:
        for variant, r in t["variants"].items():
            lines.append(f"| {t['task']} | {variant} | {r['examples_per_s_wall']:.2f} | {r['speedup_wall']:.2f}× | "
                         f"{r['examples_per_s_cpu']:.2f} | {r['speedup_cpu']:.2f}× | {100 * r['exact_match']:.1f} | "
                         f"{r['identical_to_before_fp32']}/{t['examples']} |")
    lines += [""] + [f"- {t['task']}: longest label {t['longest_label_tokens']} tokens (with label stop, generation stops after "
                     f"{min(s['max_new_tokens'], t['longest_label_tokens'] + 1)}); after bf16 vs after fp32 identical "
                     f"{t['identical_after_bf16_vs_after_fp32']}/{t['examples']}; after bf16 vs before bf16 identical "
                     f"{t['identical_before_bf16_vs_after_bf16']}/{t['examples']}" for t in payload["tasks"]]
    lines += ["", f"Command: `{payload['command']}` (commit {payload['git_commit']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--tasks", default="agnews", help="dev files examples/data/long_sequence/dev/TASK.jsonl.gz, comma-separated")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="examples per turn of each variant")
    parser.add_argument("--label-stop", action="store_true", help=f"also time {LABEL_STOP!r}")
    add_model_option(parser)
    parser.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter folder to merge into the model (default: none)")
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_speed", help="results stem")
    args = parser.parse_args()
    args.threads, tokenizer = model_session(args.model, args.threads)
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    record = run_record("eval_speed")  # the load average at the start
    tasks = [run_task(task, model, tokenizer, args) for task in args.tasks.split(",")]
    payload = {**record, "torch": torch.__version__, "settings": options_record(args), "tasks": tasks}
    write_results(args.out.with_suffix(".json"), payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
