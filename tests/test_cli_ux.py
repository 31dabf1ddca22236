"""What a person (or a CI log) sees: progress records off a terminal, concise human results,
global options before or after the command, registry discovery from a subfolder, `list`'s
sections, and `--threads`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from kifmerge.cli import app

RECORD = re.compile(r"^kifmerge: (?P<what>.+?): (?P<step>step )?(?P<done>\d+)/(?P<total>\d+) \(\d+%\)"
                    r"(, loss (?P<loss>[\d.e+-]+))?, elapsed \d+:\d\d(, ETA \d+:\d\d|, done)$")


def invoke(*args, env: dict | None = None, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
    return result


def records(stderr: str, what: str) -> list[dict]:
    found = [RECORD.match(line) for line in stderr.splitlines()]
    return [m.groupdict() for m in found if m and m["what"] == what]


@pytest.fixture
def line(parity_line):
    """A line `main` with v1 (parity, learned in 2 steps); the data files."""
    return parity_line


def test_learn_off_a_terminal_logs_progress_on_stderr_only(cli, line, monkeypatch):
    """Under CI or nohup (stderr not a terminal) learn writes one-line records: the first step,
    the last, at most one every ~10 s between; each with step/total, loss, elapsed and ETA.
    stdout holds only the JSON result. The log's clock is stopped here, so no 10 s pass between
    steps however slow the machine: exactly the first and the last step are written."""
    from kifmerge import progress

    real = progress.ProgressLog
    monkeypatch.setattr(progress, "ProgressLog", lambda stream: real(stream, now=lambda: 0.0))
    result = cli("learn", "vowel", "--data", line["vowel"], "--into", "main", "--max-steps", "6", "--json")
    assert json.loads(result.stdout)["version"] == "main@v2"  # stdout: the result and nothing else
    training = records(result.stderr, "training vowel")
    assert training, result.stderr
    assert training[0]["step"] and training[0]["done"] == "1" and training[0]["loss"] is not None
    assert training[-1]["done"] == training[-1]["total"] == "6" and result.stderr.count("done") >= 1
    assert all(float(r["loss"]) > 0 for r in training)
    assert [r["done"] for r in training] == ["1", "6"], "no record between the first and the last within 10 s"
    fusing = records(result.stderr, "fusing vowel into main")
    assert fusing and fusing[-1]["done"] == fusing[-1]["total"] and fusing[-1]["loss"] is None

    evaluated = cli("eval", "main", "--data", f"parity={line['parity']}", "--max-examples", "4", "--max-new-tokens", "2")
    assert records(evaluated.stderr, "evaluating parity")[-1]["done"] == "4"

    quiet = cli("train", "t3", "--data", line["vowel"], "--line", "main", "--max-steps", "2", "--json", "--quiet")
    assert json.loads(quiet.stdout)["name"] == "t3" and "kifmerge:" not in quiet.stderr


def test_progress_log_writes_the_first_and_last_step_and_one_per_interval():
    """ProgressLog on a scripted clock: a step every 4 s, records at most every 10 s."""
    import io

    from kifmerge.progress import ProgressLog

    clock = [0.0]
    stream = io.StringIO()
    log = ProgressLog(stream, interval=10.0, now=lambda: clock[0])
    advance = log("training t", 7)
    for step in range(7):
        clock[0] += 4.0
        advance(loss=1.0 / (step + 1))
    lines = stream.getvalue().splitlines()
    # step 1 (first, at 4 s); step 4 at 16 s (≥ 10 s after 4 s); step 7 (last); steps 2, 3, 5, 6 fall inside 10 s
    assert [re.search(r"step (\d)/7", text)[1] for text in lines] == ["1", "4", "7"], lines
    assert lines[0] == "kifmerge: training t: step 1/7 (14%), loss 1, elapsed 0:04, ETA 0:24"
    assert lines[-1] == "kifmerge: training t: step 7/7 (100%), loss 0.1429, elapsed 0:28, done"


def test_human_results_are_short_summaries(cli, line):
    """No raw JSON, no Python `False`, numbers rounded; --json unchanged."""
    learned = cli("learn", "vowel", "--data", line["vowel"], "--into", "main", "--max-steps", "2").stdout
    assert learned.splitlines()[0] == "main@v2: vowel fused into main by regmean (from v1)"
    assert "{" not in learned and len(learned) < 600 and "non_diagonal=0.9" in learned and "2 steps, loss " in learned
    trained = cli("train", "t3", "--data", line["vowel"], "--line", "main", "--max-steps", "2").stdout
    assert trained.startswith("task t3: lora on base llama, trained from main@v2") and "{" not in trained
    fused = cli("fuse", "t3", "--into", "main").stdout
    assert fused.startswith("main@v3: t3 fused into main by regmean (from v2)") and "{" not in fused

    history = cli("history", "main").stdout
    assert "non_diagonal=0.9" in history and "{" not in history
    assert len(history.splitlines()) <= 16, "three versions, a few lines each"
    evaluated = cli("eval", "main", "--data", f"parity={line['parity']}", "--max-examples", "4", "--max-new-tokens", "2").stdout
    assert "False" not in evaluated and "True" not in evaluated
    row = next(r for r in evaluated.splitlines() if "parity" in r)
    assert re.search(r"\d\.\d{3}", row) and re.search(r"\d+\.\d{1,2} s", row) and "new" in row
    assert "reused" in cli("eval", "main", "--data", f"parity={line['parity']}", "--max-examples", "4",
                           "--max-new-tokens", "2").stdout
    cli("rollback", "main", "--to", "v1")
    assert cli("show", "main@v4").stdout.startswith("main@v4: rollback of main to v1 (from v3)")
    for ref in ("main", "main@v2", "vowel"):
        shown = cli("show", ref).stdout
        assert "{" not in shown and "null" not in shown, shown
    assert cli.json("show", "main@v2")["params"]["non_diagonal"] == 0.9  # --json as before


def test_list_without_argument_shows_bases_lines_and_tasks(cli, line):
    shown = cli("list").stdout
    for section, name in (("bases", "llama"), ("lines", "main"), ("tasks", "parity")):
        assert re.search(rf"^\s*{section}\s*$", shown, re.M) and name in shown
    assert shown.index("bases") < shown.index("lines") < shown.index("tasks")
    listed = cli.json("list")
    assert [b["name"] for b in listed["bases"]] == ["llama"] and [t["name"] for t in listed["tasks"]] == ["parity"]
    assert [row["name"] for row in listed["lines"]] == ["main"]
    assert cli.json("list", "tasks") == listed["tasks"]


def test_global_options_before_or_after_the_command(cli, line, tmp_path):
    registry = str(cli.registry)
    lines = json.loads(invoke("--registry", registry, "--json", "list", "lines").stdout)
    assert [row["name"] for row in lines] == ["main"]
    assert json.loads(invoke("--json", "diff", "main@v1", "main@v1", "--registry", registry).stdout)["from"] == "main@v1"
    # after the command wins over before it; before it wins over the environment
    assert invoke("--registry", tmp_path / "elsewhere", "list", "lines", "--registry", registry).stdout.count("main") == 1
    assert "main" in invoke("--registry", registry, "list", "lines", env={"KIFMERGE_REGISTRY": str(tmp_path / "no")}).stdout
    failed = invoke("--debug", "show", "nothing", "--registry", registry, code=1)
    assert type(failed.exception).__name__ == "NotFoundError", "--debug before the command: the traceback"
    quiet = invoke("--quiet", "--registry", registry, "learn", "vowel", "--data", line["vowel"], "--into", "main",
                   "--max-steps", "2")
    assert quiet.stdout.startswith("main@v2") and "kifmerge:" not in quiet.stderr


def test_registry_found_from_a_subfolder(tmp_path, monkeypatch):
    """Without --registry or $KIFMERGE_REGISTRY: the nearest registry/ here or above (like git);
    `init` creates ./registry here; with none, the error says where it looked."""
    monkeypatch.delenv("KIFMERGE_REGISTRY", raising=False)
    project, nowhere = tmp_path / "project", tmp_path / "nowhere"
    deep = project / "data" / "deeper"
    deep.mkdir(parents=True)
    nowhere.mkdir()
    monkeypatch.chdir(project)
    invoke("init")
    assert (project / "registry" / "kifmerge.db").is_file()
    monkeypatch.chdir(deep)
    assert json.loads(invoke("list", "--json").stdout) == {"bases": [], "lines": [], "tasks": []}
    assert json.loads(invoke("init", "--json").stdout)["registry"] == str(deep / "registry")  # init: here, not above
    monkeypatch.chdir(nowhere)
    missing = invoke("list", code=3)
    assert "no registry found" in missing.stderr and str(nowhere) in missing.stderr and "kifmerge init" in missing.stderr


def test_threads(cli, line):
    """--threads sets torch's CPU threads for the run; 0 is refused as a usage error."""
    before = torch.get_num_threads()
    try:
        cli("eval", "main", "--data", f"parity={line['parity']}", "--max-examples", "2", "--max-new-tokens", "1",
            "--threads", "1")
        assert torch.get_num_threads() == 1
        refused = cli("learn", "vowel", "--data", line["vowel"], "--into", "main", "--threads", "0", code=2)
        assert "--threads" in refused.stderr
    finally:
        torch.set_num_threads(before)


def test_a_label_given_twice_and_an_unwritable_png_are_refused_before_any_work(cli, line, tmp_path):
    """`eval --data p=A --data p=B` would keep B's scores only, under a label the report then mixes;
    `--png` must name a .png file in a folder that exists. Each is one line and a usage exit, nothing stored."""
    twice = cli("eval", "main", "--data", f"p={line['parity']}", "--data", f"p={line['vowel']}", code=2)
    assert "given twice" in twice.stderr and len(twice.stderr.strip().splitlines()) == 1
    assert cli.json("show", "main@v1")["evaluations"] == {}
    for args, code, message in ((["report", "main", "--png", str(tmp_path / "r.txt")], 2, "ending in .png"),
                                (["report", "main", "--png", str(tmp_path)], 2, "ending in .png"),
                                (["profile", "show", "main", "--png", str(tmp_path / "no" / "p.png")], 3, "does not exist")):
        refused = cli(*args, code=code)
        assert message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, args


def test_json_errors_are_json_on_stdout_and_version_is_printed(cli, line):
    """A pipeline that parses `--json` output reads a failed command's error as JSON too (the same line as on
    stderr, its kind and exit code); `--version` answers without a registry."""
    for args, code, kind in ((["show", "nosuch"], 3, "not-found"), (["eval", "main", "--data", "x"], 2, "usage"),
                             (["rollback", "main", "--to", "v1"], 2, "usage"), (["profile", "show", "nosuch"], 3, "not-found"),
                             (["base", "add", "b2", line["parity"]], 2, "usage")):
        result = cli(*args, "--json", code=code)
        out = json.loads(result.stdout)
        assert out == {"error": kind, "exit_code": code, "message": result.stderr.strip().removeprefix("kifmerge: error: ")}
    assert "no task or line named 'nosuch'" in cli("profile", "show", "nosuch", code=3).stderr
    assert "is a file; give the model's folder" in cli("base", "add", "b2", line["parity"], code=2).stderr
    assert cli("show", "nosuch", code=3).stdout == "", "without --json stdout stays empty"
    assert cli("--version").stdout.strip() == f"kifmerge {__import__('kifmerge').__version__}"


def test_click_usage_errors_are_one_line_and_json_too(cli, line):
    """A missing argument, an unknown option, a value of the wrong type or an unknown command fail as every
    other error: one `kifmerge: error:` line naming the problem and where the help is, exit 2, and with --json
    the error object on stdout."""
    for args, says in ((["fuse"], "Missing argument"), (["fuse", "t", "--into", "main", "--grace", "1"], "No such option: --grace"),
                       (["fuse", "t", "--into", "main", "--alpha", "abc"], "Invalid value for '--alpha'"),
                       (["nosuch"], "No such command 'nosuch'"), (["base", "nosuch"], "No such command 'nosuch'")):
        result = cli(*args, code=2)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("kifmerge: error: ") and says in result.stderr
        assert "--help`)" in result.stderr and result.stdout == ""
        out = json.loads(cli(*args, "--json", code=2).stdout)
        assert out["error"] == "usage" and out["exit_code"] == 2 and says in out["message"]


def test_help_lists_each_command_on_unbroken_lines():
    """`kifmerge --help` and each group's --help list every command with the first paragraph of its
    docstring as one flowing text: on a terminal wide enough, one line, never broken where the source
    wraps (Typer's rich help kept those breaks, so rows stopped mid-sentence)."""
    import inspect

    from kifmerge.cli.runtime import app as root

    groups = [([], root)] + [([g.name], g.typer_instance) for g in root.registered_groups]
    for prefix, group in groups:
        shown = invoke(*prefix, "--help", env={"COLUMNS": "400"}).stdout
        for info in group.registered_commands:
            summary = " ".join(inspect.getdoc(info.callback).split("\n\n")[0].split())
            assert summary in shown, f"{' '.join(prefix + [info.name or info.callback.__name__])}: {summary!r} not on one line"


def test_every_help_page_shows_its_texts_whole():
    """Each command's --help shows its whole docstring and every option's help, word for word: rich
    markup must not eat a bracketed word (as it ate `report`'s `R[version][task]`)."""
    import typer.main

    def commands(command, path: list[str]):
        if hasattr(command, "commands"):  # a group (Typer vendors its own click: no isinstance check)
            for name, sub in command.commands.items():
                yield from commands(sub, path + [name])
        else:
            yield path, command

    pages = list(commands(typer.main.get_command(app), []))
    assert len(pages) > 20 and ["profile", "show"] in [path for path, _ in pages]
    for path, command in pages:
        shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", invoke(*path, "--help", env={"COLUMNS": "1000"}).stdout).split())
        for text in [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]:
            for paragraph in filter(None, (" ".join(p.split()) for p in text.split("\n\n"))):
                assert paragraph in shown, f"kifmerge {' '.join(path)} --help: {paragraph!r} not shown whole"
