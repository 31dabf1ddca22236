"""Option groups shared by several commands (training, fusion), generated from the option
models of kifmerge/options.py, where each option's default, bounds and help are written once:
each group becomes one dict, named as the model's fields, that the command passes to its service."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from kifmerge.cli.runtime import annotate
from kifmerge.fusion import methods
from kifmerge.options import FuseParams, TrainOptions, cli_fields, flag_of


def _float_list(text: str | None, count: int | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated numbers: exactly `count` of them, or any number (None)."""
    from kifmerge.errors import UsageError

    if text is None:
        return None
    how_many = f"{count} comma-separated numbers" if count else "comma-separated numbers"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes {how_many}, got {text!r}") from None
    if count is not None and len(values) != count:
        raise UsageError(f"{option} takes {count} comma-separated numbers, got {len(values)}")
    return values


def option_group(into: str, params: list[inspect.Parameter], convert: Callable[[dict], dict]) -> Callable:
    """A decorator adding `params` to a command's signature (Typer reads it); the command gets
    their values as one dict in its `into` argument, after `convert`."""
    names = [p.name for p in params]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **{into: convert({name: kwargs.pop(name) for name in names})}, **kwargs)

        signature = inspect.signature(fn)  # an inner option group's wrapper: annotations already resolved
        hints = typing.get_type_hints(fn, include_extras=True) if any(
            isinstance(p.annotation, str) for p in signature.parameters.values()) else {}  # resolved for Typer
        kept = [p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) else p
                for p in signature.parameters.values() if p.name != into]
        wrapper.__signature__ = signature.replace(parameters=kept + params)
        annotate(wrapper)
        del wrapper.__wrapped__
        return wrapper

    return decorate


def _shown(default: Any) -> str | bool:
    """A model default as the help shows it (False: none to show)."""
    if default is None or isinstance(default, bool):
        return False
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def _parts(annotation: Any) -> tuple[Any, tuple]:
    """The type inside an optional annotation, and its arguments (Literal values, tuple items)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation, typing.get_args(annotation)


def model_options(model: type, panel: str, *, after: dict[str, list[inspect.Parameter]] | None = None,
                  help_values: dict[str, str] | None = None) -> tuple[list[inspect.Parameter], Callable[[dict], dict]]:
    """The CLI options of `model`'s fields declared with `options.option`, in the model's order,
    and the converter from their values to keyword arguments the model takes (its field names, or
    the alias a renamed flag stands for: `--merge-seed` → `merge_seed`, FuseParams' `seed`). Every option but a
    flag defaults to None ("the model's default"), and its help shows the model's default.
    Tuple fields are comma-separated on the command line. `after`: extra options placed after a
    field's; `help_values`: text put in for `{name}` in the help."""
    params, fields = [], {}
    for name, field in cli_fields(model).items():
        extra, (kind, args) = field.json_schema_extra, _parts(field.annotation)
        flag, help = flag_of(model, name), extra["help"]
        for key, value in (help_values or {}).items():
            help = help.replace("{" + key + "}", value)
        if kind is bool and field.default is None:  # a tri-state flag: --gram / --no-gram / the model's choice
            cli_kind, default = Optional[bool], None
            declared = f"{flag}/--no-{flag.lstrip('-')}"
            help += f" Default: {extra['shown']}." if extra.get("shown") else ""
        elif kind is bool:
            cli_kind, default, declared = bool, False, flag
        else:
            cli_kind = {int: Optional[int], float: Optional[float]}.get(kind, Optional[str])
            default, shown, declared = None, extra.get("shown") or _shown(field.default), flag
            help += f" Default: {shown}." if shown else ""
        parameter = flag.lstrip("-").replace("-", "_")
        key = parameter if "flag" in extra else name  # a renamed flag passes its alias: merge_seed for seed
        fields[parameter] = key, flag, (kind, args)
        params.append(inspect.Parameter(parameter, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[
            cli_kind, typer.Option(declared, help=help, rich_help_panel=panel)]))
        params.extend((after or {}).get(name, []))

    def convert(values: dict) -> dict:
        out = {}
        for parameter, value in values.items():
            if parameter not in fields:  # an extra option: passed on as it is
                out[parameter] = value
                continue
            key, flag, (kind, args) = fields[parameter]
            if typing.get_origin(kind) is tuple and value is not None:
                if args and args[0] is str:
                    value = tuple(part.strip() for part in value.split(",") if part.strip())
                else:
                    value = _float_list(value, None if Ellipsis in args else len(args), flag)
            out[key] = value
        return out

    return params, convert


def _group(into: str, model: type, panel: str, **kwargs: Any) -> Callable:
    params, convert = model_options(model, panel, **kwargs)
    return option_group(into, params, convert)


with_train_options = _group("train_options", TrainOptions, "Training", after={"bf16": [inspect.Parameter(
    "bf16_force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--bf16-force", help="Use bf16 even where it is not native (measured 34× slower than float32 on an AVX2 CPU).",
        rich_help_panel="Training")])]})

with_fuse_options = _group("fuse_options", FuseParams, "Fusion", help_values={"methods": methods.help_text()})
