"""Models and tokenizers: the one place that loads them, for training, evaluation, export,
calibration and validation scoring alike, and what a model's forward accepts."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from kifmerge.errors import InvalidInputError
from kifmerge.options import TrainOptions

DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "gpt2": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"]}


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
    vocabulary = embeddings.weight.shape[0]  # not `num_embeddings`: peft's LoRA wrapper of an adapted embedding lacks it
    first, second = (torch.randint(0, vocabulary, (1, n), generator=generator).to(device) for n in (7, 5))
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


def model_class_for(config: dict):
    """The transformers class named in the config (`architectures[0]`), else the Auto class."""
    import transformers

    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if config.get("is_encoder_decoder"):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def load_model(base_dir: Path, config: dict, *, weights_dir: Path | None = None, adapter_dir: Path | None = None,
               merge: bool = False, trainable: bool = False):
    """The one way kifmerge loads a model, in float32: the base (from `base_dir`), full weights
    (`weights_dir`: a folder with the base's config), or the base with a LoRA adapter
    (`adapter_dir`): merged into the base weights (`merge`: evaluation, export), or kept apart
    (scoring candidates, training with `trainable`)."""
    from kifmerge.export import quiet_transformers

    quiet_transformers()
    model = model_class_for(config).from_pretrained(weights_dir or base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    return model.merge_and_unload() if merge else model


def build_model(base_dir: Path, config: dict, options: TrainOptions, init_dir: Path | None):
    """The model to train: base (+ the line's adapter to continue from, or a fresh LoRA), or
    the line's full weights."""
    if options.mode == "full":
        model = load_model(base_dir, config, weights_dir=init_dir)
        model.requires_grad_(True)
        return model
    if init_dir is not None:
        return load_model(base_dir, config, adapter_dir=init_dir, trainable=True)
    from peft import LoraConfig, get_peft_model

    targets = list(options.target_modules) if options.target_modules else DEFAULT_TARGETS.get(config.get("model_type"))
    lora = LoraConfig(r=options.rank, lora_alpha=options.lora_alpha or 2 * options.rank,
                      lora_dropout=options.lora_dropout, target_modules=targets,
                      task_type="SEQ_2_SEQ_LM" if is_seq2seq(config) else "CAUSAL_LM")
    try:
        model = get_peft_model(load_model(base_dir, config), lora)
    except ValueError as exc:
        raise InvalidInputError(f"cannot apply LoRA to {config.get('model_type')}: {str(exc).splitlines()[0]}") from None
    embedded = [name for name, module in model.named_modules() if len(getattr(module, "lora_embedding_A", ()))]
    if embedded:  # found before training, not when the saved adapter is refused after it
        raise InvalidInputError(f"--target-modules: {embedded[0].rsplit('.', 1)[-1]} is an embedding layer; LoRA on "
                                "embeddings is not supported (peft saves the whole embedding matrix with such an adapter)")
    return model
