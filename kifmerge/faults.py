"""Named crash points for the crash-safety tests (tests/test_crash.py).

`fault_point(name)` kills the process with SIGKILL — no cleanup, no `finally`, like a power
cut or an OOM kill — when the environment variable KIFMERGE_FAULT_POINT names it
(`NAME`, or `NAME#N` for its N-th hit). Unset, it costs one dict lookup, so the calls stay in
production code at the places where a write path is between two steps.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "KIFMERGE_FAULT_POINT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    wanted, _, nth = target.partition("#")
    if wanted != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
