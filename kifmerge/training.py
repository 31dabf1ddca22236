"""Short per-task fine-tuning with the Hugging Face Trainer: the answer-only loss, the Trainer
and its callbacks (importance, progress), and `run_training`, which saves the checkpoint and its
importance profile. Data is `kifmerge.data`'s, models and tokenizers `kifmerge.modeling`'s."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kifmerge.data import IGNORE, Collator, Encoder
from kifmerge.faults import fault_point
from kifmerge.importance import GramCollector, ImportanceAccumulator, ImportanceCallback
from kifmerge.modeling import (
    build_model,
    cast_linear_weights,
    forward_options,
    is_seq2seq,
    load_tokenizer,
    packing_cost,
    packs_sequences,
    supports_logits_window,
)
from kifmerge.options import TrainOptions


def answer_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens. Causal: logits of the answer window only (left
    padding puts every answer in the last `logits_to_keep` positions), asked for by index where the
    model takes a tensor window, so the output layer sees one contiguous block of exactly the
    positions that predict answer tokens (an int window is a strided slice, which the CPU
    multiplies as slowly as a batched matmul). Packed rows (`Collator.pack`) bring their positions
    and targets. No cache is built during training."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    keep = inputs.pop("logits_to_keep", None)
    targets = inputs.pop("answer_targets", None)
    if keep is None:
        return model(**inputs, labels=labels).loss
    index_window, takes_cache = forward_options(model)
    if takes_cache:
        inputs["use_cache"] = False
    if targets is not None:  # packed rows: `keep` holds the positions that predict `targets`
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        width = labels.shape[1]
        keep = min(keep, width)  # an empty prompt: the answer fills the whole sequence
        window: int | torch.Tensor | None = None
        if keep < width:  # positions width-keep … width-2 predict the answer tokens width-keep+1 … width-1
            window = torch.arange(width - keep, width - 1, device=labels.device) if index_window else keep
            inputs["logits_to_keep"] = window
        logits = model(**inputs).logits
        if not torch.is_tensor(window):
            logits = logits[:, -keep:-1]
        targets = labels[:, width - keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=IGNORE)


def orthogonality_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Mean over LoRA factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (KIF's optional regulariser)."""
    terms = []
    for name, param in model.named_parameters():
        if not param.requires_grad or ".lora_" not in name:
            continue
        gram = param @ param.T if ".lora_A" in name else param.T @ param
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device), ord="fro"))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class KifTrainer(Trainer):
    """The stock Trainer with the answer-only loss (and the optional orthogonality term)."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation steps
    recurrent = None  # the RecurrentFusionCallback under --recurrent (kifmerge/recurrent.py)

    def __init__(self, *args: Any, orth_reg: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.orth_reg = orth_reg
        self._step_grad_norm = None

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's per-step total gradient norm (computed for clipping or logging anyway),
        kept for the importance callback. A transformers without this hook leaves it None and
        the callback checks the gradients itself."""
        self._step_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self._step_grad_norm

    def take_grad_norm(self):
        """This step's total gradient norm, once (None if the Trainer did not report one)."""
        norm, self._step_grad_norm = self._step_grad_norm, None
        return norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = answer_loss(model, inputs)
        if self.orth_reg:
            loss = loss + self.orth_reg * orthogonality_penalty(model)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():  # autocast under --bf16/--fp16, as in training
            return answer_loss(model, inputs).detach(), None, None


class ProgressBridge(TrainerCallback):
    """Drives kifmerge's `progress(description, total)` from the Trainer's steps. Each step is
    reported when its loss is logged (right after the step), as `advance(n, loss=…)` when the
    advance function takes a `loss` keyword, else as `advance(n)`."""

    def __init__(self, progress: Callable[[str, int], Callable[[int], None]] | None, description: str):
        self.progress, self.description, self.advance = progress, description, None
        self.pending, self.takes_loss = 0, False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress and state.is_world_process_zero:
            self.advance = self.progress(self.description, state.max_steps)
            self.takes_loss = takes_keyword(self.advance, "loss")

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("train.step")
        if self.advance:
            self.pending += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs and "loss" in logs:
            self._report(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending:
            self._report(None)

    def _report(self, loss: float | None) -> None:
        steps, self.pending = self.pending, 0
        if self.takes_loss and loss is not None:
            self.advance(steps, loss=loss)
        else:
            self.advance(steps)


def takes_keyword(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.kind == p.VAR_KEYWORD
               for p in parameters)


def training_arguments(options: TrainOptions, out_dir: Path, run_name: str | None = None,
                       save_steps: int = 0) -> TrainingArguments:
    """The Trainer's arguments. Checkpoints only when `save_steps` > 0 (every `save_steps`, the last
    two kept): `out_dir` is then a resumable folder (kifmerge/resume.py)."""
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size, gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate, num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1, seed=options.seed, data_seed=options.seed,
        lr_scheduler_type="linear", warmup_steps=options.warmup_steps, bf16=options.bf16, fp16=options.fp16,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, eval_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        report_to=[] if options.report_to == "none" else [options.report_to], run_name=run_name,
        gradient_checkpointing=options.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), log_level="error",
    )


def training_collator(model: torch.nn.Module, tokenizer, seq2seq: bool, options: TrainOptions) -> Collator:
    """Ready `model` for kifmerge's training step and return the step's collator: packed rows where
    the model keeps packed sequences apart, and under `bf16` LoRA the frozen base's linear weights
    cast to bfloat16 once (autocast would cast them at every step; the products are the same)."""
    pack = None if seq2seq or not packs_sequences(model) else packing_cost(model)
    if options.bf16 and options.mode == "lora":
        cast_linear_weights(model, torch.bfloat16, frozen_only=True)
    return Collator(tokenizer.pad_token_id, seq2seq, supports_logits_window(model), pack=pack)


@dataclass
class TrainResult:
    checkpoint: Path      # adapter or model folder, saved by peft / transformers
    profile: Path         # kifmerge-profile file of raw unit scores
    metrics: dict


def build_trainer(base_dir: Path, config: dict, options: TrainOptions, init_dir: Path | None,
                  train: list[dict], val: list[dict], output_dir: Path, *, run_name: str | None = None,
                  save_steps: int = 0, callbacks: Sequence[TrainerCallback] = (),
                  importance: bool = True, outer: Sequence[dict] = ()) -> tuple[KifTrainer, ImportanceAccumulator | None]:
    """The Trainer of `kifmerge train`, ready to train: the seeded model, the encoded records, its
    collator and arguments, and the importance callback ahead of `callbacks`; returns it with the
    importance accumulator. The one place this is set up, so that the benchmarks time the step that
    `run_training` runs. `save_steps` > 0: resumable checkpoints in `output_dir`, the accumulator's
    state beside each. `importance=False`: no accumulator and no callback (what they cost:
    benchmarks/importance_overhead.py). `outer`: Recurrent-KIF's replay buffer (`options.recurrent`),
    batched as the training set is and stepped on by its callback, which follows the importance one."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    from kifmerge.resume import ImportanceCheckpoint

    set_seed(options.seed)
    tokenizer = load_tokenizer(base_dir)
    seq2seq = is_seq2seq(config)
    model = build_model(base_dir, config, options, init_dir)
    encode = Encoder(tokenizer, seq2seq, options.max_length)
    if options.gradient_checkpointing and options.mode == "lora":
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks' inputs must carry grad
    accumulator = ImportanceAccumulator(model.named_parameters(), estimator=options.importance,
                                        beta1=options.beta1, beta2=options.beta2) if importance else None
    train_set, val_set = [encode(r) for r in train], [encode(r) for r in val] or None
    collator = training_collator(model, tokenizer, seq2seq, options)
    recurrent = recurrent_callback(model, options, [encode(r) for r in outer], collator,
                                   lambda batch: replay_loss(trainer, batch)) if options.recurrent else None
    callbacks = [*([recurrent] if recurrent else []), *callbacks]
    if importance:
        callbacks = [ImportanceCallback(accumulator, grad_norm=lambda: trainer.take_grad_norm()), *callbacks,
                     *([ImportanceCheckpoint(accumulator)] if save_steps else [])]
    trainer = KifTrainer(
        model=model, args=training_arguments(options, output_dir, run_name, save_steps),
        train_dataset=train_set, eval_dataset=val_set, data_collator=collator, callbacks=list(callbacks),
        orth_reg=options.orth_reg,
    )
    trainer.remove_callback(PrinterCallback)  # stdout belongs to the command's result (--json)
    trainer.recurrent = recurrent
    return trainer, accumulator


def recurrent_callback(model: torch.nn.Module, options: TrainOptions, buffer: list[dict], collator: Collator,
                       loss: Callable[[dict], torch.Tensor]):
    """Recurrent-KIF's callback over the model's trainable weights: replay batches of the
    training's batch size in a seeded order, an outer AdamW at the training's learning rate."""
    from kifmerge.recurrent import RecurrentFusionCallback, replay_batches

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return RecurrentFusionCallback(params, replay_batches(buffer, collator, options.batch_size, options.seed), loss,
                                   every=options.recurrent, outer_steps=options.outer_steps, lr=options.learning_rate,
                                   beta1=options.beta1, beta2=options.beta2)


def replay_loss(trainer: KifTrainer, batch: dict[str, Any]) -> torch.Tensor:
    """The training loss of one replay batch, on the model's device, under the Trainer's autocast
    (as KifTrainer.prediction_step evaluates)."""
    device = next(p.device for p in trainer.model.parameters())
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with trainer.compute_loss_context_manager():
        return answer_loss(trainer.model, batch)


def run_training(base_dir: Path, config: dict, options: TrainOptions, init_dir: Path | None,
                 train: list[dict], val: list[dict], out_dir: Path,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None, description: str = "training",
                 checkpoints: Path | None = None, run_name: str | None = None,
                 outer: Sequence[dict] = ()) -> TrainResult | None:
    """Fine-tune with the Trainer while the importance callback scores every unit; save the
    checkpoint and its profile under `out_dir`. Under torchrun / accelerate only the main
    process saves (the others return None after the run). `checkpoints`: the resumable folder
    (kifmerge/resume.py) that the Trainer saves to every `save_steps` and, with `resume`,
    continues from. `outer`: Recurrent-KIF's replay buffer (`options.recurrent`), kept out of the
    training set (kifmerge/recurrent.py; such a run is never resumed)."""
    from kifmerge.checkpoints import open_checkpoint
    from kifmerge.profiles import from_unit_scores, write_profile
    from kifmerge.resume import STATE_FILE, load_importance, prepare

    checkpoints = checkpoints if options.save_steps else None
    start = prepare(checkpoints, options.resume) if checkpoints is not None else None
    trainer, accumulator = build_trainer(base_dir, config, options, init_dir, train, val, checkpoints or out_dir / "trainer",
                                         run_name=run_name, save_steps=options.save_steps if checkpoints is not None else 0,
                                         callbacks=[ProgressBridge(progress, description)], outer=outer)
    grams = GramCollector.attach(trainer.model, options.gram) if options.records_grams else None
    if start is not None:
        load_importance(accumulator, start / STATE_FILE, grams, main_process=trainer.is_world_process_zero(),
                        reduced_precision=bool(options.bf16 or options.fp16))
    if grams is not None:
        from kifmerge.resume import ImportanceCheckpoint

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ImportanceCheckpoint):
                callback.grams = grams  # saved with each checkpoint, so a resumed run's matrices cover every step
    if grams is not None and trainer.recurrent is not None:
        trainer.recurrent.outside_the_task.append(grams.paused)  # the Gram matrices stay the task's inputs'
    output = trainer.train(resume_from_checkpoint=str(start) if start is not None else None)
    metrics = {"train_loss": round(output.training_loss, 6), "steps": output.global_step,
               "runtime_s": round(output.metrics.get("train_runtime", 0.0), 3),
               "examples": {"train": len(train), "val": len(val)}, "world_size": trainer.args.world_size,
               "curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
               "importance": accumulator.report(),
               "trainable_parameters": sum(p.numel() for p in accumulator.params.values())}
    if start is not None:  # the Trainer's training_loss counts only the steps run since the resume
        metrics["resumed_from_step"] = int(start.name.rpartition("-")[2])
        metrics["train_loss"] = round(sum(p["loss"] for p in metrics["curve"]) / max(1, len(metrics["curve"])), 6)
    if trainer.recurrent is not None:
        metrics["recurrent"] = trainer.recurrent.report(len(outer))
    if val:
        metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 6)
    gram_totals = grams.totals() if grams is not None else None  # every rank's share (a collective)
    result = None
    if trainer.is_world_process_zero():
        checkpoint = out_dir / "checkpoint"
        trainer.model.save_pretrained(checkpoint, safe_serialization=True)
        fault_point("train.checkpoint-saved")
        saved = open_checkpoint(checkpoint)
        layout = saved.layout
        profile = out_dir / "profile.safetensors"
        elements = None
        if options.mode == "lora":  # element-level scores travel with the profile (the adapter's size, float16)
            shapes = {name: tuple(shape) for name, shape in saved.tensors.shapes.items()}
            elements = {name: score for name, score in accumulator.lora_element_scores().items() if name in shapes}
            elements = elements if set(elements) == set(shapes) else None
        if grams is not None:
            grams.remove()
        write_profile(profile, from_unit_scores(accumulator.unit_scores(options.mode), layout), layout,
                      {"estimator": options.importance, "steps": str(accumulator.steps)}, elements=elements,
                      grams={k: v for k, v in gram_totals.items() if k in layout.groups} if grams is not None else None)
        result = TrainResult(checkpoint, profile, metrics)
    return result


def wait_for_main_process() -> None:
    """Under torchrun / accelerate: the other ranks wait here until the main process has
    written its blobs and rows (it calls this after committing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
