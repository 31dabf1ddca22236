"""Evaluation and the continual-learning report, through the CLI on tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import task_records
from kifmerge.evaluation import answer_distribution, exact_match, exact_match_cased, per_example, rouge_l, score, summarise


def test_answer_metrics_on_known_predictions():
    assert exact_match("  Science or Technology\n", "science or technology") == 1.0
    assert exact_match("Sports", "World") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(2 * (5 / 6) * (5 / 6) / (10 / 6))
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0
    assert score(["yes", "No ", "maybe"], ["yes", "no", "no"]) == {"exact_match": pytest.approx(2 / 3, abs=1e-6),
                                                                  "exact_match_cased": pytest.approx(1 / 3, abs=1e-6),
                                                                  "rouge_l": pytest.approx(2 / 3, abs=1e-6), "examples": 3}


def test_summaries_of_a_hand_made_matrix():
    R = [[0.1, 0.2, 0.0],   # base
         [0.8, 0.3, 0.1],   # after task 0
         [0.6, 0.9, 0.2],   # after task 1
         [0.5, 0.7, 0.9]]   # after task 2
    L = [0.85, 0.95, 0.9]   # each task's own weights, before any fuse
    result = summarise(R, L)
    assert result["AP"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert result["BWT_vs_learned"] == pytest.approx(((0.5 - 0.85) + (0.7 - 0.95)) / 2)
    assert result["BWT_after_fuse"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert result["fuse_cost"] == pytest.approx(((0.95 - 0.9) + (0.9 - 0.9)) / 2, abs=1e-6)  # the fused tasks 2 and 3
    assert result["FWT"] == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)
    assert "BWT" not in result
    # SeqLoRA-like: the fused diagonal is the learned score, so the two BWTs agree and the fuse costs nothing
    seq = summarise(R, [R[j + 1][j] for j in range(3)])
    assert seq["BWT_vs_learned"] == seq["BWT_after_fuse"] and seq["fuse_cost"] == 0
    assert summarise(R)["BWT_vs_learned"] is None and summarise(R)["fuse_cost"] is None  # no learned scores
    assert summarise(R, [0.85, None, 0.9])["fuse_cost"] is None
    assert summarise(R, [None, 0.95, 0.9])["fuse_cost"] == pytest.approx(0.025), "task 1's own score is not needed"
    assert summarise([[None, None], [0.7, 0.4]]) == {"AP": pytest.approx(0.55), "BWT_vs_learned": None,
                                                     "BWT_after_fuse": None, "fuse_cost": None, "FWT": None}
    assert summarise([[0.1], [None]])["AP"] is None


@pytest.fixture
def line_with_two_versions(cli, parity_line):
    cli("learn", "vowel", "--data", parity_line["vowel"], "--into", "main", "--max-steps", "2")
    return parity_line


def test_eval_stores_scores_and_reuses_them(cli, line_with_two_versions, monkeypatch):
    data = [f"{k}={v}" for k, v in line_with_two_versions.items()]
    first = cli.json("eval", "main@v1", *sum((["--data", d] for d in data), []), "--max-examples", "6", "--max-new-tokens", "3")
    assert first["version"] == "main@v1" and first["settings"] == {"max_examples": 6, "max_new_tokens": 3, "max_length": 256}
    for metrics in first["results"].values():
        assert set(metrics) == {"exact_match", "exact_match_cased", "rouge_l", "examples", "seconds", "reused"}
        assert metrics["examples"] == 6 and 0 <= metrics["exact_match"] <= 1 and not metrics["reused"]

    again = cli.json("eval", "main@v1", *sum((["--data", d] for d in data), []), "--max-examples", "6", "--max-new-tokens", "3")
    assert all(m["reused"] for m in again["results"].values())
    stored = cli.json("show", "main@v1")["evaluations"]
    assert stored["parity"]["exact_match"] == first["results"]["parity"]["exact_match"]
    cli("export", "main@v1", cli.registry.parent / "card")
    card = (cli.registry.parent / "card" / "README.md").read_text()
    assert f"| parity | {stored['parity']['exact_match']:.3f} |" in card

    # known predictions: every answer "odd" → exact match is the share of "odd" references
    from kifmerge import evaluation

    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: ["odd"] * len(prompts))
    forced = cli.json("eval", "main@v1", "--data", data[0], "--max-examples", "6", "--max-new-tokens", "3", "--force")
    expected = sum(r["output"] == "odd" for r in task_records("parity", 6)) / 6
    assert forced["results"]["parity"]["exact_match"] == pytest.approx(expected, abs=1e-6)


def test_report_builds_the_matrix_from_stored_evaluations(cli, line_with_two_versions, tmp_path, monkeypatch):
    from kifmerge import evaluation

    answers = {"v0": "no", "v1": "odd", "v2": "even"}
    current = {}
    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: [current["answer"]] * len(prompts))
    data = sum((["--data", f"{k}={v}"] for k, v in line_with_two_versions.items()), [])
    for version, answer in answers.items():
        current["answer"] = answer
        cli("eval", f"main@{version}", *data, "--max-examples", "8")
    report = cli.json("report", "main")
    parity, vowel = task_records("parity", 8), task_records("vowel", 8, seed=1)

    def share(records, answer):
        return round(sum(r["output"] == answer for r in records) / len(records), 6)

    assert report["tasks"] == ["parity", "vowel"] and report["versions"] == ["v0", "v1", "v2"]
    assert report["fused"] == [None, "parity", "vowel"]
    assert report["matrix"] == [[share(parity, a), share(vowel, a)] for a in answers.values()]
    summaries = ("AP", "BWT_vs_learned", "BWT_after_fuse", "fuse_cost", "FWT")
    assert {k: report[k] for k in summaries} == summarise(report["matrix"], report["learned"]) and "BWT" not in report
    # v1 holds parity's own weights, so its evaluation is parity's learned score; vowel's is not evaluated
    assert report["learned"] == [share(parity, "odd"), None] and report["diagonal"] == [share(parity, "odd"), share(vowel, "even")]
    assert report["BWT_vs_learned"] == report["BWT_after_fuse"] and report["fuse_cost"] is None
    # one label everywhere is visible as such: the final row answers "even" on both tasks
    by_task = {t["task"]: t for t in report["per_task"]}
    assert [t["task"] for t in report["per_task"]] == ["parity", "vowel"]
    assert by_task["vowel"]["predictions"] == [{"answer": "even", "share": 1.0}] and by_task["vowel"]["predictions_other"] == 0
    majority = max(("odd", "even"), key=lambda a: share(parity, a))
    assert by_task["parity"]["majority_answer"] == majority and by_task["parity"]["majority_class"] == share(parity, majority)
    assert by_task["parity"]["final"] == by_task["parity"]["final_exact_match"] == share(parity, "even")
    assert by_task["parity"]["learned"] == share(parity, "odd") and by_task["parity"]["learned_from"] == "main@v1"
    assert by_task["vowel"]["learned"] is None and by_task["parity"]["examples"] == 8
    human = cli("report", "main").stdout
    for words in ("BWT vs learned", "BWT after fuse", "fuse cost", "majority class", f"{100 * share(parity, 'even'):.1f}"):
        assert words in human

    assert report["order"] == "learning"

    # labels that do not name the fused tasks: the matrix, AP, but no BWT/FWT without --tasks
    current["answer"] = "odd"
    cli("eval", "main@v1", "--data", f"other={line_with_two_versions['parity']}", "--max-examples", "8")
    partial = cli.json("report", "main", "--tasks", "other")
    assert partial["order"] == "learning" and partial["matrix"][1] == [share(parity, "odd")]

    missing = cli("report", "main", "--tasks", "parity,nope", code=3)
    assert "nope" in missing.stderr
    pytest.importorskip("matplotlib")
    out = tmp_path / "matrix.png"
    assert cli.json("report", "main", "--png", str(out))["png"] == str(out) and out.stat().st_size > 1000


def test_report_without_a_known_order_gives_no_bwt(cli, line_with_two_versions, monkeypatch):
    from kifmerge import evaluation

    monkeypatch.setattr(evaluation, "generate_answers", lambda model, tok, prompts, **kw: ["odd"] * len(prompts))
    for version in ("v0", "v1", "v2"):
        cli("eval", f"main@{version}", "--data", f"a={line_with_two_versions['vowel']}",
            "--data", f"b={line_with_two_versions['parity']}", "--max-examples", "4")
    report = cli.json("report", "main")
    assert report["tasks"] == ["a", "b"] and report["order"].startswith("unknown")
    assert report["AP"] is not None and report["BWT_after_fuse"] is None and report["FWT"] is None
    assert report["diagonal"] == [None, None] and report["learned"] == [None, None]
    assert cli.json("report", "main", "--tasks", "b,a")["BWT_after_fuse"] is not None


def test_eval_rejects_bad_arguments(cli, line_with_two_versions):
    path = line_with_two_versions["parity"]
    assert "NAME=FILE" in cli("eval", "main", "--data", str(path), code=2).stderr
    assert "not found" in cli("eval", "main@v9", "--data", f"p={path}", code=3).stderr
    assert "not found" in cli("eval", "main", "--data", "p=/nonexistent.json", code=3).stderr


def test_an_evaluation_is_reused_only_on_the_base_it_was_made_on(cli, tmp_path, llama_dir):
    """Two bases of one architecture (the same fingerprint) but other weights, and one adapter registered on
    each: the adapter's weights are the same, the models are not, so neither the scores nor the report's
    learned column may be carried from one base to the other."""
    import shutil

    from conftest import make_lora, model_class, write_jsonl

    other = tmp_path / "other-base"
    model = model_class(llama_dir).from_pretrained(llama_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    model.save_pretrained(other)
    for extra in llama_dir.iterdir():  # tokenizer files
        if not (other / extra.name).exists():
            shutil.copy(extra, other / extra.name)
    adapter = make_lora(llama_dir, tmp_path / "adapter", seed=3, targets=["q_proj", "v_proj"])
    data = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 6))
    cli("base", "add", "llama", llama_dir)
    cli("base", "add", "scaled", other)
    fingerprints = {row["name"]: row["fingerprint"] for row in cli.json("list", "bases")}
    assert fingerprints["llama"] == fingerprints["scaled"]
    for task, base, line in (("parity", "llama", "one"), ("parity2", "scaled", "two")):
        cli("add-task", task, adapter, "--base", base)
        cli("fuse", task, "--into", line)
    assert cli.json("show", "parity")["weights"] == cli.json("show", "parity2")["weights"]

    evaluate = ["--data", f"parity={data}", "--max-examples", "6", "--max-new-tokens", "3"]
    assert not cli.json("eval", "two@v1", *evaluate)["results"]["parity"]["reused"]
    for ref in ("task:parity", "one@v0"):  # the same adapter, or the same fingerprint, on the other base
        assert not cli.json("eval", ref, *evaluate)["results"]["parity"]["reused"], ref
    assert not cli.json("eval", "two@v0", *evaluate)["results"]["parity"]["reused"]
    for ref in ("one@v1", "task:parity2", "task:parity"):  # on its own base an evaluation is reused
        assert cli.json("eval", ref, *evaluate)["results"]["parity"]["reused"], ref
    # the learned column of line two reads an evaluation on its base, not the newer ones of line one's
    assert cli.json("report", "two", "--tasks", "parity")["per_task"][0]["learned_from"] in ("two@v1", "task:parity2")
    assert cli.json("report", "one", "--tasks", "parity")["per_task"][0]["learned_from"] in ("one@v1", "task:parity")
