"""kifmerge's training step against the plain recipe, on the same SmolLM2-135M batches.

kifmerge: answer-only loss, left padding, logits of the answer window only (kifmerge/training.py),
the importance callback after every optimizer step (kifmerge/importance.py), KifTrainer.
Plain recipe (the reference code's): right padding (DataCollatorForSeq2Seq), labels -100 on the
prompt, the model's own loss over full-vocabulary logits, the stock transformers Trainer.
Both: the same token ids (kifmerge's encoder), the same LoRA (peft; r, alpha, dropout, targets),
the same TrainingArguments (kifmerge's, so AdamW, clipping, schedule and logging match), the same
batches in the same order, the same initial adapter; fp32, and bf16 autocast as `--bf16` does it.

A step is the Trainer's loop iteration (from one step's begin to the next: collation, forward,
backward, clipping, optimizer, kifmerge's importance callback, scheduler, logging). The recipes
alternate round by round (kif, plain, plain, kif, ...) in one process so machine drift hits both;
the first step of every round is dropped. Reported: median step of each, the ratio (the median
over rounds of the ratio of the two recipes' median steps in that round: adjacent in time, so a
load change between rounds cancels) and its spread over rounds, the callback's median, and a check that the two recipes compute the same losses and
train the same adapter. `--profile` adds where the time of one forward+backward goes.

    python benchmarks/train_step.py                      # → benchmarks/results/train_step.{json,md}
    python benchmarks/train_step.py --task dbpedia --precisions bf16 --rounds 6 --profile
    python benchmarks/train_step.py --against no-gram    # → gram_overhead: the default's Gram recording

`--against no-gram` times kifmerge's step against itself with `--no-gram`: what recording the input
Gram matrices costs (on by default for LoRA since the default rule, regmean, reads them). Both train
the same adapter bit for bit: the hooks only read the inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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
    timing_calls,
    write_results,
)
from transformers import TrainerCallback

GOAL = 0.75


def ratio_rows(rows: list[dict], against: str = "plain") -> list[str]:
    """The step-time table: per precision and clock, both recipes' steps and their ratio."""
    lines = [f"| precision | clock | kifmerge step (ms) | {against} step (ms) | ratio | ratio per round: min–max |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        for clock in ("wall", "cpu"):
            c = r[clock]
            lines.append(f"| {r['precision']} | {clock} | {c['step_ms_kifmerge']:.0f} | {c[step_key(against)]:.0f} | "
                         f"{c['ratio']:.3f} | {c['ratio_spread'][0]:.3f}–{c['ratio_spread'][1]:.3f} |")
    return lines


def step_key(recipe: str) -> str:
    return "step_ms_" + recipe.replace("-", "_")


class Timer(TrainerCallback):
    """Wall and process CPU time of every loop iteration (step begin to the next step's begin; the
    last step ends at its loss record). On a shared machine the CPU time of a one-thread run is the
    steadier figure: another process's work does not count in it."""

    def __init__(self):
        self.begins: list[tuple[float, float]] = []
        self.last_log = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append((time.perf_counter(), time.process_time()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_log = (time.perf_counter(), time.process_time())

    def steps(self) -> list[tuple[float, float]]:
        ends = self.begins[1:] + [self.last_log]
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.begins, ends, strict=True)]


def in_dataset_order(trainer) -> None:
    """`trainer` with its batches in dataset order (both recipes see the same batches)."""
    import torch

    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)


class Recipe:
    """One recipe's model and trainer, trained `steps` steps per round. kifmerge's is `kifmerge
    train`'s own (kifmerge/training.py `build_trainer`, which encodes `records` into the same ids
    as `features`, with the Gram recording `run_training` attaches by default); `no-gram` the same
    with `--no-gram`; the plain one trains `features` with the stock Trainer."""

    def __init__(self, name: str, model_dir: Path, records: list[dict], features: list[dict], options, work: Path):
        from kifmerge.training import build_trainer

        config = json.loads((model_dir / "config.json").read_text())
        self.name, self.timer, self.update_times = name, Timer(), []
        if name in ("kifmerge", "no-gram"):
            from kifmerge.importance import GramCollector

            options = options.model_copy(update={"gram": False}) if name == "no-gram" else options
            self.trainer, accumulator = build_trainer(model_dir, config, options, None, records, [], work / name,
                                                      callbacks=[self.timer])
            self.grams = GramCollector.attach(self.trainer.model, options.gram) if options.records_grams else None
            if name == "kifmerge":
                accumulator.update = timing_calls(accumulator.update, self.update_times)
        else:
            self.trainer = plain_trainer(model_dir, config, features, options, work / name, self.timer)
        in_dataset_order(self.trainer)
        self.model = self.trainer.model
        self.rounds: list[list[float]] = []
        self.losses: list[list[float]] = []

    def round(self) -> None:
        self.timer.begins.clear()
        self.trainer.train()
        self.rounds.append(self.timer.steps()[1:])  # the first step of a round warms up
        self.losses.append([h["loss"] for h in self.trainer.state.log_history if "loss" in h])

    def adapter(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def plain_trainer(model_dir: Path, config: dict, features: list[dict], options, output_dir: Path, timer: Timer):
    """The reference code's recipe: peft's LoRA with kifmerge's settings and the same initial adapter
    (seeded as `build_trainer` seeds), right padding, labels -100 on the prompt, the stock Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback

    from kifmerge.modeling import DEFAULT_TARGETS, load_tokenizer
    from kifmerge.training import training_arguments

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    set_seed(options.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=options.rank, lora_alpha=options.lora_alpha or 2 * options.rank,
                      lora_dropout=options.lora_dropout, target_modules=DEFAULT_TARGETS[config["model_type"]],
                      task_type="CAUSAL_LM")
    plain = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]), "labels": f["labels"]}
             for f in features]
    trainer = Trainer(model=get_peft_model(base, lora), args=training_arguments(options, output_dir), train_dataset=plain,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    return trainer


def profile_step(recipe: "Recipe", bf16: bool) -> dict[str, float]:
    """Self CPU seconds of one forward+backward on the first batch, by kind of work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer = recipe.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)])
    model = trainer.model
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        trainer.compute_loss(model, dict(batch)).backward()  # warm-up
        model.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.compute_loss(model, dict(batch)).backward()
        model.zero_grad()
    kinds = {"matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear"),
             "attention": ("flash_attention", "scaled_dot_product", "aten::_softmax"),
             "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
             "loss (log-softmax, nll)": ("log_softmax", "nll_loss", "cross_entropy"),
             "zero fills": ("aten::fill_", "aten::zero_", "aten::zeros")}
    out = {k: 0.0 for k in kinds} | {"other element-wise": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if any(n in event.key for n in names)), "other element-wise")
        out[kind] += event.self_cpu_time_total / 1e6
    return {k: round(v, 4) for k, v in out.items()}


def run_precision(precision: str, args: argparse.Namespace, records: list[dict], features: list[dict], work: Path) -> dict:
    from kifmerge.options import TrainOptions

    options = TrainOptions(max_steps=args.steps + 1, batch_size=args.batch_size, max_length=args.max_length,
                           lora_r=args.lora_r, lr=args.lr, bf16=precision == "bf16", save_steps=0)
    recipes = [Recipe(name, args.model, records, features, options, work) for name in ("kifmerge", args.against)]
    for r in range(args.rounds):
        for recipe in recipes if r % 2 == 0 else recipes[::-1]:
            recipe.round()
            print(f"  {precision} round {r + 1}/{args.rounds} {recipe.name:<8} median step "
                  f"{1000 * statistics.median(t[0] for t in recipe.rounds[-1]):8.1f} ms wall, "
                  f"{1000 * statistics.median(t[1] for t in recipe.rounds[-1]):8.1f} ms CPU", file=sys.stderr, flush=True)
    kif, plain = recipes
    if args.against == "no-gram":
        row_grams = {"gram_modules": len(kif.grams.grams) if kif.grams else 0,
                     "gram_trace_sum": float(sum(float(g.diagonal().sum()) for g in kif.grams.grams.values())) if kif.grams else 0.0}
    else:
        row_grams = {}
    weights_k, weights_p = kif.adapter(), plain.adapter()
    drift = max(float((weights_k[n] - weights_p[n]).abs().max()) for n in weights_k)
    scale = max(float(w.abs().max()) for w in weights_p.values())
    losses_k, losses_p = kif.losses[0], plain.losses[0]
    row = {"precision": precision}
    for clock, which in (("wall", 0), ("cpu", 1)):
        times = {rec.name: [[t[which] for t in r] for r in rec.rounds] for rec in recipes}
        step = {name: statistics.median(t for r in rounds for t in r) for name, rounds in times.items()}
        per_round = [statistics.median(k) / statistics.median(p) for k, p in zip(times["kifmerge"], times[args.against], strict=True)]
        row[clock] = {"step_ms_kifmerge": round(1000 * step["kifmerge"], 1), step_key(args.against): round(1000 * step[args.against], 1),
                      "ratio": round(statistics.median(per_round), 4),
                      "ratio_of_medians": round(step["kifmerge"] / step[args.against], 4),
                      "ratio_per_round": [round(x, 4) for x in per_round],
                      "ratio_spread": [round(min(per_round), 4), round(max(per_round), 4)],
                      "steps_ms": {name: [[round(1000 * t, 1) for t in r] for r in rounds] for name, rounds in times.items()}}
    callback = statistics.median(kif.update_times) if kif.update_times else None
    row.update({"callback_ms": round(1000 * callback, 2) if callback else None,
                "callback_share_of_step": round(callback / (row["wall"]["step_ms_kifmerge"] / 1000), 5) if callback else None,
                "steps_timed_per_recipe": sum(map(len, kif.rounds)),
                "losses_round1": {"kifmerge": losses_k, args.against: losses_p}, **row_grams,
                "max_loss_difference": round(max(abs(a - b) for a, b in zip(losses_k, losses_p, strict=True)), 6),
                "adapter_max_abs_difference": drift, "adapter_max_abs": scale})
    if args.profile:
        row["profile_s"] = {rec.name: profile_step(rec, precision == "bf16") for rec in recipes}
    return row


def markdown(payload: dict) -> str:
    s = payload["settings"]
    against = s.get("against", "plain")
    title = ("kifmerge vs the plain Trainer + peft recipe" if against == "plain" else
             "kifmerge (Gram matrices recorded: the default) vs kifmerge --no-gram")
    goal = f" Goal: ratio ≤ {GOAL}." if against == "plain" else ""
    lines = [f"# Training step: {title} ({model_label(s['model'])}, LoRA r={s['lora_r']})", "",
             f"Task {s['task']}, batch {s['batch_size']}, max length {s['max_length']} (batches padded to their longest "
             f"sequence: mean {payload['batch_width_mean']:.0f} positions for {payload['tokens_per_batch_mean']:.0f} tokens), "
             f"{s['rounds']} alternating rounds of {s['steps']} timed steps per recipe, {s['threads']} threads, "
             f"{payload['cpus']} CPUs (load average at start {payload['load_average']}).{goal}", "",
             *ratio_rows(payload["rows"], against)]
    lines += ["", "| precision | importance callback (ms, share of kifmerge's step) | max loss Δ (first round) | adapter max Δ (end) |",
              "| --- | ---: | ---: | ---: |"]
    for r in payload["rows"]:
        lines.append(f"| {r['precision']} | {r['callback_ms']:.1f} ({100 * r['callback_share_of_step']:.2f} %) | "
                     f"{r['max_loss_difference']:.2g} | {r['adapter_max_abs_difference']:.2g} (of {r['adapter_max_abs']:.2g}) |")
    if any("profile_s" in r for r in payload["rows"]):
        lines += ["", "Where one forward+backward goes (self CPU seconds, torch.profiler, first batch):", "",
                  "| precision | recipe | " + " | ".join(next(iter(payload["rows"][0]["profile_s"].values()))) + " |",
                  "| --- | --- |" + " ---: |" * len(next(iter(payload["rows"][0]["profile_s"].values())))]
        for r in payload["rows"]:
            for name, kinds in r.get("profile_s", {}).items():
                lines.append(f"| {r['precision']} | {name} | " + " | ".join(f"{v:.3f}" for v in kinds.values()) + " |")
    if against == "no-gram":
        lines += ["", "The two recipes train the same adapter (the hooks only read each module's input): what differs "
                  "is one XᵀX per distinct LoRA module input per step (q and v of a layer share theirs), summed in "
                  f"float32. Modules with a Gram matrix: {payload['rows'][0].get('gram_modules')}."]
    else:
        lines += ["", "Both recipes run the same transformer body (forward, and the backward that carries gradients down "
                  "to every layer's LoRA factors); kifmerge's step differs only in what it leaves out: the output layer "
                  "and its log-softmax run on the positions that predict answer tokens instead of every position "
                  "(49 152-wide), sequences of unequal length are packed into fewer rows when that saves work, and under "
                  "bf16 the frozen base is cast once instead of at every step. What is left of its step is that body: "
                  "matrix products and attention (the profile above)."]
    before = payload.get("compare")
    if before:
        lines += ["", f"The same benchmark on the code before (commit {before['git_commit']}, its own run: "
                  f"`{before['command']}`, load average at start {before['load_average']}):", "",
                  *ratio_rows(before["rows"], (before.get("settings") or {}).get("against", "plain"))]
    lines += ["", f"Command: `{payload['command']}` (commit {payload['git_commit']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--task", default="agnews", help="training file examples/data/long_sequence/train/TASK.jsonl.gz")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and recipe (one more warms up)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16")
    add_threads_option(parser)
    add_model_option(parser)
    parser.add_argument("--profile", action="store_true", help="also profile one forward+backward of each recipe")
    parser.add_argument("--against", choices=("plain", "no-gram"), default="plain",
                        help="the recipe kifmerge's step is timed against: the plain Trainer + peft recipe, or kifmerge "
                             "with --no-gram (what the default Gram recording costs)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: train_step, or gram_overhead "
                                                                "with --against no-gram)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="the JSON of an earlier run (e.g. of an older commit) to show beside this one")
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("train_step" if args.against == "plain" else "gram_overhead")
    args.threads, tokenizer = model_session(args.model, args.threads)
    import torch

    from kifmerge.data import Encoder, load_records
    records = load_records(DATA / "train" / f"{args.task}.jsonl.gz", max_examples=(args.steps + 1) * args.batch_size)
    features = [Encoder(tokenizer, False, args.max_length)(r) for r in records]
    batches = [features[i:i + args.batch_size] for i in range(0, len(features), args.batch_size)]
    record = run_record("train_step")  # the load average at the start
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for precision in args.precisions.split(","):
            rows.append(run_precision(precision, args, records, features, Path(work)))
            r = rows[-1]
            for clock in ("wall", "cpu"):
                c = r[clock]
                print(f"{precision} {clock}: kifmerge {c['step_ms_kifmerge']:.0f} ms, {args.against} {c[step_key(args.against)]:.0f} ms, "
                      f"ratio {c['ratio']:.3f} (rounds {c['ratio_spread'][0]:.3f}–{c['ratio_spread'][1]:.3f})", flush=True)
            print(f"{precision}: callback {r['callback_ms']} ms, max loss Δ {r['max_loss_difference']:.2g}", flush=True)
    payload = {**record, "torch": torch.__version__, "settings": options_record(args),
               "batch_width_mean": statistics.mean(max(len(f["input_ids"]) for f in b) for b in batches),
               "tokens_per_batch_mean": statistics.mean(sum(len(f["input_ids"]) for f in b) for b in batches),
               "goal_ratio": GOAL, "rows": rows}
    if args.compare:
        earlier = json.loads(args.compare.read_text())
        payload["compare"] = {k: earlier.get(k) for k in ("git_commit", "command", "load_average", "settings", "rows")}
    write_results(args.out.with_suffix(".json"), payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
