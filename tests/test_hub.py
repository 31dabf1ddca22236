"""Hub conventions: `base add` with a hub id through the Hugging Face cache (offline here), and
the exported model card's metadata (base_model, relation, tags, lineage, model-index)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import LORA_TARGETS, make_lora

HUB_ID = "HuggingFaceTB/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, model_dir: Path, repo_id: str = HUB_ID, commit: str = COMMIT) -> Path:
    """A model in the hub cache's layout: models--ORG--NAME/snapshots/COMMIT/… and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty hub cache under HF_HOME, offline; the user's real cache is never touched."""
    for var in ("HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home" / "hub"


def test_base_add_hub_id_from_the_offline_cache(cli, offline, llama_dir, tmp_path):
    snapshot = cache_model(offline, llama_dir)
    added = cli.json("base", "add", "tiny", HUB_ID)
    assert added["hub_id"] == HUB_ID and added["revision"] == COMMIT
    assert Path(added["path"]) == snapshot.resolve()
    assert [b["hub_id"] for b in cli.json("list", "bases")] == [HUB_ID]
    by_commit = cli.json("base", "add", "tiny-pinned", HUB_ID, "--revision", COMMIT)
    assert by_commit["revision"] == COMMIT and by_commit["fingerprint"] == added["fingerprint"]

    # its exports name the hub model as base_model, with the relation the export has
    from huggingface_hub import ModelCard

    make_lora(llama_dir, tmp_path / "a", 1, LORA_TARGETS)
    cli("add-task", "a", tmp_path / "a", "--base", "tiny", "--calibrate", write_calibration(tmp_path), "--calibrate-batches", "1")
    cli("fuse", "a", "--into", "line")
    cli("export", "line", tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == HUB_ID and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft" and {"kifmerge", "lora"} <= set(card.data.tags)
    assert f"hub model `{HUB_ID}` at commit `{COMMIT}`" in card.text and "| v1 | a | initial |" in card.text
    cli("export", "line", tmp_path / "merged", "--merged")
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.base_model == HUB_ID and merged.data.base_model_relation == "merge"
    assert merged.data.library_name == "transformers" and merged.data.pipeline_tag == "text-generation"


def write_calibration(tmp_path: Path) -> Path:
    from conftest import task_records, write_jsonl

    return write_jsonl(tmp_path / "calib.jsonl", task_records("parity", 4))


def test_hub_id_not_cached_offline_is_one_line_exit_3(cli, offline, monkeypatch, tmp_path, llama_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = cli("base", "add", "smol", "HuggingFaceTB/SmolLM2-135M", code=3)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kifmerge: error: ")
    assert "not in the Hugging Face cache" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "hf download HuggingFaceTB/SmolLM2-135M" in result.stderr
    assert cli.json("list", "bases") == []
    cache_model(tmp_path / "empty-cache", llama_dir)  # cached at main only: another revision is not
    assert f"{HUB_ID}@v9 is not in the Hugging Face cache" in cli("base", "add", "tiny", HUB_ID, "--revision", "v9", code=3).stderr
    assert cli.json("base", "add", "tiny", HUB_ID)["revision"] == COMMIT


def test_local_path_wins_over_hub_id(cli, offline, llama_dir, tmp_path, monkeypatch):
    """`org/name` that exists as a local folder is that folder; --revision is for hub ids only."""
    shutil.copytree(llama_dir, tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    added = cli.json("base", "add", "local", "org/model")
    assert added["hub_id"] is None and Path(added["path"]) == (tmp_path / "org" / "model").resolve()
    assert "--revision" in cli("base", "add", "local2", "org/model", "--revision", "main", code=2).stderr


def test_card_lists_eval_scores_as_model_index(tmp_path):
    from huggingface_hub import ModelCard

    from kifmerge.export import write_model_card

    version = {"number": 2, "kind": "full"}
    lineage = [{"number": 1, "parent": None, "task": "t1", "method": "initial", "params": {}, "created": "x"},
               {"number": 2, "parent": 1, "task": "t2", "method": "ties", "params": {"density": 0.5}, "created": "y"}]
    base = {"name": "b", "path": "/models/b", "architecture": "LlamaForCausalLM", "fingerprint": "f" * 64}
    write_model_card(tmp_path, line="main", version=version, base=base, lineage=lineage, merged=False,
                     evaluations={"parity": {"exact_match": 0.75, "rouge_l": 0.8, "examples": 20}})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None  # a local base is no hub id: no base_model claimed
    assert "ties" in card.data.tags and "initial" not in card.data.tags
    [exact, rouge] = card.data.eval_results
    assert (exact.dataset_name, exact.metric_type, exact.metric_value) == ("parity", "exact_match", 0.75)
    assert rouge.metric_value == 0.8 and card.data.model_name == "main-v2"
    assert "| v2 | t2 | ties |" in card.text and "| parity | 0.750 | 0.800 | 20 |" in card.text
