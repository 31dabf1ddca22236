"""Docs that must not drift: the generated CLI reference (docs/cli.md), shell completion, and
the README quickstart run verbatim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from kifmerge.cli import app

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from run_quickstart import quickstart_commands, run  # noqa: E402

DOCS_COMMAND = [sys.executable, "-m", "typer", "kifmerge.cli", "utils", "docs", "--name", "kifmerge", "--output"]


def test_cli_reference_is_current(tmp_path):
    """docs/cli.md is what Typer generates from the app now; regenerate with `make docs`."""
    subprocess.run([*DOCS_COMMAND, str(tmp_path / "cli.md")], check=True, capture_output=True, cwd=REPO)
    fresh, stored = (tmp_path / "cli.md").read_text(), (REPO / "docs" / "cli.md").read_text()
    assert fresh == stored, "docs/cli.md is stale: run `make docs` and commit it"
    for command in ("profile show", "base add", "fuse", "export", "learn"):
        assert f"## `kifmerge {command}`" in stored


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the command line `words` (cursor at the last word)."""
    parts = words.split(" ")
    result = CliRunner().invoke(app, [], prog_name="kifmerge", env={
        "_KIFMERGE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1), **(env or {})})
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_shell_completion(tmp_path):
    script = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="kifmerge")
    assert script.exit_code == 0
    assert "_KIFMERGE_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _kifmerge_completion kifmerge" in script.stdout
    assert complete("kifmerge pro") == ["profile"]
    assert "show" in complete("kifmerge profile ")
    assert complete("kifmerge profile show --t") == ["--top"]
    assert {"--copy", "--revision"} <= set(complete("kifmerge base add --"))
    # installing writes only under $HOME: here a temporary one
    installed = CliRunner().invoke(app, ["--install-completion", "bash"], prog_name="kifmerge", env={"HOME": str(tmp_path)})
    assert installed.exit_code == 0, installed.output
    assert "_kifmerge_completion" in (tmp_path / ".bash_completions" / "kifmerge.sh").read_text()
    assert ".bash_completions/kifmerge.sh" in (tmp_path / ".bashrc").read_text()


def test_readme_quickstart_runs_verbatim(tmp_path):
    """Every command of the README quickstart but the setup line, in a new folder, with the
    venv's bin first on PATH and the registry in the folder."""
    commands = quickstart_commands()
    assert commands[0].startswith("make setup") and sum(c.startswith("kifmerge ") for c in commands) >= 7
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "KIFMERGE_REGISTRY": str(tmp_path / "registry"), "HOME": os.environ.get("HOME", str(tmp_path))}
    run(tmp_path, env)
    history = json.loads(subprocess.run(["kifmerge", "history", "demo", "--json"], env=env, cwd=tmp_path,
                                        capture_output=True, text=True, check=True).stdout)
    assert [v["task"] for v in history] == ["parity", "vowel"]
    assert (tmp_path / "out" / "demo" / "README.md").is_file() and (tmp_path / "demo-profile.png").is_file()
    assert (tmp_path / "registry" / "kifmerge.db").is_file()  # the registry went where KIFMERGE_REGISTRY says
