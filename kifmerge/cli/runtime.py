"""The command line's runtime: the Typer app and its global options, one-line errors with
their exit codes, progress on stderr, thread settings, and `emit` (a table, or JSON with `--json`)."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import sqlite3
import sys
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
import typer.core

from kifmerge.errors import KifError
from kifmerge.redact import redact


class OneLineUsageErrors(typer.core.TyperGroup):
    """Click's own usage errors (a missing argument, an unknown option, a value of the wrong type)
    as every other error: one line on stderr, `kifmerge: error: …` with where to find the help, and
    with --json the error object on stdout (`_json_error`); exit 2 as before. Click would print a
    usage block and a framed message instead, and nothing on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's exceptions (typer vendors click; this is their public base)
            if type(exc).__name__ == "NoArgsIsHelpError":  # a group given nothing: its help, as asked for
                exc.show()
                sys.exit(exc.exit_code)
            context = getattr(exc, "ctx", None)
            message = f"{_one_line(exc.format_message())} (see `{context.command_path if context else 'kifmerge'} --help`)"
            print(f"kifmerge: error: {message}", file=sys.stderr)
            _json_error({"json_out": "--json" in argv}, "usage", message, exc.exit_code, None)
            sys.exit(exc.exit_code)
        except typer.Abort:  # Ctrl-C while click itself was reading (a prompt)
            print("kifmerge: interrupted; nothing was recorded", file=sys.stderr)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="kifmerge",
    help="Continual learning of language models by importance-guided merging (KIF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def one_line_summaries(typer_app: typer.Typer) -> None:
    """Give every command of `typer_app` (and of its groups) a one-line summary for the command lists
    of `--help`: the first paragraph of its docstring with the source's line breaks removed. Without it
    Typer's rich help keeps those breaks, and a list row stops mid-sentence at the docstring's wrap."""
    for info in typer_app.registered_commands:
        if info.short_help is None and (text := info.help or inspect.getdoc(info.callback)):
            info.short_help = " ".join(text.split("\n\n")[0].split())
    for group in typer_app.registered_groups:
        one_line_summaries(group.typer_instance)


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
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=lambda value: _print_version(value),
                                          help="Print kifmerge's version and exit.")] = False,
) -> None:
    """The options every command takes, accepted before the command too (see `handled`)."""
    from kifmerge.errors import KifWarning

    warnings.showwarning = _show_warning
    warnings.filterwarnings("always", category=KifWarning)  # every command says it, not only the first in a process


def _print_version(value: bool) -> None:
    if value:
        from kifmerge import __version__

        print(f"kifmerge {__version__}")
        raise typer.Exit(0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """kifmerge's own warnings (--bf16 falling back, a fusion rule lacking its scores) as one line
    on stderr, in --json mode too; anyone else's as Python shows them."""
    from kifmerge.errors import KifWarning

    if issubclass(category, KifWarning):
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


def annotate(wrapper: Callable) -> None:
    """Give a wrapper the resolved annotations of its `__signature__`: Typer reads the hints of the
    outermost function, and the strings copied from a command in another module (`from __future__
    import annotations`) would be looked up in the wrapper's module, where they are not defined."""
    signature = wrapper.__signature__
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()
                               if p.annotation is not inspect.Parameter.empty}
    wrapper.__annotations__["return"] = None


def _signature_with(fn: Callable, extra: list[inspect.Parameter]) -> inspect.Signature:
    """`fn`'s signature, string annotations resolved (Typer reads them), plus `extra`. A wrapper
    from another module (an option group) already carries resolved annotations in its
    `__signature__`; only a plain command's strings are resolved, in its own module."""
    signature = inspect.signature(fn)
    if any(isinstance(p.annotation, str) for p in signature.parameters.values()):
        hints = typing.get_type_hints(fn, include_extras=True)
        signature = signature.replace(parameters=[p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) else p
                                                  for p in signature.parameters.values()])
    return signature.replace(parameters=list(signature.parameters.values()) + extra)


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
            _json_error(kwargs, storage.kind, _one_line(storage), storage.exit_code, storage.details)
            raise typer.Exit(storage.exit_code) from None
        except KifError as exc:
            if kwargs.get("debug"):
                raise
            print(f"kifmerge: error: {_one_line(exc)}", file=sys.stderr)
            _json_error(kwargs, exc.kind, _one_line(exc), exc.exit_code, exc.details)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # a bug or an environment problem: still one line by default
            if kwargs.get("debug"):
                raise
            message = redact(str(exc).splitlines()[0]) if str(exc).strip() else ""
            print(f"kifmerge: unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            _json_error(kwargs, "unexpected", f"{type(exc).__name__}: {message}", 1, None)
            raise typer.Exit(1) from None
        finally:
            QUIET.reset(token)

    wrapper.__signature__ = _signature_with(fn, [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=QuietOpt),
        inspect.Parameter("kifmerge_context", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)])
    annotate(wrapper)
    del wrapper.__wrapped__
    return wrapper


def _json_error(kwargs: dict, kind: str, message: str, exit_code: int, details: Any) -> None:
    """With --json a failed command still prints one JSON object on stdout, so a pipeline parsing it reads the
    error instead of nothing: `error` (its kind: usage, not-found, invalid-input, integrity, conflict, storage,
    remote, unexpected), `message` (the line on stderr) and `exit_code`, beside the error's own report."""
    if not kwargs.get("json_out"):
        return
    body = dict(details) if isinstance(details, dict) else ({"details": details} if details is not None else {})
    body |= {"error": kind, "message": message, "exit_code": exit_code}
    sys.stdout.write(redact(json.dumps(body, indent=2, sort_keys=True, default=str)) + "\n")


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
    annotate(wrapper)
    del wrapper.__wrapped__
    return wrapper


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    else:
        render(result)
