"""The Python API: one service function per command (the CLI is a thin layer over these).

Results are plain JSON-able dicts, the same that `--json` prints. Heavy libraries (torch,
peft, transformers) are imported inside the services that need them, and each service module
is imported on first use of one of its functions (`api.list_items` imports the registry
service, not training or evaluation), which keeps `kifmerge --help` and registry queries instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kifmerge.services.diffing import diff
    from kifmerge.services.evaluation import evaluate, report
    from kifmerge.services.exporting import export
    from kifmerge.services.fusion import fuse
    from kifmerge.services.learning import learn, train
    from kifmerge.services.mlflow_sync import mlflow_push, mlflow_sync
    from kifmerge.services.plans import run_plan
    from kifmerge.services.profiling import profile_show
    from kifmerge.services.registry import add_base, gc, history, init, list_items, show, verify
    from kifmerge.services.tasks import add_task
    from kifmerge.services.versions import alias_list, alias_rm, alias_set, line_events, rollback

_MODULES = {  # function → the service module (kifmerge.services.*) defining it
    "evaluate": "evaluation", "report": "evaluation", "export": "exporting", "fuse": "fusion", "learn": "learning",
    "train": "learning", "run_plan": "plans", "profile_show": "profiling", "add_base": "registry", "gc": "registry",
    "history": "registry", "init": "registry", "list_items": "registry", "show": "registry", "verify": "registry",
    "add_task": "tasks", "diff": "diffing", "alias_list": "versions", "alias_rm": "versions", "alias_set": "versions",
    "line_events": "versions", "rollback": "versions", "mlflow_push": "mlflow_sync", "mlflow_sync": "mlflow_sync",
}

__all__ = ["alias_list", "alias_rm", "alias_set", "diff", "line_events", "rollback", "add_base", "add_task", "evaluate", "export", "fuse", "gc", "history", "init", "learn", "list_items",
           "mlflow_push", "mlflow_sync", "profile_show", "report", "run_plan", "show", "train", "verify"]


def __getattr__(name: str):
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kifmerge.services.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
