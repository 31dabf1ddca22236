"""Fair continual-learning metrics: a task's own weights evaluated (`eval task:NAME`), BWT
against learned, the fuse's own cost, majority class and predicted answers, case-sensitive
exact match — through the CLI and the Python API on tiny models."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from conftest import make_full, task_records, write_jsonl
from kifmerge import api
from kifmerge.evaluation import answer_distribution, exact_match, exact_match_cased, per_example, score

ANSWERS = ["odd", "even", "yes", "no"]


def answers_of_the_weights(model, tokenizer, prompts, **kwargs):
    """Stands in for greedy generation: answers that depend only on the model's weights (a
    seeded draw from a hash of every parameter), so identical weights answer identically and
    different weights differently, like a real model, but with non-trivial scores."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode() + param.detach().to(torch.float32).contiguous().numpy().tobytes())
    rng = random.Random(digest.hexdigest())
    return [rng.choice(ANSWERS) for _ in prompts]


@pytest.fixture
def two_task_line(cli, tmp_path, llama_dir, monkeypatch):
    from kifmerge import evaluation

    data = {"parity": write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 12)),
            "vowel": write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 12, seed=1))}
    cli("base", "add", "llama", llama_dir)
    cli("learn", "parity", "--data", data["parity"], "--into", "main", "--base", "llama", "--max-steps", "2", "--lr", "0.05")
    cli("learn", "vowel", "--data", data["vowel"], "--into", "main", "--max-steps", "2", "--lr", "0.05")
    monkeypatch.setattr(evaluation, "generate_answers", answers_of_the_weights)
    return data


def _data_args(data):
    return [arg for label, path in data.items() for arg in ("--data", f"{label}={path}")]


def _stored(cli, line, number, label):
    """One evaluation row as the registry stores it (decoded), read straight from SQLite."""
    with sqlite3.connect(cli.registry / "kifmerge.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("select * from evaluations where line = ? and number = ? and label = ? order by id desc",
                         [line, number, label]).fetchone()
    return {**dict(row), "metrics": json.loads(row["metrics"])}


def test_report_learned_bwt_and_fuse_cost_from_task_evaluations(cli, two_task_line):
    args = [*_data_args(two_task_line), "--max-examples", "10"]
    first = cli.json("eval", "task:parity", *args)
    assert first["version"] == "task:parity" and first["task"] == "parity"
    assert not any(r["reused"] for r in first["results"].values())
    # the line's first version is the task's weights as they are: its evaluation is reused
    v1 = cli.json("eval", "main@v1", *args)
    assert all(r["reused"] for r in v1["results"].values())
    assert v1["results"]["parity"]["exact_match"] == first["results"]["parity"]["exact_match"]
    for ref in ("main@v0", "main@v2"):
        assert not any(r["reused"] for r in cli.json("eval", ref, *args)["results"].values())

    R = [[_stored(cli, "main", n, t)["metrics"]["exact_match"] for t in ("parity", "vowel")] for n in (0, 1, 2)]
    L_parity = _stored(cli, "task:parity", 0, "parity")["metrics"]["exact_match"]
    assert _stored(cli, "task:parity", 0, "parity")["subject"] == _stored(cli, "main", 1, "parity")["subject"]

    partial = cli.json("report", "main")
    assert partial["learned"] == [L_parity, None] and partial["diagonal"] == [R[1][0], R[2][1]]
    assert partial["BWT_vs_learned"] == pytest.approx(R[2][0] - L_parity, abs=1e-6)
    assert partial["fuse_cost"] is None  # vowel's own weights are not evaluated yet

    vowel = cli.json("eval", "task:vowel", *args)
    assert not any(r["reused"] for r in vowel["results"].values())  # v2 is fused: other weights
    L = [L_parity, _stored(cli, "task:vowel", 0, "vowel")["metrics"]["exact_match"]]
    report = cli.json("report", "main")
    assert report["tasks"] == ["parity", "vowel"] and report["matrix"] == R
    assert report["learned"] == L and report["diagonal"] == [R[1][0], R[2][1]]
    assert report["AP"] == pytest.approx((R[2][0] + R[2][1]) / 2, abs=1e-6)
    assert report["BWT_vs_learned"] == pytest.approx(R[2][0] - L[0], abs=1e-6)
    assert report["BWT_after_fuse"] == pytest.approx(R[2][0] - R[1][0], abs=1e-6)
    assert report["fuse_cost"] == pytest.approx(L[1] - R[2][1], abs=1e-6)  # over the fused tasks: vowel only
    assert L[0] == pytest.approx(R[1][0]), "the first task is not fused: v1 is its own weights"
    assert report["FWT"] == pytest.approx(R[1][1] - R[0][1], abs=1e-6)
    assert "BWT" not in report

    parity = report["per_task"][0]
    assert parity["task"] == "parity" and parity["learned_task"] == "parity" and parity["learned_from"] in ("task:parity", "main@v1")
    assert (parity["final"], parity["diagonal"], parity["learned"]) == (R[2][0], R[1][0], L[0])
    assert parity["final_exact_match"] == R[2][0] and parity["learned_exact_match"] == L[0] and parity["learned_same_data"]
    assert report["per_task"][1]["learned_from"] == "task:vowel"

    # the final row's answer distribution and majority class, by hand from the stored predictions
    pairs = json.loads((cli.registry / "blobs" / (p := _stored(cli, "main", 2, "parity")["predictions"])[:2] / p[2:]).read_bytes())
    outputs, predicted = [x["output"] for x in pairs], [x["prediction"] for x in pairs]
    top, count = Counter(outputs).most_common(1)[0]
    assert parity["majority_class"] == pytest.approx(count / 10, abs=1e-6) and parity["majority_answer"] == top
    assert {p["answer"]: p["share"] for p in parity["predictions"]} == {a: pytest.approx(k / 10, abs=1e-6) for a, k in Counter(predicted).items()}
    assert parity["predictions_other"] == 0 and parity["examples"] == 10

    # per-example scores (Python API; `--examples` with --json) for paired bootstrap
    detailed = api.report("main", examples=True, registry=cli.registry)
    assert set(detailed["examples"]) == {"final", "diagonal", "learned"}
    assert detailed["examples"]["final"][0] == per_example("exact_match", predicted, outputs)
    for kind, values in (("final", R[2]), ("diagonal", report["diagonal"]), ("learned", L)):
        scores = detailed["examples"][kind]
        assert [len(s) for s in scores] == [10, 10]
        assert [round(sum(s) / len(s), 6) for s in scores] == values
    assert cli.json("report", "main", "--examples")["examples"] == detailed["examples"]
    assert "examples" not in report
    assert "fuse cost" in cli("report", "main").stdout


def test_eval_task_weights_full_checkpoint_and_missing_task(cli, tmp_path, llama_dir, monkeypatch):
    from kifmerge import evaluation

    cli("base", "add", "llama", llama_dir)
    checkpoint = make_full(llama_dir, tmp_path / "full", seed=3)
    cli("add-task", "nudged", checkpoint, "--base", "llama")
    seen = {}

    def capture(model, tokenizer, prompts, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return ["odd"] * len(prompts)

    monkeypatch.setattr(evaluation, "generate_answers", capture)
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 6))
    result = cli.json("eval", "task:nudged", "--data", f"parity={data}")
    assert result["results"]["parity"]["exact_match"] == pytest.approx(sum(r["output"] == "odd" for r in task_records("parity", 6)) / 6, abs=1e-6)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:  # the task's own weights, not the base's
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(seen[name], f.get_tensor(name))
    assert cli.json("eval", "task:nudged", "--data", f"parity={data}")["results"]["parity"]["reused"]
    assert "task 'nope' not found" in cli("eval", "task:nope", "--data", f"parity={data}", code=3).stderr
    with pytest.raises(Exception, match="not found"):
        api.evaluate("task:nope", {"parity": data}, registry=cli.registry)


def test_cased_exact_match_and_majority_class_on_crafted_predictions():
    predictions, references = ["P", "p", " p ", "Q", "q"], ["p", "p", "p", "Q", "Q"]
    metrics = score(predictions, references)
    assert metrics["exact_match"] == 1.0  # case-folded: P/p and q/Q match each other
    assert metrics["exact_match_cased"] == pytest.approx(3 / 5, abs=1e-6)
    assert exact_match("P", "p") == 1.0 and exact_match_cased("P", "p") == 0.0 and exact_match_cased(" P\n", "P") == 1.0
    assert per_example("exact_match_cased", predictions, references) == [0.0, 1.0, 1.0, 1.0, 0.0]

    folded = answer_distribution(predictions, references)
    assert folded["majority_answer"] == "p" and folded["majority_class"] == pytest.approx(3 / 5, abs=1e-6)
    assert folded["predictions"] == [{"answer": "p", "share": 0.6}, {"answer": "q", "share": 0.4}]
    cased = answer_distribution(["P", "P", "P", "a", "b", "c", "d", "e"], ["P", "p", "p", "p", "x", "x", "x", "y"], cased=True)
    assert cased["majority_answer"] in ("p", "x") and cased["majority_class"] == pytest.approx(3 / 8, abs=1e-6)
    assert cased["predictions"][0] == {"answer": "P", "share": pytest.approx(3 / 8, abs=1e-6)}
    assert len(cased["predictions"]) == 5 and cased["predictions_other"] == pytest.approx(1 / 8, abs=1e-6)


def test_cased_metric_recomputed_for_evaluations_stored_before_it(cli, two_task_line, monkeypatch):
    from kifmerge import evaluation

    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: ["Odd"] * len(prompts))
    args = ["--data", f"parity={two_task_line['parity']}", "--max-examples", "8"]
    for ref in ("main@v1", "main@v2"):
        cli("eval", ref, *args)
    with sqlite3.connect(cli.registry / "kifmerge.db") as db:  # as an older kifmerge stored them
        for row_id, metrics in db.execute("select id, metrics from evaluations").fetchall():
            old = {k: v for k, v in json.loads(metrics).items() if k != "exact_match_cased"}
            db.execute("update evaluations set metrics = ? where id = ?", [json.dumps(old, sort_keys=True), row_id])
    share_odd = round(sum(r["output"] == "odd" for r in task_records("parity", 8)) / 8, 6)
    folded = cli.json("report", "main", "--tasks", "parity")
    cased = cli.json("report", "main", "--tasks", "parity", "--metric", "exact_match_cased")
    assert folded["matrix"][1:] == [[share_odd], [share_odd]]
    assert cased["matrix"][1:] == [[0.0], [0.0]] and cased["per_task"][0]["final_exact_match"] == 0.0
    assert cased["per_task"][0]["predictions"] == [{"answer": "Odd", "share": 1.0}]
    again = cli.json("eval", "main@v2", *args)["results"]["parity"]
    assert again["reused"] and again["exact_match_cased"] == 0.0 and again["exact_match"] == share_odd
    assert "exact_match_cased" in cli("report", "main", "--metric", "nope", code=2).stderr

    # predicted answers are model text: shown as written, never read as rich markup
    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: ["[/bold] odd [red]"] * len(prompts))
    cli("eval", "main@v2", *args, "--force")
    assert "[/bold]" in cli("report", "main", "--tasks", "parity").stdout
    assert cli.json("report", "main", "--tasks", "parity")["per_task"][0]["predictions"] == [{"answer": "[/bold] odd [red]", "share": 1.0}]
