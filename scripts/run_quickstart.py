"""Run the README's quickstart verbatim: the commands of the first fenced `bash` block under
"## Quick start", one after another, in WORKDIR (created; `examples/` is linked into it).
The setup line (`make setup …` / `pip install …`) is skipped: the caller provides the
environment (`kifmerge` and `python` on PATH). Exits non-zero at the first failing command.

    python scripts/run_quickstart.py WORKDIR
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP = re.compile(r"^(make setup|pip install|\. \.venv/bin/activate)")


def quickstart_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The shell commands of the quickstart block; `\\`-continued lines are joined."""
    text = readme.read_text()
    section = text.split("\n## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    return commands


def run(workdir: Path, env: dict[str, str] | None = None) -> list[tuple[str, float]]:
    """Run every command but the setup; returns (command, seconds); raises on the first failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "examples").exists():
        (workdir / "examples").symlink_to(REPO / "examples")
    timings = []
    for command in quickstart_commands():
        if SETUP.match(command):
            continue
        started = time.perf_counter()
        done = subprocess.run(command, shell=True, executable="/bin/bash", cwd=workdir, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"quickstart command failed (exit {done.returncode}): {command}\n{done.stdout}\n{done.stderr}")
        timings.append((command, time.perf_counter() - started))
    return timings


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    env = {**os.environ, "KIFMERGE_REGISTRY": str(Path(sys.argv[1]).resolve() / "registry")}
    try:
        for command, seconds in run(Path(sys.argv[1]), env):
            print(f"{seconds:6.1f} s  {command}")
    except RuntimeError as exc:
        sys.exit(str(exc))
