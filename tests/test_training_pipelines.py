"""Training in real pipelines (issue 13, item 10): `--resume` after an interrupted run,
chat-template (`messages`) data, `--report-to`, `--fp16` / `--bf16`, `--gradient-checkpointing`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import task_records, write_jsonl
from test_training import task_profile, task_weights

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}answer: {% endif %}")


@pytest.fixture
def parity(tmp_path) -> Path:
    return write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 12))


def as_messages(records: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "classify"}, {"role": "user", "content": r["input"]},
                          {"role": "assistant", "content": r["output"]}]} for r in records]


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, llama_dir) -> Path:
    """The tiny llama with a minimal chat template in its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(llama_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def resume_folders(cli) -> list[Path]:
    return sorted((cli.registry / "tmp").glob("resume-*"))


# ---- --resume -----------------------------------------------------------------------------------
def test_resume_after_a_kill_continues_from_the_saved_step_and_equals_an_uninterrupted_run(cli, llama_dir, parity):
    cli("base", "add", "llama", llama_dir)
    steps = ["--max-steps", "6", "--save-steps", "2", "--batch-size", "4", "--lr", "1e-3"]
    cli("train", "ref", "--data", parity, "--line", "a", "--base", "llama", *steps)
    assert not resume_folders(cli), "a finished run leaves no checkpoint behind"

    env = {**os.environ, "KIFMERGE_FAULT_POINT": "train.step#5", "OMP_NUM_THREADS": "1"}  # killed in step 5: step 4 saved
    killed = subprocess.run([sys.executable, "-m", "kifmerge", "train", "job", "--data", str(parity), "--line", "b",
                             "--base", "llama", *steps, "--registry", str(cli.registry)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    [folder] = resume_folders(cli)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (folder / "checkpoint-4" / "kifmerge-importance.safetensors").is_file()
    assert cli.json("list", "tasks")[0]["name"] == "ref" and len(cli.json("list", "tasks")) == 1

    assert cli.json("gc", "--dry-run")["removed"] == [], "a young checkpoint is kept by gc"
    assert str(folder.relative_to(cli.registry)) in cli.json("gc", "--dry-run", "--grace", "0")["removed"]

    resumed = cli("train", "job", "--data", parity, "--line", "b", "--base", "llama", *steps, "--resume", "--json")
    assert "resuming from step 4" in resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["metrics"]["resumed_from_step"] == 4 and result["metrics"]["steps"] == 6
    assert [point["step"] for point in cli.json("show", "job")["metrics"]["curve"]] == [1, 2, 3, 4, 5, 6]
    assert result["metrics"]["train_loss"] == pytest.approx(cli.json("show", "ref")["metrics"]["train_loss"], abs=1e-3)
    assert result["metrics"]["importance"]["steps"] == 6, "the importance EMAs continued from the checkpoint"
    assert not resume_folders(cli), "the checkpoint folder is removed once the task is committed"

    ref_weights = task_weights(cli, cli.json("show", "ref")["weights"])
    job_weights = task_weights(cli, cli.json("show", "job")["weights"])
    assert ref_weights.keys() == job_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(job_weights[name], ref_weights[name], rtol=1e-4, atol=1e-6)
    ref_profile, job_profile = task_profile(cli, "ref"), task_profile(cli, "job")
    for name in ref_profile:
        torch.testing.assert_close(job_profile[name], ref_profile[name], rtol=1e-3, atol=1e-6)


def test_resume_with_nothing_saved_trains_from_the_start_with_a_note(cli, llama_dir, parity):
    cli("base", "add", "llama", llama_dir)
    result = cli("train", "t", "--data", parity, "--line", "a", "--base", "llama", "--max-steps", "2", "--resume", "--json")
    assert "no saved checkpoint" in result.stderr
    assert "resumed_from_step" not in json.loads(result.stdout)["metrics"]
    assert not any((cli.registry / "tmp").iterdir())


def test_ctrl_c_keeps_the_checkpoint_and_a_rerun_without_resume_discards_it(cli, llama_dir, parity, monkeypatch):
    from kifmerge import training

    cli("base", "add", "llama", llama_dir)
    original = training.ProgressBridge.on_step_end

    def interrupt_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(training.ProgressBridge, "on_step_end", interrupt_at_step_3)
    args = ["--data", parity, "--into", "a", "--base", "llama", "--max-steps", "4", "--save-steps", "2"]
    assert "nothing was recorded" in cli("learn", "t", *args, code=130).stderr
    [folder] = resume_folders(cli)
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-2"]
    assert [p.name for p in (cli.registry / "tmp").iterdir()] == [folder.name], "only the checkpoint outlives Ctrl-C"
    monkeypatch.undo()
    result = cli("learn", "t", *args)
    assert "discarding the checkpoint (step 2)" in result.stderr
    assert not resume_folders(cli)


def test_resume_key_follows_what_the_run_trains():
    from kifmerge.options import TrainOptions
    from kifmerge.resume import resume_key

    key = resume_key("t", "line@v1", "ab" * 32, TrainOptions())
    assert key == resume_key("t", "line@v1", "ab" * 32, TrainOptions(resume=True, save_steps=7, report_to="wandb",
                                                                     gradient_checkpointing=True))
    assert len({key, resume_key("u", "line@v1", "ab" * 32, TrainOptions()), resume_key("t", "line@v2", "ab" * 32, TrainOptions()),
                resume_key("t", "line@v1", "cd" * 32, TrainOptions()), resume_key("t", "line@v1", "ab" * 32, TrainOptions(seed=1)),
                resume_key("t", "line@v1", "ab" * 32, TrainOptions(bf16=True))}) == 6


def test_save_steps_zero_saves_nothing(cli, llama_dir, parity, monkeypatch):
    from kifmerge import training

    seen = []
    original = training.training_arguments
    monkeypatch.setattr(training, "training_arguments", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    cli("base", "add", "llama", llama_dir)
    cli("train", "t", "--data", parity, "--line", "a", "--base", "llama", "--max-steps", "1", "--save-steps", "0")
    assert seen[0].save_strategy == "no" and seen[0].report_to == []


# ---- chat-template data ---------------------------------------------------------------------------
def test_chat_records_are_rendered_with_the_template_train_and_evaluate(cli, tmp_path, chat_llama):
    from transformers import AutoTokenizer

    from kifmerge.data import Encoder, IGNORE, load_records

    records = task_records("parity", 12)
    data = write_jsonl(tmp_path / "chat.jsonl", as_messages(records))
    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    loaded = load_records(data)
    assert loaded[0]["output"] == records[0]["output"]
    encoded = Encoder(tokenizer, False, 256)(loaded[0])
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "classify"}, {"role": "user", "content": records[0]["input"]}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("answer: ")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(records[0]["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded == {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}

    cli("base", "add", "chat", chat_llama)
    learned = cli.json("learn", "chat", "--data", data, "--into", "c", "--base", "chat", "--max-steps", "3", "--batch-size", "4")
    assert learned["trained"]["metrics"]["steps"] == 3
    evaluated = cli.json("eval", "c", "--data", f"chat={data}", "--max-examples", "4", "--max-new-tokens", "2")
    assert evaluated["results"]["chat"]["examples"] == 4


def test_plain_and_chat_records_can_share_a_file(tmp_path):
    from kifmerge.chat import Conversation
    from kifmerge.data import load_records

    records = task_records("parity", 2)
    data = write_jsonl(tmp_path / "mixed.jsonl", [records[0], *as_messages(records[1:])])
    plain, chat = load_records(data)
    assert plain == records[0] and type(plain["input"]) is str
    assert isinstance(chat["input"], Conversation) and chat["input"].messages[1]["content"] == records[1]["input"]
    assert "user: " in chat["input"]


def test_chat_data_without_a_chat_template_is_one_line_error(cli, tmp_path, llama_dir):
    cli("base", "add", "llama", llama_dir)
    data = write_jsonl(tmp_path / "chat.jsonl", as_messages(task_records("parity", 4)))
    result = cli("train", "t", "--data", data, "--line", "a", "--base", "llama", "--max-steps", "1", code=4)
    assert "has no chat template" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli.json("list", "tasks") == [] and not any((cli.registry / "tmp").iterdir())
    plain = write_jsonl(tmp_path / "plain.jsonl", task_records("parity", 4))
    cli("learn", "p", "--data", plain, "--into", "a", "--base", "llama", "--max-steps", "1")
    result = cli("eval", "a", "--data", f"chat={data}", code=4)
    assert "has no chat template" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("record,message", [
    ({"messages": []}, "a chat record is"),
    ({"messages": [{"role": "user", "content": "hi"}], "input": "x"}, "a chat record is"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, "message 1 must be"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "non-empty answer"),
    ({"messages": [{"role": "assistant", "content": "yes"}, {"role": "user", "content": "hi"}]}, "last message must be"),
    ({"messages": [{"role": "assistant", "content": "yes"}]}, "at least one message before"),
])
def test_malformed_chat_records_name_file_and_line(tmp_path, record, message):
    from kifmerge.errors import InvalidInputError
    from kifmerge.data import load_records

    data = write_jsonl(tmp_path / "bad.jsonl", [as_messages(task_records("parity", 1))[0], record])
    with pytest.raises(InvalidInputError, match=message) as caught:
        load_records(data)
    assert str(caught.value).startswith(f"{data}:2: ")


# ---- trackers, precision, gradient checkpointing -----------------------------------------------------
@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "wandb"])
def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_any_work(cli, llama_dir, parity, tracker, monkeypatch):
    from kifmerge.services import preflight

    monkeypatch.setattr(preflight, "tracker_available", lambda name: False)
    cli("base", "add", "llama", llama_dir)
    result = cli("train", "t", "--data", parity, "--line", "a", "--base", "llama", "--report-to", tracker, code=2)
    assert f"pip install {tracker}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli.json("list", "tasks") == [] and not any((cli.registry / "tmp").iterdir())


def test_report_to_reaches_the_trainer(tmp_path):
    from kifmerge.options import TrainOptions
    from kifmerge.training import training_arguments

    assert training_arguments(TrainOptions(report_to="tensorboard"), tmp_path, "task").report_to == ["tensorboard"]
    assert training_arguments(TrainOptions(), tmp_path).report_to == []


@pytest.mark.parametrize("args,message", [
    (["--fp16", "--bf16"], "exclude each other"),
    (["--report-to", "comet"], "--report-to"),
    (["--save-steps", "-1"], "--save-steps"),
] + ([] if torch.cuda.is_available() else [(["--fp16"], "needs a CUDA GPU")]))
def test_precision_and_tracker_option_errors_are_one_line(cli, llama_dir, parity, args, message):
    cli("base", "add", "llama", llama_dir)
    result = cli("train", "t", "--data", parity, "--line", "a", "--base", "llama", *args, code=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli.json("list", "tasks") == []


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_trains_the_same_weights_and_profile(cli, llama_dir, parity, mode, monkeypatch):
    import transformers.modeling_utils as modeling

    cli("base", "add", "llama", llama_dir)
    args = ["--data", parity, "--base", "llama", "--max-steps", "2", "--batch-size", "4", "--mode", mode, "--lr", "1e-3"]
    cli("train", "plain", "--line", "a", *args)
    recomputed = []
    original = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: recomputed.append(k) or original(*a, **k))
    cli("train", "ckpt", "--line", "b", *args, "--gradient-checkpointing")
    assert recomputed and recomputed[0]["use_reentrant"] is False, "the decoder layers ran under activation checkpointing"
    assert cli.json("show", "ckpt")["training_config"]["gradient_checkpointing"] is True
    a, b = task_weights(cli, cli.json("show", "plain")["weights"]), task_weights(cli, cli.json("show", "ckpt")["weights"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    pa, pb = task_profile(cli, "plain"), task_profile(cli, "ckpt")
    assert any(t.abs().sum() > 0 for t in pb.values()), "the importance callback saw gradients"
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-3, atol=1e-6)
    if mode == "lora":  # the Gram matrices too: a forward recomputed in backward is not counted again
        from kifmerge.profiles import read_grams
        from kifmerge.registry import Registry

        reg = Registry.open(cli.registry)
        modules = sorted({n.rsplit(".lora_", 1)[0] for n in a})
        ga, gb = (read_grams(reg.blobs.open_verified(reg.catalog.find("profiles", t)["scores"]), modules) for t in ("plain", "ckpt"))
        for module in modules:
            torch.testing.assert_close(gb[module], ga[module], rtol=1e-4, atol=1e-3, msg=module)


def test_tensorboard_logs_outlive_the_staging_area(tmp_path, monkeypatch):
    from kifmerge.options import TrainOptions
    from kifmerge.services.preflight import tracker_environment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with tracker_environment(TrainOptions(report_to="tensorboard"), "parity"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "runs" / "parity")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/elsewhere")
    with tracker_environment(TrainOptions(report_to="tensorboard"), "parity"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/elsewhere"


def test_a_resumed_gram_run_records_the_gram_matrices_of_every_step(cli, llama_dir, parity):
    """The Gram sums are saved with each checkpoint: killed after step 2 and resumed, `--gram` gives
    the matrices of the uninterrupted run, not those of the steps after the resume only."""
    from kifmerge.profiles import read_grams
    from kifmerge.registry import Registry

    cli("base", "add", "llama", llama_dir)
    steps = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--gram"]
    cli("train", "ref", "--data", parity, "--line", "a", "--base", "llama", *steps)
    env = {**os.environ, "KIFMERGE_FAULT_POINT": "train.step#3", "OMP_NUM_THREADS": "1"}  # killed in step 3: step 2 saved
    killed = subprocess.run([sys.executable, "-m", "kifmerge", "train", "job", "--data", str(parity), "--line", "b",
                             "--base", "llama", *steps, "--registry", str(cli.registry)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    resumed = cli("train", "job", "--data", parity, "--line", "b", "--base", "llama", *steps, "--resume")
    assert "resuming from step 2" in resumed.stderr
    reg = Registry.open(cli.registry)
    profiles = {row["task"]: reg.blobs.open_verified(row["scores"]) for row in reg.catalog.rows("profiles")}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in task_weights(cli, cli.json("show", "ref")["weights"])})
    ref, job = (read_grams(profiles[name], modules) for name in ("ref", "job"))
    for module in modules:
        torch.testing.assert_close(job[module], ref[module], rtol=1e-4, atol=1e-3, msg=module)


@pytest.mark.parametrize("older", ["one-process-sums", "bfloat16-sums"])
def test_resume_refuses_gram_sums_an_older_kifmerge_kept_imprecisely(cli, llama_dir, parity, older):
    """Checkpoints whose Gram sums would make the task's RegMean weight wrong, told by what they lack:
    saved under torchrun by a kifmerge from before the sums were all-reduced (the main process's share
    only; the Trainer's per-process RNG files tell it), or under --bf16 by one from before they were
    summed in float32. Both are refused, and nothing is registered."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cli("base", "add", "llama", llama_dir)
    steps = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--gram",
             *(["--bf16", "--bf16-force"] if older == "bfloat16-sums" else [])]
    env = {**os.environ, "KIFMERGE_FAULT_POINT": "train.step#3", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "kifmerge", "train", "job", "--data", str(parity), "--line", "b",
                             "--base", "llama", *steps, "--registry", str(cli.registry)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    [folder] = resume_folders(cli)
    checkpoint = folder / "checkpoint-2"
    state = checkpoint / "kifmerge-importance.safetensors"
    marker = {"one-process-sums": "gram-sums", "bfloat16-sums": "gram-precision"}[older]
    with safe_open(str(state), framework="pt") as handle:  # as the earlier kifmerge wrote it: no marker
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = {k: v for k, v in handle.metadata().items() if k != marker}
    save_file(tensors, str(state), metadata=metadata)
    if older == "one-process-sums":
        (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")  # as two processes leave it
        (checkpoint / "rng_state_1.pth").write_bytes(b"")

    refused = cli("train", "job", "--data", parity, "--line", "b", "--base", "llama", *steps, "--resume", code=4)
    expected = {"one-process-sums": "saved by several processes", "bfloat16-sums": "took in bfloat16"}[older]
    assert expected in refused.stderr and "without --resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2  # the resume note and the one-line error
    assert cli.json("list", "tasks") == [] and checkpoint.is_dir(), "nothing registered, the checkpoint kept"
