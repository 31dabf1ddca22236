"""The Python API: one service function per command (the CLI is a thin layer over these).

Results are plain JSON-able dicts, the same that `--json` prints. Heavy libraries (torch,
peft, transformers) are imported inside the services that need them, which keeps
`kifmerge --help` and registry queries instant.
"""

from kifmerge.services.evaluation import evaluate, report
from kifmerge.services.exporting import export
from kifmerge.services.fusion import fuse
from kifmerge.services.learning import learn, train
from kifmerge.services.plans import run_plan
from kifmerge.services.profiling import profile_show
from kifmerge.services.registry import add_base, gc, history, init, list_items, show, verify
from kifmerge.services.tasks import add_task
from kifmerge.services.diffing import diff
from kifmerge.services.versions import alias_list, alias_rm, alias_set, line_events, rollback

__all__ = ["alias_list", "alias_rm", "alias_set", "diff", "line_events", "rollback", "add_base", "add_task", "evaluate", "export", "fuse", "gc", "history", "init", "learn", "list_items",
           "profile_show", "report", "run_plan", "show", "train", "verify"]
