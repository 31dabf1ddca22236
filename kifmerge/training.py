"""Short per-task fine-tuning with the Hugging Face Trainer: data loading, tokenisation with
the prompt masked, collation, and model set-up (LoRA through peft, or full).

Causal LMs learn only the answer: prompt tokens are labelled -100 (masks built from lengths,
never from the pad id, which often equals end-of-text). Batches are left-padded so every
answer sits at the right edge, which lets the loss ask the model for logits of the last few
positions only (`logits_to_keep`) — the output layer over a large vocabulary dominates the
step time otherwise. Where the model keeps packed sequences apart and it saves work, a batch's
sequences are packed into fewer rows instead of padded to the longest (`Collator.pack`).
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kifmerge.chat import Conversation, chat_record, render_prompt
from kifmerge.errors import InvalidInputError
from kifmerge.faults import fault_point
from kifmerge.options import TrainOptions

IGNORE = -100
CUE_TOKENS = 16  # prompt tokens kept at the end when a prompt is truncated (the answer cue)
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "gpt2": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"]}


# ---- data -----------------------------------------------------------------------------------
def load_records(path: str | Path, max_examples: int | None = None) -> list[dict[str, str]]:
    """A JSON list or JSONL of {"input", "output"} records, or of {"messages": […]} chat records
    (kifmerge/chat.py), gzip-compressed when the name ends in `.gz` (FILE.jsonl.gz, FILE.json.gz);
    a bad record is named by file and line."""
    from kifmerge.checkpoints import read_text

    path = Path(path)
    text = read_text(path, "data file")
    records = [_check_record(path, line, obj) for obj, line in _json_values(path, text)]
    if not records:
        raise InvalidInputError(f"{path} holds no records")
    return records[:max_examples] if max_examples else records


def _json_values(path: Path, text: str):
    """(value, line) for each element of a JSON array, or each line of JSONL."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped.startswith("["):
        position = text.index("[") + 1
        while True:
            position = _skip_space(text, position)
            if position < len(text) and text[position] == "]":
                return
            line = text.count("\n", 0, position) + 1
            start = position
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise InvalidInputError(f"{path}:{line}: a record nested too deeply") from None
            _check_record_size(path, line, position - start)
            yield value, line
            position = _skip_space(text, position)
            if position < len(text) and text[position] == ",":
                position += 1
            elif position >= len(text) or text[position] != "]":
                raise InvalidInputError(f"{path}:{text.count(chr(10), 0, position) + 1}: expected ',' or ']' between records")
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 etc. may sit in a string
        if line.strip():
            _check_record_size(path, number, len(line))
            try:
                yield json.loads(line), number
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise InvalidInputError(f"{path}:{number}: a record nested too deeply") from None


def _check_record_size(path: Path, line: int, size: int) -> None:
    """A record longer than MAX_RECORD_BYTES characters is refused (exit 4) before it is decoded
    (JSONL) or kept (a JSON array's element)."""
    from kifmerge.limits import MAX_RECORD_BYTES

    if size > MAX_RECORD_BYTES:
        raise InvalidInputError(f"{path}:{line}: a record of {size:,} characters; kifmerge's limit is {MAX_RECORD_BYTES:,} "
                                "(README: Limits)")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _check_record(path: Path, line: int, obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{path}:{line}: a record must be an object with \"input\" and \"output\" (or \"messages\")")
    if "messages" in obj:
        return chat_record(path, line, obj)
    for key in ("input", "output"):
        if not isinstance(obj.get(key), str) or (key == "output" and not obj[key].strip()):
            raise InvalidInputError(f"{path}:{line}: record lacks a non-empty string {key!r}")
    return {"input": obj["input"], "output": obj["output"]}


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not val_fraction:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * val_fraction)))
    if n_val >= len(records):
        raise InvalidInputError(f"--val-fraction {val_fraction} leaves no training examples out of {len(records)}")
    val = {i for i in order[:n_val]}
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# ---- tokenisation and batches -----------------------------------------------------------------
def answer_text(prompt: str, answer: str) -> str:
    """The answer as it continues the prompt: a space is added unless the prompt ends in whitespace
    (or is a chat prompt: the template's generation prompt is where the answer starts)."""
    return answer if not prompt or prompt[-1].isspace() or isinstance(prompt, Conversation) else " " + answer


@dataclass
class Encoder:
    tokenizer: Any
    seq2seq: bool
    max_length: int

    def prompt_ids(self, prompt: str, budget: int | None = None) -> list[int]:
        """Prompt tokens; when too long, the middle is cut so the instruction and the cue stay. A chat
        prompt is rendered by the chat template, which writes its own special tokens (causal LMs)."""
        if isinstance(prompt, Conversation):
            ids = self.tokenizer(render_prompt(self.tokenizer, prompt), add_special_tokens=self.seq2seq)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        budget = self.max_length if budget is None else budget
        if len(ids) > budget:
            tail = min(CUE_TOKENS, budget // 4)
            ids = ids[: budget - tail] + ids[len(ids) - tail:]
        return ids

    def __call__(self, record: dict[str, str]) -> dict[str, list[int]]:
        if self.seq2seq:
            labels = self.tokenizer(text_target=record["output"], truncation=True, max_length=self.max_length - 1)["input_ids"]
            if not labels or labels[-1] != self.tokenizer.eos_token_id:
                labels = labels + [self.tokenizer.eos_token_id]  # the decoder must learn to stop
            return {"input_ids": self.prompt_ids(record["input"]), "labels": labels}
        answer = self.tokenizer(answer_text(record["input"], record["output"]), add_special_tokens=False)["input_ids"]
        answer = answer[: self.max_length // 2] + [self.tokenizer.eos_token_id]
        prompt = self.prompt_ids(record["input"], self.max_length - len(answer))
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


@dataclass
class Collator:
    """Pads a batch: causal LMs on the left (answers aligned at the right edge), seq2seq on the right.

    `pack` (causal LMs whose forward keeps sequences packed in one row apart: `packs_sequences`):
    the relative cost of attention per token pair (`packing_cost`). When it makes the batch
    cheaper, its sequences are packed into fewer rows, each row a run of whole sequences (positions
    restarting at 0) and its padding as one more such run, so padding up to the longest sequence
    is not computed; the model attends within each sequence only, so every sequence computes what
    it would alone."""

    pad_id: int
    seq2seq: bool
    window: bool = True  # the model accepts `logits_to_keep`
    pack: float | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pack is not None and not self.seq2seq:
            rows = pack_rows([len(f["input_ids"]) for f in features], self.pack)
            if rows is not None:
                return self._packed(features, rows)
        if self.seq2seq:
            longest_label = max(len(f["labels"]) for f in features)
            return {
                "input_ids": torch.tensor([f["input_ids"] + [self.pad_id] * (longest - len(f["input_ids"])) for f in features]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]),
                "labels": torch.tensor([f["labels"] + [IGNORE] * (longest_label - len(f["labels"])) for f in features]),
            }
        pads = [longest - len(f["input_ids"]) for f in features]
        mask = torch.tensor([[0] * p + [1] * len(f["input_ids"]) for p, f in zip(pads, features, strict=True)])
        batch = {
            "input_ids": torch.tensor([[self.pad_id] * p + f["input_ids"] for p, f in zip(pads, features, strict=True)]),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": torch.tensor([[IGNORE] * p + f["labels"] for p, f in zip(pads, features, strict=True)]),
        }
        answer = max(sum(1 for t in f["labels"] if t != IGNORE) for f in features)
        batch["logits_to_keep"] = answer + 1 if self.window else longest
        return batch

    def _packed(self, features: list[dict[str, list[int]]], rows: list[list[int]]) -> dict[str, Any]:
        """Rows of whole sequences; `logits_to_keep` the positions (of any row) that predict an answer
        token of their own sequence, `answer_targets` those tokens (IGNORE elsewhere)."""
        width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
        ids, positions, labels, predicts = [], [], [], []
        for row in rows:
            row_ids, row_positions, row_labels, row_predicts = [], [], [], []
            for i in row:
                f = features[i]
                n = len(f["input_ids"])
                row_ids += f["input_ids"]
                row_positions += range(n)
                row_labels += f["labels"]
                row_predicts += [f["labels"][j + 1] != IGNORE for j in range(n - 1)] + [False]
            rest = width - len(row_ids)
            ids.append(row_ids + [self.pad_id] * rest)
            positions.append(row_positions + list(range(rest)))
            labels.append(row_labels + [IGNORE] * rest)
            predicts.append(row_predicts + [False] * rest)
        labels_t, predicts_t = torch.tensor(labels), torch.tensor(predicts)
        keep = predicts_t.any(dim=0).nonzero().flatten()
        targets = torch.where(predicts_t[:, keep], labels_t[:, keep + 1], IGNORE)
        return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions), "labels": labels_t,
                "logits_to_keep": keep, "answer_targets": targets}


def pack_rows(lengths: list[int], attention: float, gain: float = 0.05) -> list[list[int]] | None:
    """The cheapest arrangement of sequences of these lengths into rows (longest first, each into
    the shortest row so far), by the cost rows × width × (1 + attention × width): the token-wise work
    plus attention, which grows with the width. None when one sequence per row (padded) is within
    `gain` of it."""
    padded = len(lengths) * max(lengths) * (1 + attention * max(lengths))
    best, best_cost = None, padded * (1 - gain)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for count in range(1, len(lengths)):
        rows: list[list[int]] = [[] for _ in range(count)]
        sums = [0] * count
        for i in order:
            r = sums.index(min(sums))
            rows[r].append(i)
            sums[r] += lengths[i]
        width = max(sums)
        cost = count * width * (1 + attention * width)
        if cost < best_cost:
            best, best_cost = [sorted(row) for row in rows], cost
    return best


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


_FORWARD_OPTIONS: dict[type, tuple[bool, bool]] = {}


def forward_options(model: torch.nn.Module) -> tuple[bool, bool]:
    """(the forward takes a tensor `logits_to_keep`, the forward takes `use_cache`), per model class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = _FORWARD_OPTIONS.get(type(base))
    if found is None:
        parameters = inspect.signature(base.forward).parameters
        window = parameters.get("logits_to_keep")
        found = (window is not None and "Tensor" in str(window.annotation), "use_cache" in parameters)
        _FORWARD_OPTIONS[type(base)] = found
    return found


@torch.no_grad()
def packs_sequences(model: torch.nn.Module) -> bool:
    """Does the model keep sequences packed in one row apart (attention within each run of
    positions counting up from 0, without an attention mask), and take a tensor `logits_to_keep`?
    Tried on two short random sequences: the second's logits alone and after the first must agree."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters or not forward_options(model)[0]:
        return False
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, embeddings.num_embeddings, (1, n), generator=generator).to(device) for n in (7, 5))
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=second, position_ids=torch.arange(5, device=device)[None], use_cache=False).logits
        packed = model(input_ids=torch.cat([first, second], dim=1), use_cache=False,
                       position_ids=torch.cat([torch.arange(7), torch.arange(5)]).to(device)[None]).logits[:, 7:]
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    scale = float(alone.abs().max()) or 1.0
    return bool(torch.allclose(packed.float(), alone.float(), rtol=0.0, atol=1e-3 * scale))


def packing_cost(model: torch.nn.Module) -> float | None:
    """Attention's work per token pair relative to the rest of a token's work (`Collator.pack`), from
    the model's shape: per layer ~4·heads·head_dim operations per pair against 2 per weight per token;
    doubled because attention kernels reach a lower rate than the matrix products. None when the
    config does not say."""
    config = getattr(model, "config", None)
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    tables = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    embedded = sum(w.numel() for w in {id(w): w for w in tables}.values())  # tied: counted once, as parameters() does
    per_layer = (sum(p.numel() for p in model.parameters()) - embedded) / layers
    return 2 * 4 * heads * head_dim / (2 * per_layer) if per_layer > 0 else None


def cast_linear_weights(model: torch.nn.Module, dtype: torch.dtype, *, frozen_only: bool = False) -> Callable[[], None]:
    """Cast the float32 weights and biases of `model`'s `nn.Linear` layers (only those that are not
    trained, with `frozen_only`) to `dtype`, each as a new parameter (a weight shared with the input
    embeddings, such as a tied output layer's, gets its own copy: the embeddings stay float32);
    returns the function that puts the original parameters back. Under autocast to `dtype` the
    layers compute exactly what they computed before (autocast casts them so at every call), without
    the casts: for a frozen base that is every step's largest copies."""
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and param.dtype == torch.float32 and not (frozen_only and param.requires_grad):
                saved.append((module, name, param))
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))

    def restore() -> None:
        for module, name, param in saved:
            setattr(module, name, param)

    return restore


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


# ---- models -----------------------------------------------------------------------------------
def is_seq2seq(config: dict) -> bool:
    return bool(config.get("is_encoder_decoder"))


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"base folder {base_dir} has no usable tokenizer ({str(exc).splitlines()[0]}); "
                                "save one there with tokenizer.save_pretrained") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InvalidInputError(f"the tokenizer in {base_dir} has no end-of-text token")
    return tokenizer


def supports_logits_window(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def build_model(base_dir: Path, config: dict, options: TrainOptions, init_dir: Path | None):
    """The model to train: base (+ the line's adapter to continue from, or a fresh LoRA), or
    the line's full weights. Returns (model, trainable LoRA config or None)."""
    from kifmerge.export import model_class_for, quiet_transformers

    quiet_transformers()
    source = init_dir if (init_dir is not None and options.mode == "full") else base_dir
    model = model_class_for(config).from_pretrained(source, dtype=torch.float32)
    if options.mode == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_dir is not None:
        return PeftModel.from_pretrained(model, init_dir, is_trainable=True)
    targets = list(options.target_modules) if options.target_modules else DEFAULT_TARGETS.get(config.get("model_type"))
    lora = LoraConfig(r=options.rank, lora_alpha=options.lora_alpha or 2 * options.rank,
                      lora_dropout=options.lora_dropout, target_modules=targets,
                      task_type="SEQ_2_SEQ_LM" if is_seq2seq(config) else "CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise InvalidInputError(f"cannot apply LoRA to {config.get('model_type')}: {str(exc).splitlines()[0]}") from None


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


def run_training(base_dir: Path, config: dict, options: TrainOptions, init_dir: Path | None,
                 train: list[dict], val: list[dict], out_dir: Path,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None, description: str = "training",
                 checkpoints: Path | None = None, run_name: str | None = None) -> TrainResult | None:
    """Fine-tune with the Trainer while the importance callback scores every unit; save the
    checkpoint and its profile under `out_dir`. Under torchrun / accelerate only the main
    process saves (the others return None after the run). `checkpoints`: the resumable folder
    (kifmerge/resume.py) that the Trainer saves to every `save_steps` and, with `resume`,
    continues from."""
    from transformers import set_seed

    from kifmerge.checkpoints import open_checkpoint
    from kifmerge.importance import ImportanceAccumulator, ImportanceCallback
    from kifmerge.profiles import from_unit_scores, write_profile
    from kifmerge.resume import STATE_FILE, ImportanceCheckpoint, load_importance, prepare

    set_seed(options.seed)
    tokenizer = load_tokenizer(base_dir)
    seq2seq = is_seq2seq(config)
    model = build_model(base_dir, config, options, init_dir)
    encode = Encoder(tokenizer, seq2seq, options.max_length)
    if options.gradient_checkpointing and options.mode == "lora":
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks' inputs must carry grad
    accumulator = ImportanceAccumulator(model.named_parameters(), estimator=options.importance,
                                        beta1=options.beta1, beta2=options.beta2)
    train_set, val_set = [encode(r) for r in train], [encode(r) for r in val] or None
    collator = training_collator(model, tokenizer, seq2seq, options)
    checkpoints = checkpoints if options.save_steps else None
    start = prepare(checkpoints, options.resume) if checkpoints is not None else None
    if start is not None:
        load_importance(accumulator, start / STATE_FILE)
    trainer = KifTrainer(
        model=model, args=training_arguments(options, checkpoints or out_dir / "trainer", run_name,
                                                     options.save_steps if checkpoints is not None else 0),
        train_dataset=train_set, eval_dataset=val_set,
        data_collator=collator,
        callbacks=[ImportanceCallback(accumulator, grad_norm=lambda: trainer.take_grad_norm()),
                   ProgressBridge(progress, description)]
        + ([ImportanceCheckpoint(accumulator)] if checkpoints is not None else []), orth_reg=options.orth_reg,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout belongs to the command's result (--json)
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
    if val:
        metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 6)
    result = None
    if trainer.is_world_process_zero():
        checkpoint = out_dir / "checkpoint"
        trainer.model.save_pretrained(checkpoint, safe_serialization=True)
        fault_point("train.checkpoint-saved")
        layout = open_checkpoint(checkpoint).layout
        profile = out_dir / "profile.safetensors"
        elements = None
        if options.mode == "lora":  # element-level scores travel with the profile (the adapter's size, float16)
            shapes = {name: tuple(shape) for name, shape in open_checkpoint(checkpoint).tensors.shapes.items()}
            elements = {name: score for name, score in accumulator.lora_element_scores().items() if name in shapes}
            elements = elements if set(elements) == set(shapes) else None
        write_profile(profile, from_unit_scores(accumulator.unit_scores(options.mode), layout), layout,
                      {"estimator": options.importance, "steps": str(accumulator.steps)}, elements=elements)
        result = TrainResult(checkpoint, profile, metrics)
    return result


def wait_for_main_process() -> None:
    """Under torchrun / accelerate: the other ranks wait here until the main process has
    written its blobs and rows (it calls this after committing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
