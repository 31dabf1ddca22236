"""Progress off a terminal: one-line log records on stderr (CI logs, nohup, a pipe) instead of
rich's bars, which need a terminal.

Services report through `progress(description, total)` → `advance(n=1, *, loss=None)`; here
each such task writes its first step, then at most one record every `interval` seconds, and
its last step:

    kifmerge: training parity: step 3/20 (15%), loss 5.046, elapsed 0:01, ETA 0:06
    kifmerge: evaluating parity: 20/20 (100%), elapsed 0:04, done
"""

from __future__ import annotations

import time
from typing import Callable, TextIO

LOG_INTERVAL_S = 10.0


def clock(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """`progress(description, total)` writing periodic one-line records to `stream`."""

    def __init__(self, stream: TextIO, interval: float = LOG_INTERVAL_S, now: Callable[[], float] = time.monotonic):
        self.stream, self.interval, self.now = stream, interval, now
        self.tasks: list[_Task] = []

    def __call__(self, description: str, total: int) -> Callable[..., None]:
        task = _Task(self, description, total)
        self.tasks.append(task)
        return task.advance

    def finish(self) -> None:
        """The last record of each task that advanced since its last record (its end, when the
        work stopped short of the total)."""
        for task in self.tasks:
            if task.done > task.logged:
                task.write()

    def write(self, line: str) -> None:
        self.stream.write(f"kifmerge: {line}\n")
        self.stream.flush()


class _Task:
    def __init__(self, log: ProgressLog, description: str, total: int):
        self.log, self.description, self.total = log, description, total
        self.done, self.logged, self.loss = 0, 0, None
        self.started = self.last = log.now()

    def advance(self, n: int = 1, *, loss: float | None = None) -> None:
        self.done += n
        if loss is not None:
            self.loss = loss
        first, last = self.logged == 0, bool(self.total) and self.done >= self.total
        if first or last or self.log.now() - self.last >= self.log.interval:
            self.write()

    def write(self) -> None:
        now = self.log.now()
        elapsed = now - self.started
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        if self.total:
            count += f" ({100 * min(self.done, self.total) // self.total}%)"
        parts = [f"step {count}" if self.loss is not None else count]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        parts.append(f"elapsed {clock(elapsed)}")
        if self.total and self.done >= self.total:
            parts.append("done")
        elif self.total and self.done:
            parts.append(f"ETA {clock(elapsed / self.done * (self.total - self.done))}")
        self.log.write(f"{self.description}: " + ", ".join(parts))
        self.logged, self.last = self.done, now
