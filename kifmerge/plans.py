"""Plan files: a line and the sequence of steps that teaches it, for pipelines.

A plan is YAML or TOML, validated by the pydantic models below (unknown keys are errors, so
a typo never silently falls back to a default). Relative paths are relative to the plan file.

    line: support
    base: {name: smollm2, path: ~/.cache/kifmerge/models/smollm2-135m-instruct}
    train: {max_steps: 20, lora_r: 8}        # defaults of every learn step (TrainOptions)
    fuse: {method: kif}                      # defaults of every learn/fuse step (FuseParams)
    eval: {max_examples: 40}                 # defaults of every eval step
    steps:
      - learn: {task: agnews, data: train/agnews.json}
      - add-task: {task: outside, checkpoint: ckpt/, profile: outside.safetensors}
      - fuse: {task: outside, fuse: {method: ties}}
      - eval: {ref: support, data: {agnews: dev/agnews.json}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kifmerge.checkpoints import read_text
from kifmerge.errors import InvalidInputError
from kifmerge.hub import looks_like_hub_id
from kifmerge.limits import MAX_NESTING, MAX_PLAN_BYTES, MAX_PLAN_STEPS, MAX_PLAN_VALUES, nesting_depth
from kifmerge.options import FuseParams, TrainOptions

PLAN_FORMAT_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EvalSettings(Strict):
    max_examples: int | None = Field(100, ge=1, le=10**9)
    max_new_tokens: int = Field(8, ge=1, le=65536)
    max_length: int = Field(256, ge=8, le=2**20)
    batch_size: int = Field(16, ge=1, le=65536)


class BaseSpec(Strict):
    name: str
    path: str | None = Field(None, description="model folder (or hub id); registered when the registry lacks the base")
    copy_files: bool = Field(False, alias="copy")


class LearnStep(Strict):
    task: str
    data: Path
    train: dict[str, Any] = Field(default_factory=dict)
    fuse: dict[str, Any] = Field(default_factory=dict)


class AddTaskStep(Strict):
    task: str
    checkpoint: Path
    profile: Path | None = None
    calibrate: Path | None = None
    calibrate_batches: int = Field(8, ge=1, le=100_000)
    gram: bool | None = None  # with calibrate: record the Gram matrices (regmean); None: on for a LoRA adapter

    @model_validator(mode="after")
    def _one_profile_source(self) -> "AddTaskStep":
        if self.profile and self.calibrate:
            raise ValueError("give profile or calibrate, not both")
        if self.gram and not self.calibrate:
            raise ValueError("gram needs calibrate: the Gram matrices are the checkpoint's inputs on that data")
        return self


class FuseStep(Strict):
    task: str
    fuse: dict[str, Any] = Field(default_factory=dict)


class EvalStep(Strict):
    ref: str | None = Field(None, description="LINE@vN; default: the line's newest version")
    data: dict[str, Path]
    eval: dict[str, Any] = Field(default_factory=dict)


STEP_KINDS = {"learn": LearnStep, "add-task": AddTaskStep, "fuse": FuseStep, "eval": EvalStep}


class Step(Strict):
    learn: LearnStep | None = None
    add_task: AddTaskStep | None = Field(None, alias="add-task")
    fuse: FuseStep | None = None
    eval: EvalStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Step":
        if sum(value is not None for value in (self.learn, self.add_task, self.fuse, self.eval)) != 1:
            raise ValueError(f"a step is exactly one of {', '.join(STEP_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in STEP_KINDS if getattr(self, kind.replace("-", "_")) is not None)

    @property
    def body(self) -> LearnStep | AddTaskStep | FuseStep | EvalStep:
        return getattr(self, self.kind.replace("-", "_"))


class Plan(Strict):
    version: int = PLAN_FORMAT_VERSION
    line: str
    base: BaseSpec | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    fuse: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    steps: list[Step] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != PLAN_FORMAT_VERSION:
            raise ValueError(f"this kifmerge reads plan version {PLAN_FORMAT_VERSION}")
        return value

    def train_options(self, step: LearnStep) -> TrainOptions:
        return TrainOptions(**{**self.train, **step.train})

    def fuse_params(self, step: LearnStep | FuseStep) -> FuseParams:
        return FuseParams(**{**self.fuse, **step.fuse})

    def eval_settings(self, step: EvalStep) -> EvalSettings:
        return EvalSettings(**{**self.eval.model_dump(), **step.eval})


def load_plan(path: str | Path) -> tuple[Plan, Path]:
    """Parse and validate a plan; returns it with relative paths made absolute, and its folder.
    Any problem is one line naming the file and the key (`steps[2].learn.data`)."""
    path = Path(path)
    raw = _parse(path, read_text(path, "plan file", MAX_PLAN_BYTES))
    if nesting_depth(raw) > MAX_NESTING:
        raise InvalidInputError(f"{path}: nested more than {MAX_NESTING} levels deep or holding more than "
                                f"{MAX_PLAN_VALUES:,} values (YAML aliases expanded), kifmerge's limits (README: Limits)")
    if isinstance(raw, dict) and "registry" in raw:
        raise InvalidInputError(f"{path}: registry: a plan cannot choose the registry; give --registry PATH or "
                                "$KIFMERGE_REGISTRY to `kifmerge run`")
    if isinstance(raw, dict) and isinstance(raw.get("steps"), list) and len(raw["steps"]) > MAX_PLAN_STEPS:
        raise InvalidInputError(f"{path}: {len(raw['steps'])} steps; kifmerge's limit is {MAX_PLAN_STEPS} per plan "
                                "(README: Limits): split it into several plans")
    try:
        plan = Plan.model_validate(raw)
        for number, step in enumerate(plan.steps):  # nested option dicts: validated against their models
            body = step.body
            try:
                if isinstance(body, LearnStep):
                    plan.train_options(body)
                if isinstance(body, (LearnStep, FuseStep)):
                    plan.fuse_params(body)
                if isinstance(body, EvalStep):
                    plan.eval_settings(body)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(map(str, error["loc"]))
                raise InvalidInputError(f"{path}: steps[{number}].{step.kind}: option {where or '(combination)'}: "
                                        f"{error['msg'].removeprefix('Value error, ')}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        raise InvalidInputError(f"{path}: {where or 'plan'}: {message}") from None
    folder = path.resolve().parent
    for step in plan.steps:
        body = step.body
        for field in ("data", "checkpoint", "profile", "calibrate"):
            value = getattr(body, field, None)
            if isinstance(value, Path):
                setattr(body, field, _absolute(folder, value))
        if isinstance(body, EvalStep):
            body.data = {label: _absolute(folder, file) for label, file in body.data.items()}
    if plan.base and plan.base.path and not looks_like_hub_id(plan.base.path):
        plan.base.path = str(_absolute(folder, Path(plan.base.path)))
    return plan, folder


def _absolute(folder: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else folder / value


def _parse(path: Path, text: str) -> Any:
    """The plan's value; a document nested past the parser's own recursion limit is refused as
    too deep (exit 4), like one past MAX_NESTING."""
    try:
        return _parse_text(path, text)
    except RecursionError:
        raise InvalidInputError(f"{path}: nested more than {MAX_NESTING} levels deep, kifmerge's limit (README: Limits)") from None


def _parse_text(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"{path} is not valid TOML ({exc})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)  # safe_load: no object construction from tags
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path} is not valid JSON ({exc})") from None
    raise InvalidInputError(f"{path}: a plan is a .yaml, .yml, .toml or .json file")
