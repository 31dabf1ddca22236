"""Aliases (`LINE@champion`) resolved by every command that takes a version, their moves in the
events log, and `rollback` (a new version with an old version's blobs, which the next fuse
continues from), all through the CLI."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LORA_TARGETS, Cli, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups

HOT = {"t1": {0, 1, 2}, "t2": {2, 3, 4}, "t3": {5, 6, 7}}  # designed important units per task


def build_world(root: Path, llama_dir: Path) -> dict:
    """A registry with base `llama`, LoRA tasks t1, t2, t3 (designed profiles) and line `main`
    = v1 (t1), v2 (t2 fused with kif at top = 3 units)."""
    cli = Cli(root / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    groups = None
    for seed, task in enumerate(HOT, start=1):
        adapter = make_lora(llama_dir, root / task, seed, LORA_TARGETS)
        groups = groups or unit_groups(adapter, "lora")
        profile = write_profile(root / f"{task}.safetensors", designed_scores(groups, HOT[task], 1.0 + seed)[0], "lora-rank")
        cli("add-task", task, adapter, "--base", "llama", "--profile", profile)
    top = str(3 / sum(n for _, n in groups))
    cli("fuse", "t1", "--into", "main", "--method", "kif", "--top", top)
    cli("fuse", "t2", "--into", "main", "--method", "kif", "--top", top)
    return {"registry": root / "registry", "top": top, "groups": groups, "root": root}


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir) -> dict:
    return build_world(tmp_path_factory.mktemp("aliases"), llama_dir)


@pytest.fixture
def wcli(world, tmp_path) -> Cli:
    """A private copy of the world's registry."""
    shutil.copytree(world["registry"], tmp_path / "registry")
    return Cli(tmp_path / "registry")


def adapter_weights(cli: Cli, ref: str, out: Path) -> dict[str, torch.Tensor]:
    cli("export", ref, out)
    return load_file(out / "adapter_model.safetensors")


def test_alias_set_move_rm_and_history(wcli):
    created = wcli.json("alias", "set", "main@v1", "champion")
    assert created == {"alias": "main@champion", "line": "main", "name": "champion", "version": "main@v1", "number": 1,
                       "previous": None, "changed": True, "updated": created["updated"]}
    assert isinstance(created["updated"], str)
    assert wcli.json("show", "main@v1")["aliases"] == ["champion"]
    assert wcli.json("show", "main")["aliases"] == {"champion": "v1"}

    moved = wcli.json("alias", "set", "main", "champion")  # LINE = the newest version
    assert (moved["version"], moved["previous"], moved["changed"]) == ("main@v2", "v1", True)
    again = wcli.json("alias", "set", "main@v2", "champion")
    assert again["changed"] is False
    wcli("alias", "set", "main@champion", "staging")  # an alias may name another alias's version

    listed = wcli.json("alias", "list", "main")
    assert [(a["alias"], a["version"]) for a in listed] == [("main@champion", "main@v2"), ("main@staging", "main@v2")]
    assert all(set(a) == {"alias", "line", "name", "version", "number", "updated"} for a in listed)
    versions = {v["version"]: v["aliases"] for v in wcli.json("list", "versions")}
    assert versions == {"main@v1": [], "main@v2": ["champion", "staging"]}
    assert [v["aliases"] for v in wcli.json("history", "main")] == [[], ["champion", "staging"]]
    assert "champion" in wcli("list", "versions").stdout

    removed = wcli.json("alias", "rm", "main@staging")
    assert (removed["removed"], removed["version"]) == (True, "main@v2")
    events = wcli.json("history", "main", "--events")
    assert all(set(e) == {"id", "ts", "action", "subject", "details"} for e in events)
    moves = [(e["action"], e["subject"], e["details"]["from"], e["details"]["to"]) for e in events if e["action"].startswith("alias")]
    assert moves == [("alias.set", "main@champion", None, 1), ("alias.set", "main@champion", 1, 2),
                     ("alias.set", "main@staging", None, 2), ("alias.rm", "main@staging", 2, None)]
    assert [e["subject"] for e in events if e["action"] == "fuse"] == ["main@v1", "main@v2"]
    assert "alias.set" in wcli("history", "main", "--events").stdout
    assert [a["alias"] for a in wcli.json("alias", "list")] == ["main@champion"]


@pytest.mark.parametrize("args,code,message", [
    (["alias", "set", "main@v1", "v12"], 2, "looks like a version"),
    (["alias", "set", "main@v1", "V3"], 2, "looks like a version"),
    (["alias", "set", "main@v1", "bad/name"], 2, "invalid alias name"),
    (["alias", "set", "main@v1", "a b"], 2, "invalid alias name"),
    (["alias", "set", "main@v9", "champion"], 3, "main@v9 not found"),
    (["alias", "set", "nosuch@v1", "champion"], 3, "line 'nosuch' not found"),
    (["alias", "rm", "main@champion"], 3, "no alias 'champion'"),
    (["alias", "rm", "main@v1"], 2, "LINE@NAME"),
    (["alias", "list", "nosuch"], 3, "line 'nosuch' not found"),
    (["show", "main@champion"], 3, "no alias 'champion'"),
    (["diff", "main@v1", "main@champion"], 3, "no alias 'champion'"),
    (["rollback", "main", "--to", "champion"], 3, "no alias 'champion'"),
    (["show", "main@bad/ref"], 2, "LINE@ALIAS"),
])
def test_alias_errors_are_clear_and_change_nothing(wcli, args, code, message):
    before = wcli.json("history", "main", "--events")
    lines = [line for line in wcli(*args, code=code).stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kifmerge: error:") and message in lines[0], lines
    assert wcli.json("history", "main", "--events") == before


def _export(cli, ref, tmp):
    return cli.json("export", ref, tmp / "out")["version"]


def _eval(cli, ref, tmp):
    data = write_jsonl(tmp / "vowel.jsonl", task_records("vowel", 2))
    return cli.json("eval", ref, "--data", f"vowel={data}", "--max-examples", "2", "--max-new-tokens", "2")["version"]


COMMANDS = {  # command → the version it acted on, given a reference
    "show": lambda cli, ref, tmp: cli.json("show", ref)["version"],
    "export": _export,
    "eval": _eval,
    "diff-from": lambda cli, ref, tmp: cli.json("diff", ref, "main@v2")["from"],
    "diff-to": lambda cli, ref, tmp: cli.json("diff", "main@v2", ref)["to"],
    "rollback": lambda cli, ref, tmp: f"main@v{cli.json('rollback', 'main', '--to', ref)['params']['to']}",
    "alias-set": lambda cli, ref, tmp: cli.json("alias", "set", ref, "other")["version"],
    "profile-show": lambda cli, ref, tmp: cli.json("profile", "show", ref)["version"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_version_reference_takes_an_alias(wcli, tmp_path, command):
    wcli("alias", "set", "main@v1", "champion")  # not the head (v2): resolving must not fall back to it
    assert COMMANDS[command](wcli, "main@champion", tmp_path) == "main@v1"


@pytest.mark.parametrize("command", ["export", "diff-from", "diff-to", "alias-set"])
def test_a_bare_line_means_its_newest_version(wcli, tmp_path, command):
    wcli("alias", "set", "main@v1", "champion")
    assert COMMANDS[command](wcli, "main", tmp_path) == "main@v2"
    assert wcli.json("show", "main")["head"] == "v2"  # `show LINE` shows the line, with its head


def test_rollback_then_fuse_continues_from_the_rolled_back_weights(wcli, world, tmp_path):
    v1 = wcli.json("show", "main@v1")
    v3 = wcli.json("rollback", "main", "--to", "v1")
    assert {k: v3[k] for k in ("version", "parent", "task", "method", "params", "to")} == \
        {"version": "main@v3", "parent": "v2", "task": None, "method": "rollback", "params": {"to": 1}, "to": "main@v1"}
    shown = wcli.json("show", "main@v3")
    assert (shown["weights"], shown["profile_blob"]) == (v1["weights"], v1["profile_blob"])
    w1, w2 = adapter_weights(wcli, "main@v1", tmp_path / "v1"), adapter_weights(wcli, "main@v2", tmp_path / "v2")
    w3 = adapter_weights(wcli, "main@v3", tmp_path / "v3")
    assert w3.keys() == w1.keys() and all(torch.equal(w3[k], w1[k]) for k in w1)
    assert any(not torch.equal(w2[k], w1[k]) for k in w1), "v2 must differ from v1 for this test to mean anything"

    v4 = wcli.json("fuse", "t3", "--into", "main", "--method", "kif", "--top", world["top"])
    assert (v4["version"], v4["parent"], v4["method"]) == ("main@v4", "v3", "kif")
    # the same fuse onto a line whose head is t1 as it is: what v4 must equal
    wcli("fuse", "t1", "--into", "ref")
    wcli("fuse", "t3", "--into", "ref", "--method", "kif", "--top", world["top"])
    w4, expected = adapter_weights(wcli, "main@v4", tmp_path / "v4"), adapter_weights(wcli, "ref@v2", tmp_path / "ref")
    assert all(torch.equal(w4[k], expected[k]) for k in expected)
    # and not what fusing t3 onto v2 gives
    wcli("fuse", "t3", "--into", "main", "--method", "kif", "--top", world["top"], "--again")  # v5 = t3 onto v4; then roll back to v2, fuse again
    wcli("rollback", "main", "--to", "v2")
    wcli("fuse", "t3", "--into", "main", "--method", "kif", "--top", world["top"])
    onto_v2 = adapter_weights(wcli, "main@v7", tmp_path / "v7")
    assert any(not torch.equal(onto_v2[k], w4[k]) for k in w4)
    assert [h["method"] for h in wcli.json("history", "main")] == ["initial", "kif", "rollback", "kif", "kif", "rollback", "kif"]
    assert [e["action"] for e in wcli.json("history", "main", "--events") if e["action"] in ("fuse", "rollback")] == \
        ["fuse", "fuse", "rollback", "fuse", "fuse", "rollback", "fuse"]
    wcli("verify", "--deep")


def test_rollback_refusals(wcli):
    assert "already the head" in wcli("rollback", "main", "--to", "v2", code=2).stderr
    assert "already the head" in wcli("rollback", "main", "--to", "main@v2", code=2).stderr
    wcli("rollback", "main", "--to", "v1")
    assert "already holds the weights and profile of main@v1" in wcli("rollback", "main", "--to", "v1", code=2).stderr
    assert "main@v9 not found" in wcli("rollback", "main", "--to", "v9", code=3).stderr
    assert "another line" in wcli("rollback", "main", "--to", "other@v1", code=2).stderr
    assert "line 'nosuch' not found" in wcli("rollback", "nosuch", "--to", "v1", code=3).stderr
    assert [h["number"] for h in wcli.json("history", "main")] == [1, 2, 3]


def test_concurrent_rollbacks_and_fuses_keep_versions_gapless(wcli, world):
    """Rollbacks read the head inside their write transaction; fuses rebase: numbers stay gapless."""
    from kifmerge import api
    from kifmerge.errors import UsageError

    results, errors = [], []

    def job(kind: str, target: str) -> None:
        try:
            if kind == "rollback":
                results.append(api.rollback("main", target, registry=wcli.registry))
            else:
                results.append(api.fuse("t3", "main", method="kif", top=float(world["top"]), again=True, registry=wcli.registry))
        except UsageError as exc:  # rolling back to what the head already holds: refused, nothing written
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(f"UNEXPECTED {exc!r}")

    jobs = [("rollback", "v1"), ("fuse", ""), ("rollback", "v2"), ("fuse", ""), ("rollback", "v1"), ("rollback", "v2")]
    threads = [threading.Thread(target=job, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [e for e in errors if e.startswith("UNEXPECTED")], errors
    numbers = sorted(r["number"] for r in results)
    assert numbers == list(range(3, 3 + len(results))) and len(results) >= 3  # both fuses and one rollback to v1 always land
    history = wcli.json("history", "main")
    assert [h["number"] for h in history] == list(range(1, 3 + len(results)))
    assert all(h["parent"] == f"v{h['number'] - 1}" for h in history[1:])


def test_after_a_rollback_the_line_its_card_and_its_report_name_what_the_head_holds(wcli, tmp_path, monkeypatch):
    """Rolled back to v1, the head holds t1 only: `show LINE`, `list lines` and the exported model card say
    so (not t1, t2), and the report names the row as the rollback it is, not as the base."""
    from kifmerge import evaluation

    wcli("rollback", "main", "--to", "v1")
    assert wcli.json("show", "main")["tasks"] == ["t1"]
    assert [line["tasks"] for line in wcli.json("list", "lines") if line["name"] == "main"] == [["t1"]]
    wcli("export", "main", tmp_path / "card")
    assert "Tasks learned, in order: t1." in (tmp_path / "card" / "README.md").read_text()
    wcli("export", "main@v2", tmp_path / "card2")
    assert "Tasks learned, in order: t1, t2." in (tmp_path / "card2" / "README.md").read_text()

    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: ["odd"] * len(prompts))
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 4))
    for number in range(4):
        wcli("eval", f"main@v{number}", "--data", f"t1={data}", "--max-examples", "4")
    report = wcli.json("report", "main", "--tasks", "t1")
    assert report["fused"] == [None, "t1", "t2", None] and report["made_by"] == [None, "initial", "kif", "rollback to v1"]
    shown = wcli("report", "main", "--tasks", "t1").stdout
    assert "(rollback to v1)" in shown and shown.count("(base)") == 1


def test_add_task_line_records_the_version_named_and_refuses_what_cannot_be_its_start(wcli, world, tmp_path, llama_dir):
    """`--line` names the version a checkpoint was trained from: the head, an older version, an alias, or a line
    not created yet (the base); a version that does not exist, or a line on another base, is refused."""
    from kifmerge.testing import build_llama

    adapter = make_lora(llama_dir, tmp_path / "a", 9, LORA_TARGETS)
    wcli("alias", "set", "main@v1", "first")
    for task, line, recorded in (("h", "main", "main@v2"), ("o", "main@v1", "main@v1"), ("al", "main@first", "main@v1"),
                                 ("n", "newline", "newline@v0")):
        wcli("add-task", task, adapter, "--base", "llama", "--line", line)
        assert wcli.json("show", task)["trained_from"] == recorded, line
    other = build_llama(tmp_path / "other")
    wcli("base", "add", "other", other)
    for line, code, message in (("main@v9", 3, "main@v9 not found"), ("newline@v2", 3, "not found"),
                                ("main@@v1", 2, "invalid version reference")):
        refused = wcli("add-task", "x", adapter, "--base", "llama", "--line", line, code=code)
        assert message in refused.stderr, refused.stderr
    refused = wcli("add-task", "x", adapter, "--base", "other", "--line", "main", code=2)
    assert "is on base 'llama', not 'other'" in refused.stderr
    assert "x" not in {t["name"] for t in wcli.json("list", "tasks")}


def test_a_task_and_a_line_cannot_share_a_name(wcli, tmp_path, llama_dir):
    """`show NAME` reads a task before a line, so a shared name would hide the line: each side refuses the
    other's name (exit 6, one line), `learn` before it trains, and nothing is stored."""
    adapter = make_lora(llama_dir, tmp_path / "a", 11, LORA_TARGETS)
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 8))
    before = (wcli.json("list", "tasks"), wcli.json("list", "lines"))
    for args, message in ((["add-task", "main", adapter, "--base", "llama"], "'main' is a line's name"),
                          (["fuse", "t3", "--into", "t1"], "'t1' is a task's name"),
                          (["learn", "fresh", "--data", data, "--into", "fresh", "--base", "llama"], "'fresh' is a task's name"),
                          (["learn", "fresh", "--data", data, "--into", "t2", "--base", "llama"], "'t2' is a task's name"),
                          (["train", "main", "--data", data, "--line", "main"], "'main' is a line's name")):
        refused = wcli(*args, code=6)
        assert message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, (args, refused.stderr)
    assert (wcli.json("list", "tasks"), wcli.json("list", "lines")) == before
