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
    # a fresh process, as a user runs it (an in-process run once exited 1 late in a full-suite run,
    # not reproducible alone: state left by earlier in-process invocations)
    script = subprocess.run([str(Path(sys.executable).parent / "kifmerge"), "--show-completion", "bash"], capture_output=True, text=True,
                            env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}, cwd=tmp_path)
    assert script.returncode == 0, script.stdout + script.stderr
    assert "_KIFMERGE_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _kifmerge_completion kifmerge" in script.stdout
    assert complete("kifmerge pro") == ["profile"]
    assert "show" in complete("kifmerge profile ")
    assert complete("kifmerge profile show --t") == ["--top"]
    assert {"--copy", "--revision"} <= set(complete("kifmerge base add --"))
    # installing writes only under $HOME: here a temporary one (a fresh process too: in-process, the
    # app's completion state is whatever earlier tests left, which failed in some random orders)
    installed = subprocess.run([str(Path(sys.executable).parent / "kifmerge"), "--install-completion", "bash"],
                               capture_output=True, text=True, cwd=tmp_path,
                               env={**os.environ, "HOME": str(tmp_path), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert installed.returncode == 0, installed.stdout + installed.stderr
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


def test_quickstart_runs_after_the_demo_on_the_same_registry(tmp_path, llama_dir):
    """`make demo` then the quick start, on one registry: the demo leaves its base `smollm2`, its
    line and its tasks behind (made here from a tiny model under the demo's names, since the
    demo's real model is too slow for CI); the quick start must run verbatim on top of them and
    leave the demo's line untouched."""
    import importlib.util

    from conftest import LORA_TARGETS, make_lora

    spec = importlib.util.spec_from_file_location("kifmerge_demo_names", REPO / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # main() only runs under __main__
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "KIFMERGE_REGISTRY": str(tmp_path / "registry"), "HOME": os.environ.get("HOME", str(tmp_path))}

    def kifmerge(*args: str) -> str:
        return subprocess.run(["kifmerge", *map(str, args)], env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    kifmerge("init")
    kifmerge("base", "add", "smollm2", llama_dir)
    for seed, task in enumerate(demo.TASKS, start=1):
        name = f"{demo.LINE}-{task}"
        kifmerge("add-task", name, make_lora(llama_dir, tmp_path / "ckpt" / name, seed, LORA_TARGETS), "--base", "smollm2",
                 "--calibrate", demo.dev_file(task), "--calibrate-batches", "1", "--max-length", "32")
        kifmerge("fuse", name, "--into", demo.LINE)
    before = kifmerge("history", demo.LINE, "--json")
    run(tmp_path, env)
    assert kifmerge("history", demo.LINE, "--json") == before
    assert [v["task"] for v in json.loads(kifmerge("history", "demo", "--json"))] == ["parity", "vowel"]
