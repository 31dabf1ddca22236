"""The command line: a thin Typer layer. Each command parses, calls one service in
`kifmerge.api`, and renders the result (rich table, or JSON with `--json`).

Errors print one line on stderr and exit with the error class's code (see `errors.py`);
`--debug` (or KIFMERGE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import re
import sqlite3
import sys
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from kifmerge.errors import KifError
from kifmerge.fusion import methods
from kifmerge.redact import redact

app = typer.Typer(
    name="kifmerge",
    help="Continual learning of language models by importance-guided merging (KIF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
base_app = typer.Typer(help="Register and inspect base models.", no_args_is_help=True)
app.add_typer(base_app, name="base")
profile_app = typer.Typer(help="Inspect importance profiles.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")

RegistryOpt = Annotated[Optional[Path], typer.Option("--registry", envvar="KIFMERGE_REGISTRY",
                                                     help="Registry folder (default: the nearest registry/ in this folder or its "
                                                          "parents, else ./registry).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.", envvar="KIFMERGE_DEBUG")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress on stderr (neither bars nor log records).")]
_PYTHON_SHOWWARNING = warnings.showwarning
QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("kifmerge_quiet", default=False)  # --quiet, while a command runs
LOG_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("kifmerge_log_progress", default=False)  # see model_command
ALLOW_PICKLE_HELP = ("Accept pickle *.bin weights: loaded with torch.load(weights_only=True), which runs no code, "
                     "and stored as safetensors")


@app.callback(help="Continual learning of language models by importance-guided merging (KIF).\n\n"
                   "--registry, --json, --debug and --quiet may come before the command or after it. Progress goes to "
                   "stderr: bars on a terminal; else, for train, learn, eval, fuse and run, a one-line record every ~10 s "
                   "(step, loss, elapsed, ETA).")
def global_options(
    registry: Annotated[Optional[Path], typer.Option("--registry", show_default=False,
                                                     help="Registry folder (default: $KIFMERGE_REGISTRY, else the nearest "
                                                          "registry/ in this folder or its parents, else ./registry).")] = None,
    json_out: JsonOpt = False, debug: DebugOpt = False, quiet: QuietOpt = False,
) -> None:
    """The options every command takes, accepted before the command too (see `handled`)."""
    from kifmerge.precision import PrecisionWarning

    warnings.showwarning = _show_warning
    warnings.filterwarnings("always", category=PrecisionWarning)  # every command says it, not only the first in a process


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """kifmerge's own warnings (a PrecisionWarning: --bf16 falling back) as one line on stderr,
    in --json mode too; anyone else's as Python shows them."""
    from kifmerge.precision import PrecisionWarning

    if issubclass(category, PrecisionWarning):
        print(f"kifmerge: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def _apply_global_options(ctx: typer.Context | None, kwargs: dict[str, Any], quiet: bool) -> bool:
    """Options given before the subcommand (`kifmerge --json list`) count as given after it; a
    `--registry` after the subcommand wins over one before it, which wins over the environment.
    Returns whether --quiet was given (before or after)."""
    top = ctx.find_root().params if ctx is not None and ctx.parent is not None else {}
    given_after = ctx is not None and getattr(ctx.get_parameter_source("registry"), "name", None) == "COMMANDLINE"
    if top.get("registry") is not None and "registry" in kwargs and not given_after:
        kwargs["registry"] = top["registry"]
    for name in ("json_out", "debug"):
        if name in kwargs:
            kwargs[name] = bool(kwargs[name] or top.get(name))
    return bool(quiet or top.get("quiet"))


def _signature_with(fn: Callable, extra: list[inspect.Parameter]) -> inspect.Signature:
    """`fn`'s signature, string annotations resolved (Typer reads them), plus `extra`."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    kept = [p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) else p
            for p in signature.parameters.values()]
    return signature.replace(parameters=kept + extra)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def handled(fn: Callable) -> Callable:
    """Turn KifError (and anything unexpected) into one line on stderr plus its exit code; adds
    `--quiet` to the command and merges the options given before the subcommand."""

    @functools.wraps(fn)
    def wrapper(*args: Any, kifmerge_context: typer.Context | None = None, quiet: bool = False, **kwargs: Any) -> Any:
        token = QUIET.set(_apply_global_options(kifmerge_context, kwargs, quiet))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            print("kifmerge: interrupted; nothing was recorded", file=sys.stderr)
            raise typer.Exit(130) from None
        except (OSError, sqlite3.Error) as exc:  # every one classified into a documented exit code
            if kwargs.get("debug"):
                raise
            storage = storage_error(exc)
            print(f"kifmerge: error: {_one_line(storage)}", file=sys.stderr)
            raise typer.Exit(storage.exit_code) from None
        except KifError as exc:
            if kwargs.get("debug"):
                raise
            print(f"kifmerge: error: {_one_line(exc)}", file=sys.stderr)
            if exc.details is not None and kwargs.get("json_out"):
                sys.stdout.write(redact(json.dumps(exc.details, indent=2, sort_keys=True, default=str)) + "\n")
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # a bug or an environment problem: still one line by default
            if kwargs.get("debug"):
                raise
            message = redact(str(exc).splitlines()[0]) if str(exc).strip() else ""
            print(f"kifmerge: unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            raise typer.Exit(1) from None
        finally:
            QUIET.reset(token)

    wrapper.__signature__ = _signature_with(fn, [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=QuietOpt),
        inspect.Parameter("kifmerge_context", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)])
    del wrapper.__wrapped__
    return wrapper


STORAGE_ERRNOS = {"ENOSPC": "the disk is full; free space and run it again",
                  "EDQUOT": "the disk quota is exhausted; free space and run it again",
                  "EFBIG": "the file is too large for the file system; free space or use another disk",
                  "EROFS": "the file system is read-only; use a writable registry (--registry)",
                  "EACCES": "permission denied; check the owner and mode of the registry and of the input files",
                  "EPERM": "operation not permitted; check the owner and mode of the registry and of the input files",
                  "ENOTDIR": "a part of the path is a file, not a folder; choose another path",
                  "EISDIR": "the path is a folder where a file is needed; choose another path",
                  "EEXIST": "the path exists already as something else; choose another path",
                  "ENAMETOOLONG": "the path or a name in it is too long for the file system; choose a shorter one",
                  "ELOOP": "the path has a loop of symbolic links; choose another path",
                  "EXDEV": "the path is on another file system than the registry; choose a path on the same disk",
                  "EIO": "the disk reported an I/O error; check the disk and run it again",
                  "EMFILE": "too many open files; raise the limit (ulimit -n) and run it again",
                  "ENFILE": "too many open files in the system; run it again later",
                  "EPIPE": "the output was closed before kifmerge finished writing it (a pipe into `head`?)"}
# anything else the file system refuses (EINVAL, EOPNOTSUPP: /proc and other special file systems, …)
UNSUPPORTED = "the file system does not support this there (a special file system such as /proc?); choose another path"


def storage_error(exc: OSError | sqlite3.Error):
    """The documented error for an OSError or a SQLite error, always one of kifmerge's: a missing
    file is exit 3, a damaged catalog exit 5, a locked one exit 6, whatever the file system refuses
    (full, read-only, forbidden, not a folder, name too long, unsupported) exit 7."""
    import errno

    from kifmerge.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, RemoteError, StorageError

    if isinstance(exc, sqlite3.Error):  # SQLite reports these in words, not errno
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, sqlite3.IntegrityError):
            return ConflictError(f"the catalog refused the change ({text}); run the command again")
        if "locked" in text or "busy" in text:
            return ConflictError(f"the catalog is locked by another kifmerge process ({text}); run the command again")
        if "disk is full" in text:
            return StorageError(f"cannot write the catalog ({text}): {STORAGE_ERRNOS['ENOSPC']}; nothing was recorded")
        if "readonly" in text or "read-only" in text:
            return StorageError(f"cannot write the catalog ({text}): {STORAGE_ERRNOS['EROFS']}; nothing was recorded")
        if "unable to open" in text or "disk I/O" in text or "authoriz" in text:
            return StorageError(f"cannot open the catalog ({text}): the registry folder and its kifmerge.db must be "
                                "readable and writable; check them and run it again; nothing was recorded")
        return IntegrityError(f"the catalog is damaged or not a kifmerge catalog ({text}); restore the registry from a copy")
    where = f" ({exc.filename})" if exc.filename else ""
    if isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, BrokenPipeError):  # a pipe is local
        return RemoteError(f"a connection failed{where}: {exc.strerror or exc}; run the command again once it works")
    if exc.errno is None:  # a library's OSError without errno: a file it could not use (transformers, say)
        return InvalidInputError(" ".join(str(exc).split()) or type(exc).__name__)
    name = errno.errorcode.get(exc.errno, "")
    if name == "ENOENT":
        return NotFoundError(f"not found{where}: {exc.strerror}; check the path; nothing was recorded")
    advice = STORAGE_ERRNOS.get(name) or f"{exc.strerror or name}: {UNSUPPORTED}"
    return StorageError(f"cannot write or read{where}: {advice}; nothing was recorded")


def _one_line(exc: BaseException) -> str:
    """An error's message as the one line kifmerge prints: credentials redacted, line breaks folded."""
    return redact(" ".join(str(exc).split("\n")))


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[..., None]] | None]:
    """Progress on stderr (stdout stays clean for --json), handed to services as
    `progress(description, total)` → `advance(n=1, *, loss=None)`: rich bars on a terminal,
    else one-line log records (`kifmerge.progress`); nothing with --quiet."""
    if QUIET.get():
        yield None
        return
    if not sys.stderr.isatty():
        if not LOG_PROGRESS.get():  # a quick command: its stderr stays for errors
            yield None
            return
        from kifmerge.progress import ProgressLog

        log = ProgressLog(sys.stderr)
        yield log
        log.finish()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[loss]}"), console=_stderr(), transient=True) as bars:
        def start(description: str, total: int) -> Callable[..., None]:
            task_id = bars.add_task(description, total=total, loss="")

            def advance(n: int = 1, *, loss: float | None = None) -> None:
                bars.update(task_id, advance=n, **({"loss": f"loss {loss:.4g}"} if loss is not None else {}))

            return advance

        yield start


def use_threads(threads: int | None) -> int:
    """torch's CPU threads: `threads`, else $OMP_NUM_THREADS, else the cores this process may
    run on. (On a busy machine, threads beyond the free cores wait at OpenMP barriers.)"""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def model_command(fn: Callable) -> Callable:
    """A command that runs a model for minutes (train, learn, eval, fuse, run): `--threads N`,
    and off a terminal its progress is logged on stderr (the quick commands show bars only)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        use_threads(threads)
        token = LOG_PROGRESS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            LOG_PROGRESS.reset(token)

    option = typer.Option("--threads", min=1, show_default=False, rich_help_panel="Resources",
                          help="CPU threads for torch (default: $OMP_NUM_THREADS, else the cores available). "
                               "On a busy machine use fewer: threads beyond the free cores stall at OpenMP barriers.")
    wrapper.__signature__ = _signature_with(fn, [inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                                   annotation=Annotated[Optional[int], option])])
    del wrapper.__wrapped__
    return wrapper


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    else:
        render(result)


# ---- human rendering: short summaries and tables, numbers rounded, never raw JSON ------------
HEX_ID = re.compile(r"^[0-9a-f]{40,64}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:\d\d|Z)?$")


def _brief(value: Any, sep: str = ", ") -> str:
    """One value for people: floats to 4 significant digits, hashes to 12 characters, times to
    the local minute, yes/no, lists joined, dicts as `k=v` (nested keys dotted, empty ones left out)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        if HEX_ID.match(value):
            return value[:12]
        if TIMESTAMP.match(value):
            from datetime import datetime

            return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
        return value
    if isinstance(value, dict):
        return " ".join(f"{key}={_brief(item, ',')}" for key, item in _flat(value)) or "—"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(item, (dict, list, tuple)) for item in value):
            return sep.join(_brief(item) for item in value) or "—"
        return f"{len(value)} entries"
    return str(value)


def _flat(mapping: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if value is None or (isinstance(value, (dict, list, tuple)) and not value):
            continue
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"
    from kifmerge.progress import clock

    return clock(value)


def _print_summary(head: str, rows: list[tuple[str, Any]], result: dict, known: set[str]) -> None:
    """A headline, then `label  value` lines (empty ones left out), then any other key of the
    result (what a newer service adds still shows, briefly)."""
    import textwrap

    from rich.console import Console
    from rich.text import Text

    rows = [(label, value) for label, value in rows if value not in (None, "", "—")]
    rows += [(key, _brief(value)) for key, value in result.items()
             if key not in known and value is not None and value is not False and value != {} and value != []]
    console = Console()
    console.print(Text(head, style="bold"))
    indent = 2 + max((len(label) for label, _ in rows), default=0) + 2
    for label, value in rows:
        lines = textwrap.wrap(str(value), max(console.width - indent, 20), break_on_hyphens=False) or [""]
        console.print(Text(f"  {label:<{indent - 4}}  " + ("\n" + " " * indent).join(lines)), soft_wrap=True)


VERSION_KEYS = {"type", "version", "line", "number", "parent", "task", "kind", "method", "params", "timings", "created",
                "aliases", "trained", "reused", "stale_start", "weights", "profile_blob", "evaluations"}


def render_version(result: dict) -> None:
    """fuse, learn, show LINE@vN."""
    method, params = result["method"], result.get("params") or {}
    if method == "initial":
        what = f"{result['task']}, the first version of {result['line']}"
    elif method == "rollback":
        what = f"rollback of {result['line']} to v{params.get('to')} (from {result['parent']})"
    else:
        what = f"{result['task']} fused into {result['line']} by {method} (from {result['parent']})"
    if result.get("reused"):
        what += "; already learned, nothing trained"
    timings = result.get("timings") or {}
    trained = result.get("trained")
    evaluations = result.get("evaluations") or {}
    _print_summary(f"{result['version']}: {what}", [
        ("params", _brief({k: v for k, v in params.items() if k != "to"}) if method not in ("initial", "rollback") else None),
        ("time", ", ".join(f"{k.removesuffix('_s')} {_seconds(v)}" for k, v in timings.items()) or None),
        ("trained", _training(trained.get("metrics"), trained.get("trained_from")) if trained else None),
        ("profile", _profile(trained.get("profile")) if trained else None),
        ("aliases", ", ".join(result.get("aliases") or []) or None),
        ("scores", "; ".join(f"{label} {_score_line(m)}" for label, m in evaluations.items()) or None),
        ("weights", _brief(result.get("weights"))),
        ("created", _brief(result.get("created"))),
    ], result, VERSION_KEYS)


def _training(metrics: dict | None, trained_from: str | None = None) -> str | None:
    if not metrics:
        return None
    examples = metrics.get("examples") or {}
    parts = [f"{metrics.get('steps')} steps", f"loss {_brief(metrics.get('train_loss'))}",
             f"{examples.get('train')} examples" + (f" (+{examples['val']} held out, loss {_brief(metrics.get('eval_loss'))})"
                                                     if examples.get("val") else ""),
             _seconds(metrics.get("runtime_s"))]
    return ", ".join(parts) + (f"; from {trained_from}" if trained_from else "")


def _profile(profile: dict | None) -> str | None:
    if not profile:
        return None
    layout = profile.get("layout") or profile
    return f"{layout.get('units')} {layout.get('unit') or profile.get('unit')} units in {layout.get('groups')} groups ({profile.get('estimator')})"


def _score_line(metrics: dict) -> str:
    def score(key: str) -> str:
        return "—" if metrics.get(key) is None else f"{metrics[key]:.3f}"

    return f"exact match {score('exact_match')}, ROUGE-L {score('rouge_l')} ({metrics.get('examples')} examples)"


TASK_KEYS = {"type", "name", "base", "kind", "trained_from", "data_fingerprint", "source", "created", "metrics", "profile",
             "weights", "adapter_config", "training_config", "fused_into", "validation"}
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "task_type")


def render_task(result: dict) -> None:
    """train, add-task, show TASK."""
    origin = f", trained from {result['trained_from']}" if result.get("trained_from") else ""
    adapter = result.get("adapter_config") or {}
    training = {k: v for k, v in (result.get("training_config") or {}).items() if k not in ("data", "lr")}
    _print_summary(f"task {result['name']}: {result['kind']} on base {result['base']}{origin}", [
        ("training", _training(result.get("metrics"))),
        ("profile", _profile(result.get("profile"))),
        ("source", result.get("source")),
        ("data", f"sha256 {_brief(result.get('data_fingerprint'))}" if result.get("data_fingerprint") else None),
        ("adapter", _brief({k: adapter[k] for k in ADAPTER_KEYS if adapter.get(k) not in (None, False)}) if adapter else None),
        ("options", _brief(training) if training else None),
        ("fused into", ", ".join(result.get("fused_into") or []) or None),
        ("validation", f"{result['validation']['records']} examples from {result['validation']['source']}"
                       if result.get("validation") else None),
        ("weights", _brief(result.get("weights"))),
        ("created", _brief(result.get("created"))),
    ], result, TASK_KEYS)


def render_line(result: dict) -> None:
    """show LINE."""
    _print_summary(f"line {result['name']}: {result['kind']} on base {result['base']}, head {result.get('head') or '(no versions)'}", [
        ("tasks", ", ".join(task for task in result.get("tasks") or [] if task) or None),  # a rollback fuses none
        ("aliases", _brief(result.get("aliases") or None)),
        ("created", _brief(result.get("created"))),
    ], result, {"type", "name", "base", "kind", "head", "tasks", "aliases", "created"})


def render_base(result: dict) -> None:
    """base add."""
    hub = f"{result['hub_id']}" + (f" @ {result['revision']}" if result.get("revision") else "") if result.get("hub_id") else None
    _print_summary(f"base {result['name']}: {result['architecture']} ({result.get('model_type')}) at {result['path']}", [
        ("hub", hub), ("copied", "yes: its files are kept in the registry" if result.get("copied") else "no"),
        ("fingerprint", _brief(result.get("fingerprint"))), ("created", _brief(result.get("created"))),
    ], result, {"name", "architecture", "model_type", "path", "hub_id", "revision", "copied", "fingerprint", "created"})


def render_export(result: dict) -> None:
    """export."""
    files = result.get("files") or []
    _print_summary(f"exported {result['version']} to {result['out']} ({result.get('kind')}, {len(files)} files)", [
        ("files", ", ".join(files) or None),
    ], result, {"version", "out", "kind", "files", "sha256"})


def render_mapping(result: dict) -> None:
    """A command's result for people, by its shape: a version (fuse, learn), a task (train,
    add-task), a line, a base, an export, or else `key  value` lines; values summarised by
    `_brief`, never raw JSON."""
    kind = result.get("type")
    if kind == "version" or (kind is None and {"version", "line", "method"} <= result.keys()):
        render_version(result)
    elif kind == "task" or (kind is None and {"name", "base", "trained_from"} <= result.keys()):
        render_task(result)
    elif kind == "line":
        render_line(result)
    elif {"architecture", "fingerprint", "path"} <= result.keys():
        render_base(result)
    elif {"version", "out", "files"} <= result.keys():
        render_export(result)
    else:
        _print_summary(str(kind or "result"), [], result, {"type"})


def render_table(rows: list[dict], columns: list[str], empty: str, title: str | None = None,
                 cell: Callable[[str, Any], str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not rows:
        console.print(Text(empty))
        return
    cells = [[cell(c, row.get(c)) if cell else _cell(row.get(c)) for c in columns] for row in rows]
    table = Table(title=title)
    for i, column in enumerate(columns):  # short columns kept whole, long ones wrapped
        short = all(len(line) <= 16 for values in cells for line in values[i].splitlines())
        table.add_column(column, no_wrap=short, overflow="fold")
    for values in cells:
        table.add_row(*map(Text, values))
    console.print(table)


def _cell(value: Any) -> str:
    return _brief(value)


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


# ---- option groups shared by several commands ------------------------------------------------
def _option(default: Any, *flags: str, help: str, kind: Any, panel: str) -> inspect.Parameter:
    name = flags[0].lstrip("-").replace("-", "_")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Option(*flags, help=help, rich_help_panel=panel)])


def option_group(into: str, params: list[inspect.Parameter], convert: Callable[[dict], dict]) -> Callable:
    """A decorator adding `params` to a command's signature (Typer reads it); the command gets
    their values as one dict in its `into` argument, after `convert`."""
    names = [p.name for p in params]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **{into: convert({name: kwargs.pop(name) for name in names})}, **kwargs)

        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations for Typer
        kept = [p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) else p
                for p in signature.parameters.values() if p.name != into]
        wrapper.__signature__ = signature.replace(parameters=kept + params)
        del wrapper.__wrapped__
        return wrapper

    return decorate


def _train(default: Any, *flags: str, help: str, kind: Any) -> inspect.Parameter:
    return _option(default, *flags, help=help, kind=kind, panel="Training")


def _fusion(default: Any, *flags: str, help: str, kind: Any) -> inspect.Parameter:
    return _option(default, *flags, help=help, kind=kind, panel="Fusion")


def _split_modules(options: dict) -> dict:
    if options["target_modules"]:
        options["target_modules"] = tuple(m.strip() for m in options["target_modules"].split(",") if m.strip())
    return options


with_train_options = option_group("train_options", [
    _train("lora", "--mode", help="lora (peft adapter) or full fine-tuning.", kind=str),
    _train(None, "--lora-r", help="LoRA rank (default: 8; a line keeps its rank).", kind=Optional[int]),
    _train(None, "--lora-alpha", help="LoRA alpha (default: 2·r).", kind=Optional[int]),
    _train(None, "--lora-dropout", help="LoRA dropout (default: 0).", kind=Optional[float]),
    _train(None, "--target-modules", help="Comma-separated module names (default: per architecture).", kind=Optional[str]),
    _train(None, "--epochs", help="Epochs over the data (default: 1).", kind=Optional[float]),
    _train(None, "--max-steps", help="Optimizer steps (overrides --epochs).", kind=Optional[int]),
    _train(None, "--lr", help="Learning rate (default: 3e-4 LoRA, 2e-5 full).", kind=Optional[float]),
    _train(None, "--batch-size", help="Examples per device per step (default: 8).", kind=Optional[int]),
    _train(None, "--grad-accum", help="Gradient accumulation steps (default: 1).", kind=Optional[int]),
    _train(None, "--max-length", help="Max tokens per example (default: 256).", kind=Optional[int]),
    _train(None, "--seed", help="Random seed (default: 42).", kind=Optional[int]),
    _train(None, "--max-examples", help="Use only the first N records.", kind=Optional[int]),
    _train(None, "--val-fraction", help="Hold out this fraction for a validation loss (default: 0).", kind=Optional[float]),
    _train(None, "--importance", help="Sensitivity estimator: first |θ·g| | mixed | change |(θ−θ_start)·g| (default: first).", kind=Optional[str]),
    _train(None, "--beta1", help="EMA factor of the sensitivity (default: 0.85).", kind=Optional[float]),
    _train(None, "--beta2", help="EMA factor of the uncertainty (default: 0.85).", kind=Optional[float]),
    _train(None, "--orth-reg", help="LoRA orthogonality regulariser λ (default: 0, off).", kind=Optional[float]),
    _train(None, "--replay", help="Fraction of examples replayed from the line's earlier tasks (default: 0).", kind=Optional[float]),
    _train(None, "--warmup-steps", help="Linear learning-rate warmup steps before the linear decay (default: 0).", kind=Optional[int]),
    _train(False, "--bf16", help="bfloat16 autocast for the forward/backward (weights and importance stay float32). On a "
                                 "CPU without native bf16 (no avx512_bf16/amx_bf16) it falls back to float32 with a warning.", kind=bool),
    _train(False, "--bf16-force", help="Use bf16 even where it is not native (measured 34× slower than float32 on an AVX2 CPU).",
           kind=bool),
    _train(False, "--fp16", help="float16 autocast with loss scaling (CUDA GPUs only; excludes --bf16).", kind=bool),
    _train(False, "--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, slower steps.", kind=bool),
    _train(None, "--report-to", help="Experiment tracker fed by the Trainer: tensorboard | mlflow | wandb | none (default: none; "
                                     "tensorboard writes to $TENSORBOARD_LOGGING_DIR, else runs/TASK).", kind=Optional[str]),
    _train(None, "--save-steps", help="Save a resumable checkpoint in the registry's staging area every N steps "
                                      "(default: 50; 0: never); removed once the task is committed.", kind=Optional[int]),
    _train(False, "--resume", help="Continue an interrupted run with the same task, start, data and options from its "
                                   "last saved step (none saved: train from the start, with a note).", kind=bool),
], _split_modules)

with_fuse_options = option_group("fuse_options", [
    _fusion("kif", "--method", help=f"A fusion method: {methods.help_text()}.", kind=str),
    _fusion(None, "--top", help="Fraction of units counted important (kif; default: 0.2).", kind=Optional[float]),
    _fusion(None, "--tau", help="Softmax temperature (kif-adaptive; default: 0.25).", kind=Optional[float]),
    _fusion(None, "--scores", help="kif-adaptive compares minmax-normalised scores or their ranks: minmax | rank (default: minmax).", kind=Optional[str]),
    _fusion(None, "--weights", help="NEW_BOTH,OLD_BOTH,NEW_NEITHER (kif; default: 0.3,0.7,0.5).", kind=Optional[str]),
    _fusion(None, "--alpha", help="Weight of the new task (linear, baselines; 1 = sequential; default: 0.5).", kind=Optional[float]),
    _fusion(None, "--density", help="Task-vector entries kept (ties, dare; default: 0.5).", kind=Optional[float]),
    _fusion(None, "--lam", help="Scale of the merged task vector (baselines; default: 1).", kind=Optional[float]),
    _fusion(None, "--merge-seed", help="Seed of DARE's random drops (default: 0).", kind=Optional[int]),
    _fusion(None, "--power", help="Exponent on the element scores (kif-element; 0: a plain 0.5 average; default: 0.5).",
            kind=Optional[float]),
    _fusion(None, "--grid", help="α values tried by --method validated, each scored on the tasks' validation examples "
                                 "(default: 0.3,0.5,0.7).", kind=Optional[str]),
    _fusion(None, "--val-examples", help="Validation examples scored per task (validated, --max-regression; default: 100).",
            kind=Optional[int]),
    _fusion(None, "--shard-size", help="Largest output shard, e.g. 5GB or 500MB (default: 5GB).", kind=Optional[str]),
    _fusion(None, "--dtype", help="Output dtype: float32 | float16 | bfloat16 (default: the task's).", kind=Optional[str]),
], lambda options: {**options, "weights": _float_list(options["weights"], 3, "--weights"),
                    "grid": _float_list(options["grid"], None, "--grid")})


# ---- commands -----------------------------------------------------------------------------
@app.command()
@handled
def init(
    force: Annotated[bool, typer.Option("--force", help="Make a registry of a folder that is not empty and is not one "
                                                      "(refused otherwise, exit 4); kifmerge never deletes files it did not write.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Create the registry (or upgrade its schema); safe to run twice. A folder that is not empty
    and is not a registry is refused unless --force."""
    from kifmerge import api

    result = api.init(registry, force=force)
    emit(result, json_out, lambda r: print(f"{'created' if r['created'] else 'ready'}: registry at {r['registry']}"))


@base_app.command("add")
@handled
def base_add(
    name: Annotated[str, typer.Argument(help="Name for the base model.")],
    model: Annotated[Path, typer.Argument(help="Local Hugging Face model folder (safetensors), or a hub id (org/name) "
                                               "resolved through the Hugging Face cache (HF_HUB_OFFLINE is honoured).")],
    copy: Annotated[bool, typer.Option("--copy", help="Also store the model's files in the registry.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP + " (implies --copy).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit (hub ids only; default: main).")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Register a base model: its path (and hub id + commit), architecture and a fingerprint of
    config + weight headers."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.add_base(name, model, copy=copy, allow_pickle=allow_pickle, revision=revision, registry=registry,
                              progress=progress)
    emit(result, json_out, render_mapping)


@profile_app.command("show")
@handled
def profile_show(
    ref: Annotated[str, typer.Argument(help="TASK, or LINE / LINE@vN / LINE@ALIAS for a line's accumulated profile.")],
    line: Annotated[bool, typer.Option("--line", help="Read REF as a line even when a task has that name.")] = False,
    top: Annotated[int, typer.Option("--top", help="How many of the most and of the least important units.")] = 10,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw a layer × module heatmap (needs matplotlib).")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The most and least important skill units of a task's profile, or of a line version's
    accumulated profile (a bare name is a task if one has that name, else the line's newest version)."""
    from kifmerge import api

    result = api.profile_show(ref, line=line, top=top, registry=registry)
    if png:
        from kifmerge.plots import draw_profile_heatmap

        result["png"] = str(draw_profile_heatmap(result, png))
    emit(result, json_out, render_profile)


def render_profile(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    subject = result.get("version") or f"task {result['task']}"
    console.print(f"{subject}: {result['units']} {result['unit']} units in {result['groups']} groups "
                  f"(scores normalised to [0, 1])")
    for title, rows in (("most important", result["top"]), ("least important", result["bottom"])):
        table = Table("unit", "score", "raw", title=title)
        for row in rows:
            table.add_row(row["unit"], f"{row['score']:.3f}", f"{row['raw']:.4g}")
        console.print(table)
    if result.get("png"):
        console.print(f"heatmap: {result['png']}")


@app.command("add-task")
@handled
def add_task(
    task: Annotated[str, typer.Argument(help="Name for the task.")],
    checkpoint: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder or full fine-tuned model folder.")],
    base: Annotated[str, typer.Option("--base", help="The registered base it was trained from.")],
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Importance profile (kifmerge-profile safetensors).")] = None,
    line: Annotated[Optional[str], typer.Option("--line", help="The line whose newest version it was trained from.")] = None,
    calibrate: Annotated[Optional[Path], typer.Option("--calibrate", help="Compute the profile from gradients on this data.")] = None,
    calibrate_batches: Annotated[int, typer.Option("--calibrate-batches", help="Batches of --calibrate data.")] = 8,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Calibration batch size (default: 8).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Calibration max tokens (default: 256).")] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="first | mixed (default: first).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP + ".")] = False,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation examples of the task, stored with it: for fuse "
                                                              "--method validated and --max-regression.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Register a checkpoint trained elsewhere, validated against its base, with its profile
    given (--profile) or computed from calibration data (--calibrate)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.add_task(task, checkpoint, base=base, profile=profile, line=line, calibrate=calibrate,
                              calibrate_batches=calibrate_batches,
                              calibrate_options={"batch_size": batch_size, "max_length": max_length, "importance": importance},
                              allow_pickle=allow_pickle, val=val, registry=registry, progress=progress)
    emit(result, json_out, render_mapping)




@app.command()
@handled
@model_command
@with_fuse_options
def fuse(
    task: Annotated[str, typer.Argument(help="A registered task with a profile.")],
    into: Annotated[str, typer.Option("--into", help="The line to fuse into (created when new).")],
    again: Annotated[bool, typer.Option("--again", help="Fuse TASK even when the line already holds it; without it "
                                                        "that is refused (exit 6), so a retried step cannot fuse twice.")] = False,
    max_regression: Annotated[Optional[float], typer.Option(
        "--max-regression", help="Quality gate: refuse the version (exit 6, nothing written) when a task the line holds "
                                 "would lose more than POINTS of exact match on its validation examples (--val) against "
                                 "the head.", metavar="POINTS")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False, fuse_options: dict = None,
) -> None:
    """Fuse TASK into LINE unit by unit → a new immutable version."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.fuse(task, into, **fuse_options, again=again, max_regression=max_regression, registry=registry,
                          progress=progress)
    stale = result.get("stale_start")
    if stale:  # on stderr, so with --json too
        how = ("merged with the head as two task vectors against the base; what the line learned since the task's "
               "start counts once, through the head" if methods.METHODS[result["method"]].family == methods.TASK_VECTOR else
               "blended unit by unit as usual; what the line learned since may be lost in the units it takes")
        print(f"kifmerge: warning: task {task!r} was trained from {stale['trained_from']}, not from the head "
              f"{stale['head']}; fused by {result['method']} ({how})", file=sys.stderr)
    emit(result, json_out, render_mapping)


@app.command()
@handled
def export(
    ref: Annotated[str, typer.Argument(help="LINE, LINE@vN or LINE@ALIAS.")],
    out: Annotated[Path, typer.Argument(help="New output folder.")],
    merged: Annotated[bool, typer.Option("--merged", help="Merge a LoRA line into the base: a full model folder.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Export a version as a folder peft / transformers load, with a model card."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.export(ref, out, merged=merged, registry=registry, progress=progress)
    emit(result, json_out, render_mapping)



@app.command()
@handled
@model_command
@with_train_options
def train(
    task: Annotated[str, typer.Argument(help="Name for the new task.")],
    data: Annotated[Path, typer.Option("--data", help="JSON list or JSONL of {input, output} or {messages} (chat template) records.")],
    line: Annotated[str, typer.Option("--line", help="Train from this line's newest version.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model, when the line does not exist yet.")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation examples of the task, stored with it (same formats "
                                                              "as --data): for fuse --method validated and --max-regression.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False, train_options: dict = None,
) -> None:
    """Fine-tune from LINE's newest version, record each unit's importance, register TASK."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.train(task, data, line, base=base, options=train_options, val=val, registry=registry, progress=progress)
    if result is not None:
        emit(result, json_out, render_mapping)


@app.command()
@handled
@model_command
@with_fuse_options
@with_train_options
def learn(
    task: Annotated[str, typer.Argument(help="Name for the new task.")],
    data: Annotated[Path, typer.Option("--data", help="JSON list or JSONL of {input, output} or {messages} (chat template) records.")],
    into: Annotated[str, typer.Option("--into", help="The line to train from and fuse into.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model, when the line does not exist yet.")] = None,
    rebase: Annotated[bool, typer.Option("--rebase", help="When the line gained a version while TASK trained, fuse it onto "
                                                          "the new head anyway (recorded, and warned about); without it "
                                                          "that fails with exit 6 and records nothing.")] = False,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation examples of the task, stored with it: for fuse "
                                                              "--method validated and --max-regression.")] = None,
    max_regression: Annotated[Optional[float], typer.Option(
        "--max-regression", help="Quality gate: refuse the version (exit 6; neither task nor version is recorded) when a "
                                 "task the line holds would lose more than POINTS of exact match on its validation "
                                 "examples against the head.", metavar="POINTS")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
    train_options: dict = None, fuse_options: dict = None,
) -> None:
    """Train TASK and fuse it into LINE in one step: one new version, or nothing on failure."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.learn(task, data, into, base=base, options=train_options, **fuse_options, rebase=rebase, val=val,
                           max_regression=max_regression, registry=registry, progress=progress)
    rebased = (result or {}).get("rebased")
    if rebased:  # on stderr, so with --json too
        print(f"kifmerge: warning: --rebase: line {into!r} moved to {rebased['head']} while task {task!r} trained from "
              f"{rebased['trained_from']}; fused onto {rebased['head']} by {result['method']}, so what the line learned "
              "since may be lost in the units the task takes", file=sys.stderr)
    if result is not None and result.get("reused") and not json_out:
        print(f"kifmerge: task {task!r} was already learned into {result['version']} from the same data and options; "
              "nothing was trained (reused)", file=sys.stderr)
    if result is not None:
        emit(result, json_out, render_mapping)


def _labelled_files(items: list[str]) -> dict[str, Path]:
    from kifmerge.errors import UsageError

    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"--data takes NAME=FILE, got {item!r}")
        out[label] = Path(path)
    return out


@app.command("eval")
@handled
@model_command
def eval_(
    ref: Annotated[str, typer.Argument(help="LINE, LINE@vN, LINE@ALIAS, LINE@v0 for the base model zero-shot, "
                                            "or task:NAME for the weights of task NAME as trained, before any fuse.")],
    data: Annotated[list[str], typer.Option("--data", help="NAME=FILE, once per task (JSON/JSONL of {input, output}).")],
    max_examples: Annotated[int, typer.Option("--max-examples", help="Evaluate the first N records of each file.")] = 100,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer generated.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Max prompt tokens (middle truncated).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together (batched by length).")] = 16,
    bf16: Annotated[bool, typer.Option("--bf16", help="Generate under bfloat16 autocast (stored as its own setting); on a CPU "
                                                      "without native bf16 it falls back to float32 with a warning.")] = False,
    bf16_force: Annotated[bool, typer.Option("--bf16-force", help="Use bf16 even where it is not native (much slower).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Evaluate again even when a stored result matches.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Generate answers greedily, score exact match (case-folded and cased) and ROUGE-L, store them on the version (or task)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.evaluate(ref, _labelled_files(data), max_examples=max_examples, max_new_tokens=max_new_tokens,
                              max_length=max_length, batch_size=batch_size, bf16=bf16, bf16_force=bf16_force, force=force,
                              registry=registry, progress=progress)
    emit(result, json_out, render_eval)


def render_eval(result: dict) -> None:
    rows = [{"task": label, "exact match": f"{m['exact_match']:.3f}", "cased": f"{m['exact_match_cased']:.3f}",
             "ROUGE-L": f"{m['rouge_l']:.3f}", "examples": m["examples"], "time": _seconds(m.get("seconds")),
             "stored": "reused" if m.get("reused") else "new"} for label, m in result["results"].items()]
    subject = result.get("version") or f"task {result.get('task')}"
    render_table(rows, ["task", "exact match", "cased", "ROUGE-L", "examples", "time", "stored"], "no data",
                 title=f"{subject}: {_brief(result.get('settings') or {})}")


@app.command()
@handled
def report(
    line: Annotated[str, typer.Argument(help="A line with evaluated versions.")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated task labels, in learning order.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="exact_match | exact_match_cased | rouge_l")] = "exact_match",
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw the matrix and forgetting curves (needs matplotlib).")] = None,
    examples: Annotated[bool, typer.Option("--examples", help="With --json: per-example scores of the final row, "
                                                                "the diagonal and learned (for paired bootstrap).")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The continual-learning matrix R[version][task] from stored evaluations; per task learned
    (`eval task:NAME`), fused (diagonal) and final scores, the majority class and the predicted
    answers; AP, BWT vs learned, BWT after fuse, fuse cost and FWT."""
    from kifmerge import api

    result = api.report(line, tasks=tasks.split(",") if tasks else None, metric=metric, examples=examples, registry=registry)
    if png:
        from kifmerge.plots import draw_report

        result["png"] = str(draw_report(result, png))
    emit(result, json_out, render_report)


REPORT_SUMMARIES = (("AP", "AP (mean final row)"), ("BWT_vs_learned", "BWT vs learned (final − learned)"),
                    ("BWT_after_fuse", "BWT after fuse (final − fused diagonal)"),
                    ("fuse_cost", "fuse cost (learned − fused diagonal)"), ("FWT", "FWT"))


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_report(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table("version", "fused", *result["tasks"], title=f"{result['line']}: {result['metric']} (points)")
    for version, fused, row in zip(result["versions"], result["fused"], result["matrix"], strict=True):
        table.add_row(version, fused or "(base)", *map(_points, row))
    console.print(table)
    tasks = Table("task", "learned", "fused (diagonal)", "final", "majority class", "top predictions",
                  title="per task (points; learned: `kifmerge eval task:NAME`)")
    for t in result["per_task"]:
        top = ", ".join(f"{escape(p['answer']) or '(empty)'} {_points(p['share'])}" for p in t["predictions"][:3])  # model text
        majority = "—" if t["majority_class"] is None else f"{_points(t['majority_class'])} ({escape(t['majority_answer'])})"
        tasks.add_row(t["task"], _points(t["learned"]), _points(t["diagonal"]), _points(t["final"]), majority, top)
    console.print(tasks)
    width = max(len(name) for _, name in REPORT_SUMMARIES)
    for key, name in REPORT_SUMMARIES:
        console.print(f"{name:<{width}}  {_points(result[key]):>6}", highlight=False)
    if result["order"] != "learning":
        console.print(f"column order {result['order']}", style="yellow")


@app.command()
@handled
def verify(
    deep: Annotated[bool, typer.Option("--deep", help="Re-hash every blob and check each profile against its weights' units.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Check every blob the registry references (exit 5 when any is missing, corrupt or inconsistent)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.verify(deep=deep, registry=registry, progress=progress)
    emit(result, json_out, render_verify)


def render_verify(result: dict) -> None:
    deep = f" (deep: every blob re-hashed, {result['profiles_checked']} profiles match their weights)" if result["deep"] else ""
    print(f"ok: {result['blobs_checked']} blobs verified{deep} in {result['registry']}")


@app.command()
@handled
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    grace: Annotated[float, typer.Option("--grace", help="Keep unreferenced files younger than this many seconds.")] = 3600.0,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Remove blobs no row references and leftovers of interrupted commands."""
    from kifmerge import api

    result = api.gc(dry_run=dry_run, grace_s=grace, registry=registry)
    emit(result, json_out, lambda r: print(f"{'would remove' if r['dry_run'] else 'removed'} {len(r['removed'])} "
                                          f"files, {r['bytes_freed']} bytes; {r['kept_blobs']} blobs in use"))


LIST_COLUMNS = {
    "tasks": ["name", "base", "kind", "profile", "trained_from", "created"],
    "lines": ["name", "base", "kind", "head", "tasks", "aliases", "created"],
    "versions": ["version", "task", "method", "parent", "aliases", "created"],
    "bases": ["name", "architecture", "hub_id", "path", "copied", "created"],
}


LIST_SECTIONS = ("bases", "lines", "tasks")
LIST_LIMIT = 100  # rows per list in the table by default: a table of 10 000 tasks takes seconds to draw and no one reads it


@app.command("list")
@handled
def list_(
    what: Annotated[Optional[str], typer.Argument(help="tasks | lines | versions | bases (default: bases, lines and tasks; "
                                                       "with --json an object with those three lists).",
                                                  show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, show_default=False,
                                                 help=f"At most N rows per list, the last ones (tasks: the newest); 0: all "
                                                      f"(default: {LIST_LIMIT} in the table, all with --json). A note on "
                                                      "stderr says when some were left out.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """List tasks, lines, versions or bases; without an argument, bases, lines and tasks."""
    from kifmerge import api

    if limit is None:
        limit = 0 if json_out else LIST_LIMIT
    if what is None:
        sections = {section: _last(api, section, limit, registry) for section in LIST_SECTIONS}
        emit(sections, json_out, render_sections)
        return
    rows = _last(api, what, limit, registry)
    emit(rows, json_out, lambda r: render_table(r, LIST_COLUMNS[what], f"no {what} yet"))


def _last(api, what: str, limit: int, registry: Path | None) -> list[dict]:
    """The last `limit` rows of a list (all when 0); one more is read to tell whether some are
    left out, which a note on stderr then says."""
    rows = api.list_items(what, limit=limit + 1 if limit else None, registry=registry)
    if not limit or len(rows) <= limit:
        return rows
    print(f"kifmerge: {what}: only the last {limit} shown; --limit 0 shows all", file=sys.stderr)
    return rows[1:]


def render_sections(sections: dict[str, list[dict]]) -> None:
    for section, rows in sections.items():
        render_table(rows, LIST_COLUMNS[section], f"{section}: none yet", title=section)


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(help="TASK, LINE, LINE@vN or LINE@ALIAS.")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Show one task, line or version."""
    from kifmerge import api

    emit(api.show(ref, registry=registry), json_out, render_mapping)


@app.command()
@handled
def history(
    line: Annotated[str, typer.Argument(help="A line.")],
    events: Annotated[bool, typer.Option("--events", help="The line's event log instead: fuses, rollbacks, alias moves, evals, exports.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The versions of a line, oldest first (with --events: its audit log)."""
    from kifmerge import api

    if events:
        rows = api.line_events(line, registry=registry)
        emit(rows, json_out, lambda r: render_table(r, ["ts", "action", "subject", "details"], "no events"))
        return
    rows = api.history(line, registry=registry)
    emit(rows, json_out, render_history)


def render_history(rows: list[dict]) -> None:
    """One row per version, its aliases under it; params as `k=v`, one a line (what the fuse
    computed, `units`, left to --json)."""
    def cell(column: str, value: Any) -> str:
        if column == "params" and isinstance(value, dict):
            return "\n".join(f"{k}={_brief(v, ',')}" for k, v in _flat({k: v for k, v in value.items() if k != "units"})) or "—"
        return _brief(value)

    rows = [{**row, "version": row["version"] + "".join(f"\n@{alias}" for alias in row.get("aliases") or [])} for row in rows]
    render_table(rows, ["version", "task", "method", "params", "created"], "no versions yet", cell=cell)


# ---- operating versions: aliases, rollback, diff ------------------------------------------------
alias_app = typer.Typer(help="Named pointers to versions (LINE@champion), usable wherever LINE@vN is.", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


@alias_app.command("set")
@handled
def alias_set(
    ref: Annotated[str, typer.Argument(help="The version: LINE, LINE@vN or LINE@ALIAS.")],
    name: Annotated[str, typer.Argument(help="Alias name, e.g. champion (not v<number>).")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Point LINE@NAME at a version (create or move it atomically; logged in `history --events`)."""
    from kifmerge import api

    result = api.alias_set(ref, name, registry=registry)
    moved = lambda r: f" (was {r['previous']})" if r["previous"] else " (new)"
    emit(result, json_out, lambda r: print(f"{r['alias']} → {r['version']}" + (moved(r) if r["changed"] else " (unchanged)")))


@alias_app.command("rm")
@handled
def alias_rm(
    ref: Annotated[str, typer.Argument(help="LINE@NAME.")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Remove an alias (its version is untouched)."""
    from kifmerge import api

    result = api.alias_rm(ref, registry=registry)
    emit(result, json_out, lambda r: print(f"removed {r['alias']} (pointed at {r['version']})"))


@alias_app.command("list")
@handled
def alias_list(
    line: Annotated[Optional[str], typer.Argument(help="Only this line's aliases.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """List aliases and the versions they point at."""
    from kifmerge import api

    rows = api.alias_list(line, registry=registry)
    emit(rows, json_out, lambda r: render_table(r, ["alias", "version", "updated"], "no aliases yet"))


mlflow_app = typer.Typer(help="Versions, lineage and metrics in an MLflow tracking server and model registry "
                              "(needs the mlflow extra of kifmerge).", no_args_is_help=True)
app.add_typer(mlflow_app, name="mlflow")
MlflowModelOpt = Annotated[str, typer.Option("--model", help="MLflow registered model: one per line, created on the first "
                                                             "push and tagged kifmerge.line; a model of anything else is refused.")]
TrackingUriOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_default=False,
    help="MLflow tracking server, e.g. http://mlflow:5000 (default: $MLFLOW_TRACKING_URI). Credentials: "
         "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, or $MLFLOW_TRACKING_TOKEN.")]
ExperimentOpt = Annotated[Optional[str], typer.Option(
    "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", show_default=False,
    help="MLflow experiment of the runs (default: $MLFLOW_EXPERIMENT_NAME, else kifmerge; created when missing).")]
MergedPushOpt = Annotated[bool, typer.Option("--merged", help="Push full models merged into the base instead of LoRA "
                                                              "adapters (a registered model holds one or the other).")]


@mlflow_app.command("push")
@handled
def mlflow_push(
    ref: Annotated[str, typer.Argument(help="LINE (newest version), LINE@vN or LINE@ALIAS.")],
    model: MlflowModelOpt, tracking_uri: TrackingUriOpt = None, experiment: ExperimentOpt = None,
    merged: MergedPushOpt = False, registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Log one version as an MLflow run (exported folder and model card as artifacts, fuse and learn
    parameters, lineage tags, eval scores and AP/BWT as metrics), register it as a version of
    --model and mirror the line's aliases. A version already there is not pushed again; an
    interrupted push is completed. kifmerge's registry is only read."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.mlflow_push(ref, model=model, tracking_uri=tracking_uri, experiment=experiment, merged=merged,
                                 registry=registry, progress=progress)
    emit(result, json_out, render_mlflow)


@mlflow_app.command("sync")
@handled
def mlflow_sync(
    line: Annotated[str, typer.Argument(help="The line whose versions to push.")],
    model: MlflowModelOpt, tracking_uri: TrackingUriOpt = None, experiment: ExperimentOpt = None,
    merged: MergedPushOpt = False, registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Push every version of LINE that --model does not hold yet (oldest first), bring the others'
    metrics up to date, then move the MLflow aliases to match the line's; --json lists what changed."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.mlflow_sync(line, model=model, tracking_uri=tracking_uri, experiment=experiment, merged=merged,
                                 registry=registry, progress=progress)
    emit(result, json_out, render_mlflow)


def render_mlflow(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    versions = result.get("versions") or [result]
    render_table([{**v, "MLflow version": v["model_version"], "run": v["run_id"]} for v in versions],
                 ["version", "status", "MLflow version", "run"], "no versions",
                 title=f"MLflow model {result['model']} at {result['tracking_uri']} (experiment {result['experiment']})")
    console = Console()
    aliases = result["aliases"]
    for name, moved in aliases["set"].items():
        console.print(escape(f"alias {name} → model version {moved['model_version']} ({moved['version']})"
                             + (f", was {moved['from']}" if moved["from"] else "")))
    for name, was in aliases["removed"].items():
        console.print(escape(f"alias {name} removed (was model version {was})"))
    for name, ref in aliases["pending"].items():
        console.print(escape(f"alias {name}: {ref} is not in MLflow yet (`kifmerge mlflow sync` pushes it)"))
    for name, why in aliases["skipped"].items():
        console.print(escape(f"alias {name} not mirrored: {why}"))
    if not result["changed"]:
        console.print("nothing changed: MLflow already holds these versions and aliases")


@app.command()
@handled
def rollback(
    line: Annotated[str, typer.Argument(help="The line to roll back.")],
    to: Annotated[str, typer.Option("--to", help="The version whose weights become the head: vN, ALIAS or LINE@….")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Make an earlier version's weights and profile the head again, as a NEW version."""
    from kifmerge import api

    result = api.rollback(line, to, registry=registry)
    emit(result, json_out, lambda r: print(f"{r['version']}: rolled back to {r['to']} (parent {r['parent']})"))


@app.command()
@handled
def diff(
    ref_a: Annotated[str, typer.Argument(metavar="A", help="LINE, LINE@vN or LINE@ALIAS.")],
    ref_b: Annotated[str, typer.Argument(metavar="B", help="LINE, LINE@vN or LINE@ALIAS.")],
    top: Annotated[int, typer.Option("--top", help="Show the K most changed units.")] = 10,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Per-unit relative change ‖W_B − W_A‖/‖W_A‖, and what each fuse in between kept, replaced or blended."""
    from kifmerge import api

    emit(api.diff(ref_a, ref_b, top=top, registry=registry), json_out, render_diff)


def render_diff(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def number(value: float | None) -> str:
        return "inf" if value is None else f"{value:.4g}"

    console = Console()
    summary = result["summary"]
    table = Table("from", "to", "unit", "units", "changed", "relative ‖ΔW‖/‖W‖", "max unit", title="diff")
    table.add_row(result["from"], result["to"], result["unit"], str(summary["units"]), str(summary["changed"]),
                  number(summary["relative"]), number(summary["max_relative"]))
    console.print(table)
    if result["steps"]:
        steps = Table("version", "task", "method", "kept", "replaced", "blended", title="fuses in between")
        for step in result["steps"]:
            counts = step["counts"] or {}
            note = step["params"].get("to") if step["method"] == "rollback" else None
            steps.add_row(step["version"], step["task"] or (f"(to v{note})" if note else "—"), step["method"],
                          *[str(counts[f]) if counts else "—" for f in ("kept", "replaced", "blended")])
        console.print(steps)
    elif not result["same_line"]:
        console.print("versions of different lines: no fuse steps between them")
    if result["top"]:
        ranked = Table("unit", "relative", "‖ΔW‖", "fate", title=f"top {len(result['top'])} changed units")
        for unit in result["top"]:
            ranked.add_row(unit["id"], number(unit["relative"]), f"{unit['diff_norm']:.4g}",
                           ", ".join(f"{v}: {fate}" for v, fate in unit["fates"].items()) or "—")
        console.print(ranked)


@app.command("run")
@handled
@model_command
def run_plan(
    plan: Annotated[Path, typer.Argument(help="A plan file (.yaml, .toml or .json): a line and its steps.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the plan and print it with estimates; run nothing.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Run a plan's learn / add-task / fuse / eval steps in order; finished steps are skipped."""
    from kifmerge import api

    def announce(step) -> None:
        state = "already done, skipped" if step.status == "done" else ("would run" if dry_run else "running")
        sys.stderr.write(f"step {step.index}: {step.kind} {step.subject} — {state}\n")

    with progress_bars() as progress:
        result = api.run_plan(plan, dry_run=dry_run, registry=registry, progress=progress,
                              on_step=None if dry_run or QUIET.get() else announce)
    for step in result["steps"]:  # as `fuse` warns, on stderr (so with --json too)
        stale = (step.get("result") or {}).get("stale_start")
        if stale:
            print(f"kifmerge: warning: step {step['step']}: task {step['subject']!r} was trained from "
                  f"{stale['trained_from']}, not from the head {stale['head']}", file=sys.stderr)
    emit(result, json_out, render_plan)


def render_plan(result: dict) -> None:
    rows = [{**step, "estimate": ", ".join(f"{k} {_size(v)}" for k, v in step["estimate"].items() if v is not None),
             "fingerprint": step["fingerprint"][:12], "outcome": _outcome(step.get("result"))} for step in result["steps"]]
    render_table(rows, ["step", "kind", "subject", "status", "estimate", "outcome", "fingerprint"], "no steps")
    verb = "would run" if result["dry_run"] else "ran"
    sys.stdout.write(f"{result['line']}: {result['done']} step(s) done, {result['pending']} {verb if result['dry_run'] else 'pending'}\n")


def _outcome(result: dict | None) -> str:
    """What a step just made: the version, the task, or the scores (exact match)."""
    if not result:
        return ""
    if "results" in result:
        return ", ".join(f"{label} {m.get('exact_match', 0):.2f}" for label, m in result["results"].items())
    return str(result.get("version") or result.get("name") or "")


def _size(value) -> str:
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values())
    if isinstance(value, int) and value > 10_000:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if value < 1000:
                return f"{value:.0f} {unit}"
            value /= 1000
    return str(value)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
