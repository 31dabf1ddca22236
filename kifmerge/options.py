"""Validated option sets (pydantic v2, `extra="forbid"`). Light: no torch import, so the CLI
can validate before loading any model."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kifmerge import limits
from kifmerge.errors import UsageError


SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]B)$", re.IGNORECASE)
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub counts


def option(default: Any = None, *, help: str, flag: str | None = None, shown: str | None = None,
           watch_only: bool = False, **constraints: Any) -> Any:
    """A field that is also a command-line option, declared once: its default and bounds (pydantic),
    `help` (the CLI's and docs/cli.md's text), `flag` where it is not the field's name with
    dashes, `shown`: the default as the help states it where the field's own is None because it
    is decided later (per mode, per line), and `watch_only` for an option that changes how a run
    is watched, saved or resumed, not what it trains. kifmerge/cli/options.py builds the CLI's
    option groups from these."""
    extra = {"help": help, **({"flag": flag} if flag else {}), **({"shown": shown} if shown else {}),
             **({"watch_only": True} if watch_only else {})}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def cli_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` declared with `option` (those the CLI offers), in declaration order."""
    return {name: field for name, field in model.model_fields.items()
            if isinstance(field.json_schema_extra, dict) and "help" in field.json_schema_extra}


def flag_of(model: type[BaseModel], name: str) -> str:
    extra = model.model_fields[name].json_schema_extra if name in model.model_fields else None
    return (extra or {}).get("flag") or "--" + name.replace("_", "-")


class FuseParams(BaseModel):
    """Fusion parameters (DESIGN.md defaults); each method reads those its registry entry names."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    method: str = option("regmean", help="A fusion method: {methods}. The default has the best mean AP over the "
                                              "benchmark's orders 4–6; where a task or the line has no Gram "
                                              "matrices it fuses by ties and says so (README: The fusion rules).")
    top: float = option(0.2, gt=0.0, le=1.0, help="Fraction of units counted important (kif).")
    tau: float = option(0.25, gt=0.0, help="Softmax temperature (kif-adaptive).")
    scores: Literal["minmax", "rank"] = option("minmax", help="kif-adaptive compares minmax-normalised scores or their ranks: minmax | rank.")
    weights: tuple[float, float, float] = option((0.3, 0.7, 0.5), help="NEW_BOTH,OLD_BOTH,NEW_NEITHER (kif).")
    alpha: float = option(0.5, ge=0.0, le=1.0, help="Weight of the new task (linear, task-vector methods; 1 = sequential).")
    density: float = option(0.5, gt=0.0, le=1.0, help="Task-vector entries kept (ties, dare).")
    lam: float = option(1.0, gt=0.0, help="Scale of the merged task vector (task-vector methods).")
    seed: int = option(0, ge=0, le=limits.MAX_MERGE_SEED, flag="--merge-seed", help="Seed of DARE's random drops.",
                       validation_alias=AliasChoices("seed", "merge_seed"))
    power: float = option(0.5, ge=0.0, le=8.0, help="Exponent on the element scores (kif-element; 0: a plain 0.5 average).")
    non_diagonal: float = option(0.9, ge=0.0, le=1.0, help="Scale of the Gram matrices' off-diagonal entries (regmean; 1: "
                                                           "exact least squares, 0: per-feature weights).")
    grid: tuple[float, ...] = option((0.3, 0.5, 0.7), min_length=1, max_length=21,
                                     help="α values tried by --method validated, each scored on the tasks' validation examples.")
    val_examples: int = option(100, ge=1, le=100_000, help="Validation examples scored per task (validated, --max-regression).")
    shard_size: str = option("5GB", help="Largest output shard, e.g. 5GB or 500MB.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(None, shown="the task's",
                                                                     help="Output dtype: float32 | float16 | bfloat16.")
    profile_weights: tuple[float, float] = (0.3, 0.7)

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not SIZE.match(value.strip()):
            raise ValueError("write a size like 5GB, 500MB or 200KB")
        return value.strip()

    @property
    def shard_bytes(self) -> int:
        number, unit = SIZE.match(self.shard_size).groups()
        return int(float(number) * SIZE_UNITS[unit.upper()])

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        from kifmerge.fusion.methods import METHODS, help_text

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}: choose {help_text()}")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= a <= 1.0 for a in value) or len(set(value)) != len(value):
            raise ValueError("give distinct α values in [0, 1], e.g. 0.3,0.5,0.7")
        return value

    @field_validator("weights", "profile_weights")
    @classmethod
    def _unit_interval(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= w <= 1.0 for w in value):
            raise ValueError("every weight must lie in [0, 1]")
        pair = value[:2]  # (NB, OB) of --weights, (new, old) of profile_weights: a mix, not an extrapolation
        if abs(sum(pair) - 1.0) > 1e-6:
            raise ValueError(f"the first two weights must sum to 1 (got {pair[0]:g} + {pair[1]:g}): "
                             "a fused unit lies between its old and new values")
        return value

    def recorded(self) -> dict[str, Any]:
        """Only the parameters the chosen method uses (and the output dtype when one was asked)."""
        chosen = self._method_parameters()
        return {**chosen, "dtype": self.dtype} if self.dtype else chosen

    def _method_parameters(self) -> dict[str, Any]:
        """The parameters the method's registry entry reads (kifmerge/fusion/methods.py), and the
        profile weights every fuse uses; tuples as lists (JSON)."""
        from kifmerge.fusion.methods import METHODS

        chosen = {name: getattr(self, name) for name in METHODS[self.method].parameters}
        chosen["profile_weights"] = self.profile_weights
        return {k: list(v) if isinstance(v, tuple) else v for k, v in chosen.items()}


class TrainOptions(BaseModel):
    """One short fine-tuning run and its importance estimation. Every number is finite and
    bounded (kifmerge/limits.py): a run that cannot work is refused before any model loads."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    mode: Literal["lora", "full"] = option("lora", help="lora (peft adapter) or full fine-tuning.")
    lora_r: int | None = option(None, ge=1, le=65536, shown="8; a line keeps its rank", help="LoRA rank.")
    lora_alpha: int | None = option(None, ge=1, le=2**31 - 1, shown="2·r", help="LoRA alpha.")
    lora_dropout: float = option(0.0, ge=0.0, lt=1.0, help="LoRA dropout.")
    target_modules: tuple[str, ...] | None = option(None, shown="per architecture", help="Comma-separated module names.")
    epochs: float = option(1.0, gt=0.0, le=limits.MAX_EPOCHS, help="Epochs over the data.")
    max_steps: int | None = option(None, ge=1, le=limits.MAX_STEPS, help="Optimizer steps (overrides --epochs).")
    lr: float | None = option(None, gt=0.0, le=1e3, shown="3e-4 LoRA, 2e-5 full", help="Learning rate.")
    batch_size: int = option(8, ge=1, le=65536, help="Examples per device per step.")
    grad_accum: int = option(1, ge=1, le=65536, help="Gradient accumulation steps.")
    max_length: int = option(256, ge=8, le=2**20, help="Max tokens per example.")
    seed: int = option(42, ge=0, le=limits.MAX_SEED, help="Random seed.")
    max_examples: int | None = option(None, ge=1, le=limits.MAX_EXAMPLES, help="Use only the first N records.")
    val_fraction: float = option(0.0, ge=0.0, lt=1.0, help="Hold out this fraction for a validation loss.")
    importance: Literal["first", "mixed", "change", "fisher"] = option(
        "first", help="Sensitivity estimator: first |θ·g| | mixed | change |(θ−θ_start)·g| | fisher g² (score: its EMA).")
    beta1: float = option(0.85, ge=0.0, lt=1.0, help="EMA factor of the sensitivity.")
    beta2: float = option(0.85, ge=0.0, lt=1.0, help="EMA factor of the uncertainty.")
    orth_reg: float = option(0.0, ge=0.0, le=1e6, help="LoRA orthogonality regulariser λ (0: off).")
    replay: float = option(0.0, ge=0.0, lt=1.0, help="Fraction of examples replayed from the line's earlier tasks.")
    recurrent: int = option(0, ge=0, le=limits.MAX_STEPS,
                            help="Recurrent-KIF: every N training steps, --outer-steps steps on the replay buffer (--replay), "
                                 "then fuse both updates element by element (0: off; LoRA only).")
    outer_steps: int = option(4, ge=1, le=limits.MAX_STEPS,
                              help="Recurrent-KIF's outer steps on the replay buffer per cycle (with --recurrent).")
    warmup_steps: int = option(0, ge=0, le=limits.MAX_STEPS, help="Linear learning-rate warmup steps before the linear decay.")
    gram: bool | None = option(None, shown="on for LoRA", help="Record each LoRA module's input Gram matrix XᵀX with the profile (the default fuse "
                                    "rule, regmean, reads them; stored as in²/2 floats per distinct module input, held as "
                                    "in² float32 per module on the training device).")
    bf16: bool = option(False, help="bfloat16 autocast for the forward/backward (weights and importance stay float32). On a "
                                    "CPU without native bf16 (no avx512_bf16/amx_bf16) it falls back to float32 with a warning.")
    fp16: bool = option(False, help="float16 autocast with loss scaling (CUDA GPUs only; excludes --bf16).")
    gradient_checkpointing: bool = option(False, watch_only=True,
                                          help="Recompute activations in the backward pass: less memory, slower steps.")
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = option(
        "none", watch_only=True, help="Experiment tracker fed by the Trainer: tensorboard | mlflow | wandb | none (tensorboard "
                                      "writes to $TENSORBOARD_LOGGING_DIR, else runs/TASK).")
    save_steps: int = option(50, ge=0, le=limits.MAX_STEPS, watch_only=True,
                             help="Save a resumable checkpoint in the registry's staging area every N steps (0: never); "
                                  "removed once the task is committed.")
    resume: bool = option(False, watch_only=True,
                          help="Continue an interrupted run with the same task, start, data and options from its last "
                               "saved step (none saved: train from the start, with a note).")

    @classmethod
    def watch_only(cls) -> frozenset[str]:
        """The options that change how a run is watched, saved or resumed, not what it trains:
        left out when matching a run with an earlier one (resume, learn's re-run)."""
        return frozenset(name for name, field in cli_fields(cls).items() if field.json_schema_extra.get("watch_only"))

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("name at least one module, e.g. q_proj,v_proj (leave the option out for the architecture's)")
        return value

    @model_validator(mode="after")
    def _lora_only_options(self) -> "TrainOptions":
        if self.mode == "full" and (self.orth_reg or self.lora_r or self.lora_alpha or self.target_modules):
            raise ValueError("--orth-reg, --lora-r, --lora-alpha and --target-modules apply to --mode lora only")
        if self.mode == "full" and self.gram:  # None (the default) means: on for LoRA, off for full
            raise ValueError("--gram applies to --mode lora only: RegMean merges LoRA lines")
        if self.recurrent and self.mode != "lora":
            raise ValueError("--recurrent applies to --mode lora only: it fuses the LoRA factors element by element")
        if self.recurrent and not self.replay:
            raise ValueError("--recurrent needs --replay F: its outer loop trains on the line's earlier tasks")
        if "outer_steps" in self.model_fields_set and not self.recurrent:
            raise ValueError("--outer-steps applies to --recurrent N only")
        if self.recurrent and self.max_steps and self.recurrent > self.max_steps:
            raise ValueError(f"--recurrent {self.recurrent} exceeds --max-steps {self.max_steps}: no cycle would run")
        if self.recurrent and self.fp16:
            raise ValueError("--recurrent does not support --fp16 (its outer steps have no loss scaling); use --bf16")
        if self.recurrent and self.resume:
            raise ValueError("a --recurrent run cannot be resumed: its cycle state (θ_t, the outer optimizer, both "
                             "importance averages) is not checkpointed; run it again without --resume")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other; choose one")
        return self

    @property
    def records_grams(self) -> bool:
        """--gram: as given, else on for LoRA (the default fuse rule, regmean, reads the Gram matrices)."""
        return grams_recorded({"mode": self.mode, "gram": self.gram})

    @property
    def rank(self) -> int:
        return self.lora_r or 8

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.mode == "lora" else 2e-5)


def grams_recorded(config: dict[str, Any]) -> bool:
    """Whether training (or calibration) options, as given or as a task's stored config, record Gram
    matrices: on for LoRA unless `gram` is False; a config stored before the field existed or before
    2026-12-06 (`gram` absent or False) recorded none."""
    return config.get("mode", "lora") == "lora" and config.get("gram", False) is not False


def validated(model: type[BaseModel], what: str, values: dict[str, Any]) -> Any:
    """Build an option model; None means "use the default". Errors become one-line UsageErrors."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across options
            raise UsageError(f"invalid {what} options: {first['msg'].removeprefix('Value error, ')}") from None
        option = flag_of(model, str(first["loc"][0])) + "".join(f".{part}" for part in first["loc"][1:])
        raise UsageError(f"invalid {what} option {option}: {first['msg'].removeprefix('Value error, ')}") from None


def training_options(options: dict[str, Any] | None, what: str = "train") -> "TrainOptions":
    """Validated training options as they will run: `bf16` only where this machine runs it
    natively, unless `bf16_force` (not an option of the run itself, so not recorded)."""
    values = dict(options or {})
    force = bool(values.pop("bf16_force", False))
    opts = validated(TrainOptions, what, values)
    if opts.bf16:
        from kifmerge.precision import resolve_bf16

        if not resolve_bf16(True, force, what="training"):
            opts = opts.model_copy(update={"bf16": False})
    return opts
