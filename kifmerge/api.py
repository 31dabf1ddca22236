"""The Python API: one service function per command (the CLI is a thin layer over these).

Results are plain JSON-able dicts, the same that `--json` prints. Heavy libraries (torch,
peft, transformers) are imported inside the services that need them, and each service module
is imported on first use of one of its functions (`api.list_items` imports the registry
service, not training or evaluation), which keeps `kifmerge --help` and registry queries instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kifmerge.services.diffing import diff
    from kifmerge.services.evaluating import evaluate, report
    from kifmerge.services.exporting import export
    from kifmerge.services.fusing import fuse
    from kifmerge.services.learning import learn, train
    from kifmerge.services.mlflow_sync import mlflow_push, mlflow_sync
    from kifmerge.services.planning import run_plan
    from kifmerge.services.profiling import profile_show
    from kifmerge.services.registry_admin import add_base, gc, history, init, list_items, show, verify
    from kifmerge.services.tasks import add_task
    from kifmerge.services.versions import alias_list, alias_rm, alias_set, line_events, rollback

__all__ = ["alias_list", "alias_rm", "alias_set", "diff", "line_events", "rollback", "add_base", "add_task", "evaluate", "export",
           "fuse", "gc", "history", "init", "learn", "list_items", "mlflow_push", "mlflow_sync", "profile_show", "report",
           "run_plan", "show", "train", "verify"]


def __getattr__(name: str):
    """The service function NAME, its module imported on first use: plain imports, one branch per
    service module, so a reader (or a tool) follows what each API function is."""
    if name in ("evaluate", "report"):
        from kifmerge.services.evaluating import evaluate, report
    elif name == "export":
        from kifmerge.services.exporting import export
    elif name == "fuse":
        from kifmerge.services.fusing import fuse
    elif name in ("learn", "train"):
        from kifmerge.services.learning import learn, train
    elif name == "run_plan":
        from kifmerge.services.planning import run_plan
    elif name == "profile_show":
        from kifmerge.services.profiling import profile_show
    elif name in ("add_base", "gc", "history", "init", "list_items", "show", "verify"):
        from kifmerge.services.registry_admin import add_base, gc, history, init, list_items, show, verify
    elif name == "add_task":
        from kifmerge.services.tasks import add_task
    elif name == "diff":
        from kifmerge.services.diffing import diff
    elif name in ("alias_list", "alias_rm", "alias_set", "line_events", "rollback"):
        from kifmerge.services.versions import alias_list, alias_rm, alias_set, line_events, rollback
    elif name in ("mlflow_push", "mlflow_sync"):
        from kifmerge.services.mlflow_sync import mlflow_push, mlflow_sync
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = locals()[name]
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
