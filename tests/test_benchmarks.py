"""The benchmark scripts keep working: each answers --help, imports nothing but `common` from its
folder (no sys.path edits, nothing from tests/), and every one that can run without SmolLM2 runs
end to end on tiny models, writing its results to a temporary folder (never benchmarks/results/).
Each run is a subprocess started as the READMEs start it: `python benchmarks/NAME.py` from the
repository root."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, Cli, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


def run(script: str, *args) -> str:
    """Run a benchmark script; returns its stdout (fails the test with its stderr's tail)."""
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def record(path: Path, benchmark: str) -> dict:
    """A result file, checked for the record every result carries."""
    result = json.loads(path.read_text())
    assert result["benchmark"] == benchmark
    assert result["command"].startswith(f"python benchmarks/{benchmark}.py ")
    assert result["cpus"] >= 1 and result["when"]
    # which machine measured it: wall times of two CPUs differ up to 4× (an AVX2 EPYC, an AMX Xeon)
    import torch

    assert result["machine"].endswith(f"{result['cpus']} CPUs, {torch.backends.cpu.get_cpu_capability()}")
    assert "git_commit" in result and "load_average" in result
    return result


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    assert run(script, "--help").startswith("usage:")


@pytest.mark.parametrize("script", [*SCRIPTS, "common.py"])
def test_scripts_share_code_through_common_only(script):
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "benchmarks" / script).read_text())):
        assert not (isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys")
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    siblings = {Path(s).stem for s in SCRIPTS}
    assert not imported & (siblings | {"conftest", "tests"})


def test_importance_bandwidth(tmp_path):
    run("importance_bandwidth.py", "--layers", 1, "--vocab", 1024, "--repeats", 2, "--results", tmp_path)
    result = record(tmp_path / "importance_bandwidth.json", "importance_bandwidth")
    assert result["parameters"] == 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3 + 1024 * 576  # one layer, the embedding
    assert all(result[k] > 0 for k in ("copy_ms", "copy_GBps", "update_ms", "update_floor_ms"))
    assert (tmp_path / "importance_bandwidth.md").read_text().startswith("# importance_bandwidth")


@pytest.mark.slow
def test_importance_overhead_on_the_tiny_llama(tmp_path):
    run("importance_overhead.py", "--only", "tiny-lora", "--steps", 1, "--repeats", 1, "--results", tmp_path)
    [row] = record(tmp_path / "importance_overhead.json", "importance_overhead")["rows"]
    assert row["case"] == "tiny-lora" and row["steps"] == 4 and row["trainable_parameters"] > 0
    assert row["step_s_off"] > 0 and row["step_s_on"] > 0 and row["callback_ms"] > 0
    assert row["peak_rss_mb_on"] > 0 and row["peak_rss_mb_off"] > 0


def test_train_step_on_the_tiny_llama(tmp_path, llama_dir):
    run("train_step.py", "--model", llama_dir, "--steps", 2, "--rounds", 2, "--precisions", "fp32", "--batch-size", 2,
        "--max-length", 48, "--threads", 1, "--out", tmp_path / "train_step")
    result = record(tmp_path / "train_step.json", "train_step")
    [row] = result["rows"]
    assert row["precision"] == "fp32" and row["steps_timed_per_recipe"] == 2 * 2  # the first step of each round dropped
    assert row["wall"]["step_ms_kifmerge"] > 0 and row["cpu"]["step_ms_plain"] > 0 and row["callback_ms"] > 0
    # the same batches, the same initial adapter: both recipes compute the same losses
    assert row["max_loss_difference"] < 1e-3
    assert result["settings"]["model"] == str(llama_dir.resolve())
    assert f"({llama_dir.name}, LoRA r=8)" in (tmp_path / "train_step.md").read_text()

    # what the default's Gram recording costs: kifmerge against itself with --no-gram; the hooks
    # only read the inputs, so both train the same adapter, bit for bit
    run("train_step.py", "--model", llama_dir, "--steps", 2, "--rounds", 2, "--precisions", "fp32", "--batch-size", 2,
        "--max-length", 48, "--threads", 1, "--against", "no-gram", "--out", tmp_path / "gram_overhead")
    [row] = record(tmp_path / "gram_overhead.json", "train_step")["rows"]
    assert row["wall"]["step_ms_no_gram"] > 0 and row["gram_modules"] == 4 and row["gram_trace_sum"] > 0
    assert row["max_loss_difference"] == 0 and row["adapter_max_abs_difference"] == 0
    assert "| precision | clock | kifmerge step (ms) | no-gram step (ms) |" in (tmp_path / "gram_overhead.md").read_text()


def test_eval_speed_on_the_tiny_llama(tmp_path, llama_dir):
    run("eval_speed.py", "--model", llama_dir, "--examples", 4, "--chunk", 2, "--batch-size", 4, "--max-length", 48,
        "--max-new-tokens", 2, "--label-stop", "--threads", 1, "--out", tmp_path / "eval_speed")
    [task] = record(tmp_path / "eval_speed.json", "eval_speed")["tasks"]
    assert task["task"] == "agnews" and task["examples"] == 4
    assert set(task["variants"]) == {"before fp32", "after fp32", "before bf16", "after bf16", "after fp32, label stop"}
    assert all(v["examples_per_s_wall"] > 0 and 0 <= v["exact_match"] <= 1 for v in task["variants"].values())
    # kifmerge's loop answers as the loop before it did (float32)
    assert task["variants"]["after fp32"]["identical_to_before_fp32"] == 4


def test_fuse_memory_on_the_tiny_llama(tmp_path, llama_dir):
    run("fuse_memory.py", "--model", llama_dir, "--repeats", 1, "--work", tmp_path, "--results", tmp_path)
    result = record(tmp_path / "fuse_memory.json", "fuse_memory")
    assert [row["method"] for row in result["rows"]] == ["kif", "ties"]
    assert all(row["wall_s"] > 0 and row["peak_rss_mb"] > 0 for row in result["rows"])
    assert result["checkpoint_mb"] > 0 and result["imports_rss_mb"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # the scratch checkpoints are gone


def test_fuse_speed_at_the_tiny_size(tmp_path):
    run("fuse_speed.py", "--sizes", "tiny", "--repeats", 1, "--mergekit", "", "--work", tmp_path / "work", "--results", tmp_path)
    result = record(tmp_path / "fuse_speed.json", "fuse_speed")
    tiny = result["sizes"]["tiny"]
    assert set(tiny["median"]) == {"floor", "kif", "ties"} and tiny["input_shards"] > 1
    assert all(m["wall_s"] > 0 and m["peak_rss_mb"] > 0 for m in tiny["median"].values())
    assert tiny["git_commit"] and tiny["ratios"]["kif"]["wall_vs_floor"] > 0


@pytest.mark.slow
def test_registry_scale_at_the_smallest_size(tmp_path):
    run("registry_scale.py", "--tasks", 64, "--versions", 60, "--lines", 1, "--repeats", 1,
        "--work", tmp_path / "work", "--results", tmp_path)
    result = record(tmp_path / "registry_scale.json", "registry_scale")
    assert result["build"]["counts"]["tasks"] == 64 and result["build"]["counts"]["versions"] == 60
    run_ = result["runs"]["current"]
    assert run_["verify"]["ok"] and run_["inprocess"]["heavy_modules_after_reads"] == []
    assert all(c["wall_s"] > 0 for c in run_["commands"].values())


def test_kif_diagnostics_on_a_two_task_line(tmp_path, llama_dir):
    cli = Cli(tmp_path / "work" / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    for seed in (1, 2):
        adapter = make_lora(llama_dir, tmp_path / f"t{seed}", seed, LORA_TARGETS)
        profile = write_profile(tmp_path / f"p{seed}.safetensors",
                                designed_scores(unit_groups(adapter, "lora"), {seed, 2 * seed + 3}, 1.0)[0], "lora-rank")
        cli("add-task", f"t{seed}", adapter, "--base", "llama", "--profile", profile)
        cli("fuse", f"t{seed}", "--into", "kif")
    run("kif_diagnostics.py", "--work", tmp_path / "work", "--name", "tiny", "--results", tmp_path)
    [row] = record(tmp_path / "kif_diagnostics_tiny_kif.json", "kif_diagnostics")["rows"]
    assert row["version"] == "kif@v2" and row["task"] == "t2"
    assert row["both"] + row["old_only"] + row["new_only"] + row["neither"] == row["units"] > 0
    assert row["factor_space_bias"]["max_vs_fused_product"] >= 0


def test_kif_diagnostics_reads_unit_and_element_scores_apart(tmp_path, llama_dir):
    """A line trained here: its profiles hold element scores beside the unit scores; the unit rows
    count the 16 rank units only, and the element rows rank-correlate every factor element."""
    cli = Cli(tmp_path / "work" / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    for n, kind in enumerate(("parity", "vowel")):
        data = write_jsonl(tmp_path / f"{kind}.jsonl", task_records(kind, 8, seed=n))
        cli("learn", kind, "--data", data, "--into", "kif", "--max-steps", "2", "--lora-r", "4", "--method", "kif",
            *(["--base", "llama"] if n == 0 else []))
    run("kif_diagnostics.py", "--work", tmp_path / "work", "--name", "trained", "--results", tmp_path)
    [row] = record(tmp_path / "kif_diagnostics_trained_kif.json", "kif_diagnostics")["rows"]
    assert row["units"] == 16 and row["elements"] > row["units"]
    assert all(-1 <= row[k] <= 1 for k in ("spearman_elements_old_new", "spearman_elements_new_vs_start_abs"))


def tiny_sequence(tmp_path: Path, dev_examples: int, names: tuple[str, ...] = ("parity", "vowel")) -> Path:
    """A sequence file of small tasks (a name ending in 2 is another draw of the same kind)."""
    data = tmp_path / "data"
    data.mkdir()
    for seed, task in enumerate(names):
        write_jsonl(data / f"{task}.jsonl", task_records(task.rstrip("2"), 8, seed))
        write_jsonl(data / f"{task}-dev.jsonl", task_records(task.rstrip("2"), dev_examples, 10 + seed))
    name = "tiny" if len(names) == 2 else "three"
    sequence = {"name": name, "tasks": [{"name": t, "train": f"{t}.jsonl", "dev": f"{t}-dev.jsonl"} for t in names]}
    (data / "sequence.json").write_text(json.dumps(sequence))
    return data / "sequence.json"


def test_continual_on_the_tiny_llama(tmp_path, llama_dir):
    """The main benchmark end to end on a two-task sequence: trainings, fuses and evaluations, one
    cell per method, the sequence's results assembled from the cells, and the screen of the
    candidates against the rows they have to beat."""
    data = tiny_sequence(tmp_path, 6).parent
    run("continual.py", "--sequence", data / "sequence.json", "--model", llama_dir, "--methods", "seq,regmean,linear-0.5,kif-element,regmean-diagonal", "--steps", 2,
        "--warmup", 0, "--batch-size", 2, "--max-length", 48, "--train-examples", 8, "--eval-examples", 4,
        "--eval-batch-size", 4, "--max-new-tokens", 2, "--precision", "fp32", "--work", tmp_path / "work", "--results", tmp_path)
    for method in ("seq", "regmean"):
        cell = json.loads((tmp_path / "runs" / "tiny" / "seed42" / f"{method}.json").read_text())
        assert cell["settings"]["model"] == str(llama_dir.resolve()) and cell["settings"]["tasks"] == ["parity", "vowel"]
        assert [len(task) for task in cell["examples"]["final"]] == [4, 4]
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["benchmark"] == "continual" and result["command"].startswith("python benchmarks/continual.py ")
    assert set(result["statistics"]) == {"seq", "regmean", "linear-0.5", "kif-element", "regmean-diagonal", "linear-best"}
    assert 0 <= result["statistics"]["regmean"]["AP"]["value"] <= 1
    assert "AP_minus_default" in result["statistics"]["seq"], "the paired difference from the default method (regmean)"
    assert f"{llama_dir.name}, LoRA r 8" in (tmp_path / "tiny.md").read_text()

    # --compare: two cells side by side (as bf16 and fp32 cells of one method), paired over the same examples
    cells = tmp_path / "runs" / "tiny" / "seed42"
    run("continual.py", "--compare", cells / "seq.json", cells / "regmean.json", "--out", tmp_path / "compare")
    compared = json.loads((tmp_path / "compare.json").read_text())["summaries"]["AP"]
    ap = {m: result["statistics"][m]["AP"]["value"] for m in ("seq", "regmean")}
    assert compared["A"]["value"] == ap["seq"] and compared["B"]["value"] == ap["regmean"]
    assert abs(compared["B_minus_A"]["value"] - (ap["regmean"] - ap["seq"])) < 1e-6
    assert "| AP |" in (tmp_path / "compare.md").read_text()
    other = json.loads((cells / "seq.json").read_text())
    other["settings"]["tasks"] = other["settings"]["tasks"][::-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = subprocess.run([sys.executable, "benchmarks/continual.py", "--compare", cells / "seq.json", tmp_path / "other.json"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "the cells ran other tasks" in refused.stderr

    # cells of two machines: the table says which ran where (their wall times differ up to 4×)
    moved = json.loads((cells / "seq.json").read_text())
    (cells / "seq.json").write_text(json.dumps({**moved, "machine": "another machine"}))
    run("continual.py", "--sequence", data / "sequence.json", "--assemble", "--work", tmp_path / "work", "--results", tmp_path)
    table = (tmp_path / "tiny.md").read_text()
    assert "The cells ran on 2 machines; compare wall times only within one: " in table and "another machine (seq/42); " in table
    assert json.loads((tmp_path / "tiny.json").read_text())["statistics"] == result["statistics"]

    run("continual.py", "--sequence", data / "sequence.json", "--screen", "--results", tmp_path)
    screen = json.loads((tmp_path / "screen-tiny.json").read_text())["rows"]
    assert screen["kif-element"]["status"] == "screened" and set(screen["kif-element"]["versus"]) == {"linear-0.5", "regmean"}
    versus = screen["kif-element"]["versus"]["linear-0.5"]["AP"]
    assert versus["low"] <= versus["value"] <= versus["high"] and versus["called"] in ("higher", "lower", "no difference")
    assert screen["magmax"]["status"] == "not run yet" and screen["recurrent-kif"]["against"] == ["replay-linear", "replay-kif"]
    assert "| b | kif-element |" in (tmp_path / "screen-tiny.md").read_text()
    # a row screened against the default itself is paired with it once
    assert set(screen["regmean-diagonal"]["versus"]) == {"linear-0.5", "regmean"}
    assert (tmp_path / "screen-tiny.md").read_text().count("| regmean-diagonal |") == 2
    # --suffix: screened from another assembly of the same order (the one that keeps the one-seed rows)
    (tmp_path / "tiny.json").rename(tmp_path / "tiny-seed42.json")
    run("continual.py", "--sequence", data / "sequence.json", "--screen", "--suffix", "seed42", "--results", tmp_path)
    again = json.loads((tmp_path / "screen-tiny.json").read_text())
    assert again["rows"] == screen and again["command"].endswith("--screen --suffix seed42  # from tiny-seed42.json")
    (tmp_path / "tiny-seed42.json").rename(tmp_path / "tiny.json")

    # the summary over orders 4–6 (here three copies of the tiny sequence's results), paired with the
    # default and, asked, with another row
    summary = tmp_path / "summary"
    summary.mkdir()
    for order in (4, 5, 6):
        (summary / f"order{order}.json").write_text((tmp_path / "tiny.json").read_text())
    run("continual.py", "--summary", "--results", summary)
    run("continual.py", "--summary", "--reference", "seq", "--results", summary)
    default, versus_seq = (json.loads((summary / f"{stem}.json").read_text())["statistics"]
                           for stem in ("summary", "summary-vs-seq"))
    assert "AP_minus_default" in default["seq"] and "AP_minus_default" not in default["regmean"]
    assert "AP_minus_default" in versus_seq["regmean"] and "AP_minus_default" not in versus_seq["seq"]
    gap = versus_seq["regmean"]["AP_minus_default"]["value"]
    assert abs(gap - (default["regmean"]["AP"]["value"] - default["seq"]["AP"]["value"])) < 1e-6
    assert "| method | AP | AP − seq |" in (summary / "summary-vs-seq.md").read_text()
    # --suffix: the same summary over order{N}-SUFFIX.json files (the rows assembled over two seeds), kept apart
    for order in (4, 5):
        (summary / f"order{order}-seeds42-43.json").write_text((tmp_path / "tiny.json").read_text())
    run("continual.py", "--summary", "--suffix", "seeds42-43", "--results", summary)
    suffixed = json.loads((summary / "summary-seeds42-43.json").read_text())
    assert suffixed["orders"] == [4, 5] and suffixed["statistics"]["seq"]["AP"] == default["seq"]["AP"]
    assert json.loads((summary / "summary.json").read_text())["orders"] == [4, 5, 6]
    # without --suffix every row counts every seed it was run with: a file assembled over more seeds
    # (here regmean's seed 42 twice over, so its estimate must not move) wins for the rows it holds
    two = json.loads((tmp_path / "tiny.json").read_text())
    two.update(seeds=[42, 99], methods={"regmean": two["methods"]["regmean"]},
               examples={"regmean": {k: v * 2 for k, v in two["examples"]["regmean"].items()}},
               wall_s={"regmean": {**two["wall_s"]["regmean"], "99": None}})
    (summary / "order6-seeds42-99.json").write_text(json.dumps(two))
    run("continual.py", "--summary", "--results", summary)
    every = json.loads((summary / "summary.json").read_text())
    assert every["seeds"]["regmean"] == {"4": [42], "5": [42], "6": [42, 99]} and every["seeds"]["seq"]["6"] == [42]
    assert every["statistics"]["regmean"]["AP"] == default["regmean"]["AP"]
    assert "regmean: order 4: 42; order 5: 42; order 6: 42, 99" in (summary / "summary.md").read_text()


def test_the_running_mean_row_weighs_the_t_th_task_1_over_t(tmp_path, llama_dir):
    """`linear-mean` fuses the t-th task with α = 1/t (every task ends with the same weight), as
    its versions record: the control for RegMean, whose summed Gram matrices weigh tasks alike."""
    run("continual.py", "--sequence", tiny_sequence(tmp_path, 4, ("parity", "vowel", "parity2")), "--model", llama_dir, "--methods", "linear-mean", "--steps", 1,
        "--warmup", 0, "--batch-size", 2, "--max-length", 48, "--train-examples", 8, "--eval-examples", 2,
        "--eval-batch-size", 2, "--max-new-tokens", 1, "--precision", "fp32", "--work", tmp_path / "work", "--results", tmp_path)
    history = Cli(tmp_path / "work" / "seed42" / "registry").json("history", "linear-mean")
    alphas = [(v["params"] or {}).get("alpha") for v in history]
    assert [v["method"] for v in history] == ["initial", "linear", "linear"]
    assert alphas[0] is None and alphas[1] == 0.5 and abs(alphas[2] - 1 / 3) < 1e-6, alphas


def test_a_line_built_from_other_trainings_is_never_resumed(tmp_path, llama_dir):
    """The work registry outlives a protocol: a line whose versions fused trainings of other inputs
    (here another --lr; for RegMean, Gram matrices summed the old way) stops the run with what to do,
    instead of being evaluated as this protocol's row."""
    args = ["--sequence", tiny_sequence(tmp_path, 2), "--model", llama_dir, "--methods", "seq", "--steps", 1,
            "--warmup", 0, "--batch-size", 2, "--max-length", 48, "--train-examples", 8, "--eval-examples", 2,
            "--eval-batch-size", 2, "--max-new-tokens", 1, "--precision", "fp32", "--work", tmp_path / "work"]
    run("continual.py", *args, "--results", tmp_path / "first")
    done = subprocess.run([sys.executable, "benchmarks/continual.py", *map(str, args), "--lr", "0.001", "--results",
                           tmp_path / "second"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "seq@v1" in done.stderr and "move that line out of the way" in done.stderr
    assert not (tmp_path / "second" / "runs" / "tiny" / "seed42" / "seq.json").exists()


def test_bf16_check_on_the_tiny_llama(tmp_path, llama_dir):
    """The first task of order 4 trained in bf16 and in float32, each evaluated both ways, with paired
    intervals. Where bf16 is not native (an AVX2-only CPU) kifmerge would run the bf16 side in float32,
    so the check refuses unless --bf16-force."""
    from kifmerge.precision import bf16_support

    args = ["--model", llama_dir, "--steps", 2, "--warmup", 0, "--batch-size", 2, "--max-length", 48,
            "--train-examples", 8, "--eval-examples", 4, "--eval-batch-size", 4, "--max-new-tokens", 2,
            "--work", tmp_path / "work", "--results", tmp_path]
    native = bf16_support()[0]
    if not native:
        refused = subprocess.run([sys.executable, "benchmarks/bf16_check.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
        assert refused.returncode == 1 and "no native bf16 here" in refused.stderr and "--bf16-force" in refused.stderr
        assert not (tmp_path / "bf16_check.json").exists()
    run("bf16_check.py", *args, "--bf16-force")
    result = record(tmp_path / "bf16_check.json", "bf16_check")
    assert result["bf16"].startswith("native" if native else "forced")
    assert result["task"] == "dbpedia" and result["examples"] == 4
    assert set(result["exact_match"]) == {f"train {t}, eval {e}" for t in ("bf16", "fp32") for e in ("bf16", "fp32")}
    assert len(result["differences"]) == 3 and all(0 <= n <= 4 for n in result["identical_answers"].values())
