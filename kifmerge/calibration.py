"""Profiles for checkpoints trained elsewhere: gradients of the task loss on a few batches of
calibration data at the checkpoint's own weights, folded into the same EMAs as training."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kifmerge.checkpoints import Checkpoint
from kifmerge.importance import GramCollector, ImportanceAccumulator, calibrate
from kifmerge.options import TrainOptions
from kifmerge.profiles import from_unit_scores, write_profile
from kifmerge.data import Collator, Encoder, load_records
from kifmerge.modeling import build_model, is_seq2seq, load_tokenizer, supports_logits_window
from kifmerge.training import answer_loss


def calibrate_profile(checkpoint: Checkpoint, base_dir: Path, base_config: dict, data: Path, batches: int,
                      options: TrainOptions, out: Path, advance: Callable[[int], None] | None = None) -> Path:
    """Write the checkpoint's profile (kifmerge-profile format) to `out` and return it."""
    if options.importance == "change":  # at the checkpoint's own weights θ − θ_start would be 0
        from kifmerge.errors import UsageError

        raise UsageError("--importance change needs a training run (it scores the task's own change); "
                         "calibrate with first or mixed")
    if options.gram and checkpoint.kind != "lora":
        from kifmerge.errors import UsageError

        raise UsageError("--gram applies to LoRA adapters only: RegMean merges LoRA lines")
    records = load_records(data, max_examples=batches * options.batch_size)
    tokenizer = load_tokenizer(base_dir)
    seq2seq = is_seq2seq(base_config)
    model = build_model(base_dir, base_config, options.model_copy(update={"mode": checkpoint.kind}), checkpoint.path)
    encode = Encoder(tokenizer, seq2seq, options.max_length)
    collate = Collator(tokenizer.pad_token_id, seq2seq, supports_logits_window(model))
    encoded = [encode(r) for r in records]
    chunks = [collate(encoded[i:i + options.batch_size]) for i in range(0, len(encoded), options.batch_size)]
    accumulator = ImportanceAccumulator(model.named_parameters(), estimator=options.importance,
                                        beta1=options.beta1, beta2=options.beta2)
    grams = GramCollector.attach(model, options.gram, in_eval=True) if checkpoint.kind == "lora" else None
    torch.manual_seed(options.seed)
    try:
        calibrate(model, chunks, accumulator, answer_loss, advance)
    finally:
        if grams is not None:
            grams.remove()
    flat = from_unit_scores(accumulator.unit_scores(checkpoint.kind), checkpoint.layout)
    elements = None
    if checkpoint.kind == "lora":  # element-level scores too, as training records them (for kif-element)
        shapes = checkpoint.tensors.shapes
        elements = {name: score for name, score in accumulator.lora_element_scores().items() if name in shapes}
        elements = elements if set(elements) == set(shapes) else None
    write_profile(out, flat, checkpoint.layout, {"estimator": options.importance, "steps": str(accumulator.steps)},
                  elements=elements, grams={k: v for k, v in grams.grams.items() if k in checkpoint.layout.groups} if grams else None)
    return out
