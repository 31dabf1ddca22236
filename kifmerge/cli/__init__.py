"""The command line: a thin Typer layer. Each command parses, calls one service in
`kifmerge.api`, and renders the result (rich table, or JSON with `--json`).

Errors print one line on stderr and exit with the error class's code (see `errors.py`);
`--debug` (or KIFMERGE_DEBUG=1) shows the traceback instead.

- runtime.py: the app, global options, errors and exit codes, progress, `emit`
- rendering.py: summaries and tables
- options.py: the option groups shared by commands
- commands.py, operations.py: the commands (registered on the app when imported)
"""

from __future__ import annotations

import os

from kifmerge.cli import commands, operations  # noqa: F401  (each registers its commands on the app)
from kifmerge.cli.runtime import app, one_line_summaries

one_line_summaries(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


__all__ = ["app", "main"]
