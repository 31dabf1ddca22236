"""Validated option sets (pydantic v2, `extra="forbid"`). Light: no torch import, so the CLI
can validate before loading any model."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kifmerge import limits
from kifmerge.errors import UsageError


SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]B)$", re.IGNORECASE)
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub counts


class FuseParams(BaseModel):
    """Fusion parameters (DESIGN.md defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = Field("kif", description="a fusion method of the registry (kifmerge/fusion/methods.py)")
    top: float = Field(0.2, gt=0.0, le=1.0, description="fraction of units counted important")
    tau: float = Field(0.25, gt=0.0, description="softmax temperature of kif-adaptive")
    scores: Literal["minmax", "rank"] = Field("minmax", description="kif-adaptive: compare min–max normalised scores or their ranks")
    weights: tuple[float, float, float] = (0.3, 0.7, 0.5)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the new task (linear and the baselines)")
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of task-vector entries kept (ties, dare)")
    lam: float = Field(1.0, gt=0.0, description="scale of the merged task vector (baselines)")
    seed: int = Field(0, description="seed of DARE's random drops")
    non_diagonal: float = Field(0.9, ge=0.0, le=1.0, description="regmean: scale of the Gram matrices' off-diagonal entries")
    power: float = Field(0.5, ge=0.0, le=8.0, description="kif-element: exponent on the element scores (0: plain 0.5 average)")
    grid: tuple[float, ...] = Field((0.3, 0.5, 0.7), min_length=1, max_length=21,
                                    description="validated: the α values tried, each scored on validation examples")
    val_examples: int = Field(100, ge=1, le=100_000, description="validation examples scored per task (validated, --max-regression)")
    shard_size: str = Field("5GB", description="largest output shard, as the hub writes it: 5GB, 500MB, 200KB")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="output dtype (default: the task's)")
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
    mode: Literal["lora", "full"] = "lora"
    lora_r: int | None = Field(None, ge=1, le=65536, description="default 8; a line's later tasks keep its rank")
    lora_alpha: int | None = Field(None, ge=1, le=2**31 - 1, description="default: 2·r")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] | None = None
    epochs: float = Field(1.0, gt=0.0, le=limits.MAX_EPOCHS)
    max_steps: int | None = Field(None, ge=1, le=limits.MAX_STEPS)
    lr: float | None = Field(None, gt=0.0, le=1e3, description="default: 3e-4 for LoRA, 2e-5 for full")
    batch_size: int = Field(8, ge=1, le=65536)
    grad_accum: int = Field(1, ge=1, le=65536)
    max_length: int = Field(256, ge=8, le=2**20)
    seed: int = Field(42, ge=0, le=limits.MAX_SEED)
    max_examples: int | None = Field(None, ge=1, le=limits.MAX_EXAMPLES)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    importance: Literal["first", "mixed", "change"] = "first"
    beta1: float = Field(0.85, ge=0.0, lt=1.0)
    beta2: float = Field(0.85, ge=0.0, lt=1.0)
    orth_reg: float = Field(0.0, ge=0.0, le=1e6)
    replay: float = Field(0.0, ge=0.0, lt=1.0)
    gram: bool = Field(False, description="record each LoRA module's input Gram matrix XᵀX with the profile (for regmean)")
    warmup_steps: int = Field(0, ge=0, le=limits.MAX_STEPS, description="linear learning-rate warmup before the linear decay")
    bf16: bool = Field(False, description="bfloat16 autocast (CPUs with avx512_bf16, recent GPUs); weights stay float32")
    fp16: bool = Field(False, description="float16 autocast with loss scaling (CUDA GPUs only); weights stay float32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, ~30% slower")
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field("none", description="experiment tracker fed by the Trainer")
    save_steps: int = Field(50, ge=0, le=limits.MAX_STEPS, description="save a resumable checkpoint every N optimizer steps (0: never)")
    resume: bool = Field(False, description="continue from the newest checkpoint an interrupted run with the same inputs saved")

    @model_validator(mode="after")
    def _lora_only_options(self) -> "TrainOptions":
        if self.mode == "full" and (self.orth_reg or self.lora_r or self.lora_alpha or self.target_modules):
            raise ValueError("--orth-reg, --lora-r, --lora-alpha and --target-modules apply to --mode lora only")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other; choose one")
        return self

    @property
    def rank(self) -> int:
        return self.lora_r or 8

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.mode == "lora" else 2e-5)


def validated(model: type[BaseModel], what: str, values: dict[str, Any]) -> Any:
    """Build an option model; None means "use the default". Errors become one-line UsageErrors."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across options
            raise UsageError(f"invalid {what} options: {first['msg'].removeprefix('Value error, ')}") from None
        option = "--" + ".".join(map(str, first["loc"])).replace("_", "-")
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
