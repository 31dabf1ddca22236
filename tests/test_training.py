"""Training with knowledge identification, through the CLI: the importance callback against a
plain reference loop, `train`, `learn`, `add-task --calibrate`, and failures that leave the
registry untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LORA_TARGETS, make_lora, model_class, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, hand_fused, unit_groups

BETA = 0.85


def stored(cli, sha: str) -> Path:
    return cli.registry / "blobs" / sha[:2] / sha[2:]


def task_profile(cli, task: str) -> dict[str, torch.Tensor]:
    """A task's unit scores (the profile file's element scores and Gram matrices left out)."""
    from kifmerge.profiles import NOT_UNITS

    return {k: v for k, v in load_file(stored(cli, cli.json("show", task)["profile"]["scores"])).items()
            if not k.startswith(NOT_UNITS)}


def task_weights(cli, sha: str) -> dict[str, torch.Tensor]:
    manifest = json.loads(stored(cli, sha).read_text())
    out = {}
    for name, blob in manifest["files"].items():
        if name.endswith(".safetensors"):
            out.update(load_file(stored(cli, blob)))
    return out


def reference_batches(base_dir: Path, records: list[dict], batch_size: int) -> list[dict]:
    """Prompt + " " + answer + eos, prompt masked, left-padded, positions from the mask:
    written here independently of kifmerge's encoder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    batches = []
    for start in range(0, len(records), batch_size):
        rows = []
        for r in records[start:start + batch_size]:
            prompt = tok(r["input"])["input_ids"]
            answer = tok(" " + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
        batches.append({"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(ids)) + ids for ids, _ in rows]),
                        "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                        "labels": torch.tensor([[-100] * (width - len(ids)) + lab for ids, lab in rows])})
    return batches


def reference_importance(model, batches: list[dict], estimator: str, steps: int, lr: float | None) -> dict[str, torch.Tensor]:
    """A plain loop: (AdamW step with linear decay and clipping, if lr) then the EMA update on
    the step's gradients; returns unit scores keyed like the profile format."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ipt = {n: torch.zeros_like(p) for n, p in params.items()}
    unc = {n: torch.zeros_like(p) for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0) if lr else None
    model.train() if lr else model.eval()
    for step in range(steps):
        batch = batches[step % len(batches)]
        model(**batch).loss.backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / steps)
            optimizer.step()
        with torch.no_grad():
            for n, p in params.items():
                x = p * p.grad
                s = {"first": x.abs(), "mixed": (x - 0.5 * x * x).abs(), "fisher": p.grad * p.grad}[estimator]
                ipt[n] = BETA * ipt[n] + (1 - BETA) * s
                unc[n] = BETA * unc[n] + (1 - BETA) * (s - ipt[n]).abs()
        model.zero_grad()
    scores = {n: ipt[n] if estimator == "fisher" else ipt[n] * unc[n] for n in params}
    if not any(".lora_" in n for n in scores):
        return {n: s.mean().reshape(1) for n, s in scores.items()}
    units = {}
    for n, s in scores.items():
        if ".lora_A." in n:
            module = n.split(".lora_A.")[0]
            b = scores[n.replace(".lora_A.", ".lora_B.")]
            units[module] = (b[:, :, None] * s[None, :, :]).mean(dim=(0, 2))  # mean of the outer product
    return units


def assert_scores_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    scale = max(float(v.max()) for v in expected.values())
    assert scale > 0
    for key in expected:
        torch.testing.assert_close(actual[key] / scale, expected[key] / scale, rtol=2e-3, atol=2e-4, msg=key)


@pytest.fixture
def parity(tmp_path) -> Path:
    return write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 8))


@pytest.fixture
def vowel(tmp_path) -> Path:
    return write_jsonl(tmp_path / "vowel.jsonl", task_records("vowel", 16, seed=1))


def start_line_with_adapter(cli, tmp_path, llama_dir, line="line") -> Path:
    """v1 of a LoRA line from a known adapter, so training starts from known weights."""
    adapter = make_lora(llama_dir, tmp_path / "v1-adapter", 7, LORA_TARGETS)
    write_profile(tmp_path / "v1.safetensors", designed_scores(unit_groups(adapter, "lora"), {0, 1, 2}, 1.0)[0], "lora-rank")
    cli("add-task", "seed", adapter, "--base", "llama", "--profile", tmp_path / "v1.safetensors")
    cli("fuse", "seed", "--into", line)
    return adapter


@pytest.mark.parametrize("mode,estimator", [("lora", "first"), ("lora", "mixed"), ("lora", "fisher"), ("full", "first")])
def test_callback_scores_equal_a_reference_loop(cli, tmp_path, llama_dir, parity, mode, estimator):
    from peft import PeftModel

    cli("base", "add", "llama", llama_dir)
    lr, steps = (1e-2, 3) if mode == "lora" else (1e-3, 3)
    if mode == "lora":
        adapter = start_line_with_adapter(cli, tmp_path, llama_dir)
        args = ["--line", "line"]
    else:
        args = ["--line", "fresh", "--base", "llama", "--mode", "full"]
    result = cli.json("train", "t", "--data", parity, *args, "--max-steps", str(steps), "--batch-size", "8",
                      "--lr", str(lr), "--importance", estimator)
    assert result["metrics"]["importance"] == {"estimator": estimator, "beta1": 0.85, "beta2": 0.85,
                                               "steps": steps, "skipped_non_finite": 0}

    model = model_class(llama_dir).from_pretrained(llama_dir)
    if mode == "lora":
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    batches = reference_batches(llama_dir, task_records("parity", 8), batch_size=8)
    expected = reference_importance(model, batches, estimator, steps, lr)
    assert_scores_match(task_profile(cli, "t"), expected)


def test_train_registers_task_with_profile_per_module(cli, tmp_path, llama_dir, t5_dir, vowel):
    cli("base", "add", "llama", llama_dir)
    cli("base", "add", "t5", t5_dir)
    lora = cli.json("train", "v", "--data", vowel, "--line", "l", "--base", "llama", "--max-steps", "2",
                    "--lora-r", "4", "--val-fraction", "0.25")
    assert lora["kind"] == "lora" and lora["profile"] == {"estimator": "first", "unit": "lora-rank", "groups": 4, "units": 16}
    profile = task_profile(cli, "v")
    assert sorted(profile) == sorted(f"base_model.model.model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in LORA_TARGETS)
    assert all(v.shape == (4,) for v in profile.values())
    shown = cli.json("show", "v")
    assert shown["training_config"]["lora_r"] == 4 and shown["data_fingerprint"] == shown["training_config"]["data"]["sha256"]
    assert shown["metrics"]["examples"] == {"train": 12, "val": 4} and "eval_loss" in shown["metrics"]
    assert [p["step"] for p in shown["metrics"]["curve"]] == [1, 2]
    assert cli.json("list", "lines") == [], "train registers a task; only fuse/learn make versions"

    full = cli.json("train", "f", "--data", vowel, "--line", "t5-line", "--base", "t5", "--mode", "full", "--max-steps", "1")
    profile = task_profile(cli, "f")
    weights = task_weights(cli, cli.json("show", "f")["weights"])
    assert full["profile"]["unit"] == "tensor" and sorted(profile) == sorted(weights)
    assert all(v.shape == (1,) for v in profile.values())


def test_learn_two_tasks_fuses_by_the_rule(cli, tmp_path, llama_dir, parity, vowel):
    cli("base", "add", "llama", llama_dir)
    v1 = cli.json("learn", "parity", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "3", "--lr", "1e-2")
    v2 = cli.json("learn", "vowel", "--data", vowel, "--into", "main", "--max-steps", "3", "--lr", "1e-2", "--method", "kif")
    assert (v1["version"], v1["method"], v2["version"], v2["method"]) == ("main@v1", "initial", "main@v2", "kif")
    assert cli.json("show", "vowel")["trained_from"] == "main@v1"

    versions = {v["number"]: cli.json("show", f"main@v{v['number']}") for v in cli.json("history", "main")}
    w1, w2 = task_weights(cli, versions[1]["weights"]), task_weights(cli, versions[2]["weights"])
    t2 = task_weights(cli, cli.json("show", "vowel")["weights"])
    t1 = task_weights(cli, cli.json("show", "parity")["weights"])
    assert w1.keys() == t1.keys() and all(torch.equal(w1[k], t1[k]) for k in w1), "v1 is task 1 as it is"
    groups = sorted((k[: -len(".lora_A.weight")], t2[k].shape[0]) for k in t2 if k.endswith(".lora_A.weight"))
    p_old = torch.cat([load_file(stored(cli, versions[1]["profile_blob"]))[g] for g, _ in groups])
    raw_new = task_profile(cli, "vowel")
    p_new = torch.cat([raw_new[g] for g, _ in groups])
    p_new = (p_new - p_new.min()) / (p_new.max() - p_new.min())
    old_hot = p_old.double() > torch.quantile(p_old.double(), 0.8)
    new_hot = p_new.double() > torch.quantile(p_new.double(), 0.8)

    def rule(i: int) -> tuple[float, float]:
        return {(True, True): (0.3, 0.7), (True, False): (0.0, 1.0), (False, True): (1.0, 0.0),
                (False, False): (0.5, 0.5)}[(bool(old_hot[i]), bool(new_hot[i]))]

    expected = hand_fused(w1, t2, groups, "lora", rule)
    for key in expected:
        torch.testing.assert_close(w2[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(w2[k], w1[k]) for k in w2) and any(not torch.equal(w2[k], t2[k]) for k in w2)


def test_calibrate_profiles_an_external_adapter(cli, tmp_path, llama_dir, parity):
    from peft import PeftModel

    cli("base", "add", "llama", llama_dir)
    adapter = make_lora(llama_dir, tmp_path / "external", 3, LORA_TARGETS)
    result = cli.json("add-task", "ext", adapter, "--base", "llama", "--calibrate", parity, "--calibrate-batches", "2",
                      "--batch-size", "4", "--importance", "mixed")
    assert result["profile"] == {"estimator": "calibrated-mixed", "unit": "lora-rank", "groups": 4, "units": 16}
    model = PeftModel.from_pretrained(model_class(llama_dir).from_pretrained(llama_dir), adapter, is_trainable=True)
    expected = reference_importance(model, reference_batches(llama_dir, task_records("parity", 8), 4), "mixed", 2, lr=None)
    assert_scores_match(task_profile(cli, "ext"), expected)
    assert cli.json("fuse", "ext", "--into", "cal")["version"] == "cal@v1"


def snapshot(cli) -> tuple:
    blobs = sorted(p.name for p in (cli.registry / "blobs").glob("*/*"))
    return tuple(cli.json("list", w) for w in ("tasks", "lines", "versions")), blobs


@pytest.mark.parametrize("content,where", [
    ('{"input": "a", "output": "b"}\n{"input": "a"}\n', ":2: record lacks a non-empty string 'output'"),
    ('{"input": "a", "output": "b"}\n{"input": "a", "output": \n', ":2: invalid JSON"),
    ('[\n  {"input": "a", "output": "b"},\n  ["not", "an", "object"]\n]', ":3: a record must be an object"),
    ('[\n  {"input": "a", "output": "b"}\n  {"input": "c", "output": "d"}\n]', ":3: expected ',' or ']'"),
])
def test_malformed_data_names_file_and_line(cli, tmp_path, llama_dir, content, where):
    cli("base", "add", "llama", llama_dir)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    before = snapshot(cli)
    result = cli("learn", "x", "--data", bad, "--into", "l", "--base", "llama", "--max-steps", "1", code=4)
    assert f"{bad}{where}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(cli) == before


def test_interrupted_training_registers_nothing(cli, tmp_path, llama_dir, parity, monkeypatch):
    from kifmerge.importance import ImportanceAccumulator

    cli("base", "add", "llama", llama_dir)
    before = snapshot(cli)
    calls = []
    original = ImportanceAccumulator.update

    def interrupt_on_second_step(self, finite=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, finite)

    monkeypatch.setattr(ImportanceAccumulator, "update", interrupt_on_second_step)
    result = cli("learn", "x", "--data", parity, "--into", "l", "--base", "llama", "--max-steps", "5", code=130)
    assert "nothing was recorded" in result.stderr
    assert snapshot(cli) == before
    assert not any((cli.registry / "tmp").iterdir()), "staging cleaned up"


def test_non_finite_gradients_are_skipped_not_folded_in():
    from kifmerge.importance import ImportanceAccumulator

    param = torch.nn.Parameter(torch.ones(3))
    acc = ImportanceAccumulator([("w", param)])
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    assert acc.update()
    snapshot_ipt = acc.ipt["w"].clone()
    param.grad = torch.tensor([1.0, float("nan"), 3.0])
    assert not acc.update()
    assert acc.report()["skipped_non_finite"] == 1 and acc.steps == 1
    assert torch.equal(acc.ipt["w"], snapshot_ipt)


def test_replay_mixes_earlier_task_data_and_orth_reg_is_recorded(cli, tmp_path, llama_dir, parity, vowel):
    cli("base", "add", "llama", llama_dir)
    cli("learn", "parity", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "1")
    cli("train", "vowel", "--data", vowel, "--line", "main", "--max-steps", "1", "--replay", "0.2", "--orth-reg", "0.5")
    shown = cli.json("show", "vowel")
    assert shown["training_config"]["replay"]["tasks"][0]["task"] == "parity"
    assert shown["training_config"]["replay"]["examples"] == 4  # 16 · 0.2 / 0.8
    assert shown["metrics"]["examples"]["train"] == 20 and shown["training_config"]["orth_reg"] == 0.5
    parity.write_text(parity.read_text() + "\n")
    result = cli("train", "again", "--data", vowel, "--line", "main", "--max-steps", "1", "--replay", "0.2", code=4)
    assert "missing or changed" in result.stderr


def test_orthogonality_penalty_pulls_lora_factors_towards_orthogonal():
    from kifmerge.training import orthogonality_penalty

    layer = torch.nn.Module()
    layer.lora_A = torch.nn.Parameter(torch.randn(4, 16))
    layer.lora_B = torch.nn.Parameter(torch.randn(16, 4))
    model = torch.nn.Module()
    model.q = layer
    before = orthogonality_penalty(model).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        orthogonality_penalty(model).backward()
        optimizer.step()
    assert orthogonality_penalty(model).item() < 0.5 * before


def test_learn_killed_at_commit_leaves_only_garbage_that_gc_removes(cli, tmp_path, llama_dir, parity, monkeypatch):
    from kifmerge.services import learning

    cli("base", "add", "llama", llama_dir)
    cli("learn", "first", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "1")
    before = snapshot(cli)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(learning, "commit_version", killed)  # dies inside learn's one transaction
    cli("learn", "second", "--data", parity, "--into", "main", "--max-steps", "1", code=130)
    monkeypatch.undo()
    rows, blobs = snapshot(cli)
    assert rows == before[0], "task and version rolled back together"
    assert set(blobs) > set(before[1]), "the staged blobs are garbage now"
    assert cli.json("gc", "--dry-run")["removed"] == [], "younger than the grace period: kept"
    removed = cli.json("gc", "--grace", "0")["removed"]
    assert len(removed) == len(set(blobs) - set(before[1]))
    assert snapshot(cli) == before
    assert cli.json("verify")["ok"]
    assert cli.json("learn", "second", "--data", parity, "--into", "main", "--max-steps", "1")["version"] == "main@v2"


@pytest.mark.parametrize("args,message", [
    (["--line", "new"], "give --base NAME"),
    (["--line", "new", "--base", "llama", "--mode", "full", "--orth-reg", "0.1"], "--mode lora only"),
    (["--line", "new", "--base", "llama", "--lr", "-1"], "--lr"),
    (["--line", "new", "--base", "llama", "--importance", "third"], "--importance"),
    (["--line", "new", "--base", "nobase"], "base 'nobase' not found"),
])
def test_train_option_errors_are_one_line_before_any_work(cli, llama_dir, parity, args, message):
    cli("base", "add", "llama", llama_dir)
    result = cli("train", "t", "--data", parity, *args, code=3 if "not found" in message else 2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli.json("list", "tasks") == []


def test_a_line_keeps_its_kind_and_rank(cli, tmp_path, llama_dir, parity):
    cli("base", "add", "llama", llama_dir)
    start_line_with_adapter(cli, tmp_path, llama_dir)
    assert "--mode lora" in cli("train", "t", "--data", parity, "--line", "line", "--mode", "full", code=2).stderr
    assert "r=4" in cli("train", "t", "--data", parity, "--line", "line", "--lora-r", "8", code=2).stderr


def test_warmup_and_bf16_reach_the_trainer_and_bf16_eval_is_its_own_setting(cli, tmp_path, llama_dir, parity, monkeypatch):
    """--warmup-steps holds the first steps' learning rate below --lr; --bf16 trains under
    autocast and is recorded; `eval --bf16` is stored apart from the float32 result."""
    from kifmerge import precision

    monkeypatch.setattr(precision, "bf16_support", lambda: (True, "a CPU with avx512_bf16 (test)"))
    cli("base", "add", "llama", llama_dir)
    cli("train", "warm", "--data", parity, "--line", "main", "--base", "llama", "--max-steps", "3", "--lr", "1e-3",
        "--warmup-steps", "2", "--bf16")
    config = cli.json("show", "warm")["training_config"]
    assert config["warmup_steps"] == 2 and config["bf16"] is True
    cli("fuse", "warm", "--into", "main")
    fp32 = cli.json("eval", "main", "--data", f"parity={parity}", "--max-examples", "4")
    bf16 = cli.json("eval", "main", "--data", f"parity={parity}", "--max-examples", "4", "--bf16")
    assert bf16["settings"]["bf16"] is True and "bf16" not in fp32["settings"]
    assert not bf16["results"]["parity"]["reused"]
    assert cli.json("eval", "main", "--data", f"parity={parity}", "--max-examples", "4", "--bf16")["results"]["parity"]["reused"]


def test_bf16_falls_back_to_float32_where_it_is_not_native_unless_forced(cli, tmp_path, llama_dir, parity, monkeypatch):
    """Without native bf16 (an AVX2-only CPU, where a bf16 matmul ran 34× slower) `--bf16` trains
    and evaluates in float32, records that, and says so in one line on stderr, in --json mode
    too; `--bf16-force` keeps bf16."""
    from kifmerge import precision

    monkeypatch.setattr(precision, "bf16_support", lambda: (False, "CPU AVX2 without avx512_bf16 or amx_bf16"))
    cli("base", "add", "llama", llama_dir)
    done = cli("train", "plain", "--data", parity, "--line", "main", "--base", "llama", "--max-steps", "2", "--bf16", "--json")
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kifmerge: warning: --bf16 ignored for training: CPU AVX2")
    assert "34×" in warnings[0] and "--bf16-force" in warnings[0]
    assert cli.json("show", "plain")["training_config"]["bf16"] is False
    cli("train", "forced", "--data", parity, "--line", "main", "--base", "llama", "--max-steps", "2", "--bf16", "--bf16-force")
    assert cli.json("show", "forced")["training_config"]["bf16"] is True
    cli("fuse", "plain", "--into", "main")
    evaluated = cli("eval", "main", "--data", f"parity={parity}", "--max-examples", "2", "--bf16", "--json")
    assert "bf16" not in json.loads(evaluated.stdout)["settings"]
    assert "--bf16 ignored for evaluation" in evaluated.stderr
    forced = cli.json("eval", "main", "--data", f"parity={parity}", "--max-examples", "2", "--bf16", "--bf16-force")
    assert forced["settings"]["bf16"] is True


def test_warmup_schedule_ramps_up_then_decays():
    from kifmerge.options import TrainOptions
    from kifmerge.training import training_arguments

    args = training_arguments(TrainOptions(max_steps=10, lr=1e-3, warmup_steps=4), Path("/tmp/unused"))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    from transformers import get_scheduler

    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[1] < rates[2] < rates[3] < rates[4] == pytest.approx(1e-3) and rates[5] < rates[4]


def test_change_estimator_scores_what_the_task_moved_not_what_was_large(cli, tmp_path, llama_dir, parity, vowel):
    """`--importance change` scores |(θ − θ_start)·g|: against a reference loop on the same
    gradients; a unit the task never moved scores 0 however large it was; calibration refuses it."""
    from kifmerge.importance import ImportanceAccumulator

    weights = torch.nn.Parameter(torch.tensor([[3.0, 0.5], [2.0, 1.0]]))
    accumulator = ImportanceAccumulator([("w", weights)], estimator="change", beta1=BETA, beta2=BETA)
    start = weights.detach().clone()
    ipt, unc = torch.zeros(2, 2), torch.zeros(2, 2)
    for step in range(3):
        with torch.no_grad():
            weights[1] += 0.1 * (step + 1)  # only row 1 moves
        weights.grad = torch.tensor([[1.0, -2.0], [0.5, 3.0]]) * (step + 1)
        accumulator.update()
        s = ((weights.detach() - start) * weights.grad).abs()
        ipt = BETA * ipt + (1 - BETA) * s
        unc = BETA * unc + (1 - BETA) * (s - ipt).abs()
    torch.testing.assert_close(accumulator.element_scores()["w"], ipt * unc)
    assert bool((accumulator.element_scores()["w"][0] == 0).all()), "row 0 is large but never moved"

    cli("base", "add", "llama", llama_dir)
    cli("learn", "parity", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "2")
    cli("train", "vowel", "--data", vowel, "--line", "main", "--max-steps", "3", "--importance", "change", "--lr", "1e-2")
    shown = cli.json("show", "vowel")
    assert shown["profile"]["estimator"] == "change"
    scores = task_profile(cli, "vowel")
    assert all(torch.isfinite(v).all() for v in scores.values()) and any(bool((v > 0).any()) for v in scores.values())
    adapter = make_lora(llama_dir, tmp_path / "outside", 3, LORA_TARGETS)
    result = cli("add-task", "outside", adapter, "--base", "llama", "--calibrate", vowel, "--importance", "change", code=2)
    assert "needs a training run" in result.stderr
    for batches in ("0", "-1"):  # 0 read the whole file, -1 all but the last 8 records
        result = cli("add-task", "outside", adapter, "--base", "llama", "--calibrate", vowel, "--calibrate-batches", batches, code=2)
        assert "--calibrate-batches must be at least 1" in result.stderr


def test_training_reuses_the_trainers_gradient_norm_to_skip_non_finite_steps(cli, llama_dir, parity, monkeypatch):
    """The callback takes the step's finiteness from the Trainer's own total gradient norm
    (no second pass over every gradient): a step whose norm is not finite is skipped and
    counted, the others are folded in, and `learn` records the count."""
    from kifmerge.importance import ImportanceAccumulator
    from kifmerge.training import KifTrainer

    seen = []
    original_update = ImportanceAccumulator.update

    def spy(self, finite=None):
        seen.append(finite)
        return original_update(self, finite)

    original_norm = KifTrainer._get_grad_norm
    calls = []

    def poisoned(self, model, grad_norm=None):
        norm = original_norm(self, model, grad_norm=grad_norm)
        calls.append(norm)
        if len(calls) == 2:  # the second step reports a non-finite norm, as an overflow would
            self._step_grad_norm = float("nan")
            return float("nan")
        return norm

    monkeypatch.setattr(ImportanceAccumulator, "update", spy)
    monkeypatch.setattr(KifTrainer, "_get_grad_norm", poisoned)
    cli("base", "add", "llama", llama_dir)
    cli.json("learn", "parity", "--data", parity, "--into", "main", "--base", "llama", "--max-steps", "3")
    assert seen == [True, False, True], "finiteness came from the Trainer's norm, not a pass of our own"
    importance = cli.json("show", "parity")["metrics"]["importance"]
    assert importance["skipped_non_finite"] == 1 and importance["steps"] == 2, importance
