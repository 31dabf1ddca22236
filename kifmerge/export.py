"""Export a version as a folder Hugging Face tools load: a PEFT adapter, or a full model
(merged into the base with peft's `merge_and_unload`), plus a model card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from kifmerge.checkpoints import ADAPTER_CONFIG, WEIGHT_SUFFIXES

CONFIG_FILES = ("config.json", "generation_config.json")
HUB_SHARD_SIZE = "5GB"  # the hub's shard convention, and `fuse --shard-size`'s default
TAGS = ["kifmerge", "continual-learning", "model-merging"]


def copy_model_side_files(base_dir: Path, out_dir: Path, *, include_config: bool) -> None:
    """Tokenizer, generation config and similar files of the base; never its weights."""
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            continue
        if path.name in (ADAPTER_CONFIG, "README.md") or (path.name in CONFIG_FILES and not include_config):
            continue
        if not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)


# the tokenizer's files as transformers saves them (and the hub serves them): what
# `AutoTokenizer.from_pretrained(folder)` reads
TOKENIZER_NAMES = {"special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json"}
FILE_MODE = 0o644  # exported files: readable by everyone, as a published model's files are


def is_tokenizer_file(path: Path) -> bool:
    return path.name.startswith("tokenizer") or path.name in TOKENIZER_NAMES or path.suffix == ".tiktoken"


def copy_tokenizer_files(base_dir: Path, out_dir: Path) -> list[str]:
    """The base's tokenizer files, into an adapter folder (so that the adapter folder alone
    gives `AutoTokenizer.from_pretrained(folder)`); returns their names."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and is_tokenizer_file(path) and not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def base_reference(base: dict, base_dir: Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) an exported adapter names its base by: the hub id and
    the commit of its snapshot when the base was registered from the hub (loads wherever that
    repository is reachable or cached); else the base folder's absolute path. (Not a path
    relative to the export: transformers resolves a relative path against the current folder,
    not the adapter's, so it would load only from one folder.)"""
    if base.get("hub_id"):
        return base["hub_id"], base.get("revision")
    return str(Path(base_dir).resolve()), None


def point_adapter_at_base(out_dir: Path, base: dict, base_dir: Path) -> str:
    """Write the base reference into the adapter's config (peft's `base_model_name_or_path`,
    and `revision` for a hub id); returns the reference."""
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    reference, revision = base_reference(base, base_dir)
    config["base_model_name_or_path"] = reference
    if revision:
        config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return reference


def make_readable(folder: Path) -> None:
    """Every file of an export gets mode 0644 (some writers create theirs 0600)."""
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(FILE_MODE)


def quiet_transformers() -> None:
    """kifmerge shows its own progress; transformers' per-call bars and notices only add noise."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def merge_adapter_into_base(adapter_dir: Path, base_dir: Path, base_config: dict, out_dir: Path) -> None:
    """peft: load base, apply the adapter, `merge_and_unload`, save as safetensors."""
    from kifmerge.modeling import load_model

    merged = load_model(base_dir, base_config, adapter_dir=adapter_dir, merge=True)
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=HUB_SHARD_SIZE)  # hub-style shards + index
    copy_model_side_files(base_dir, out_dir, include_config=False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pipeline_tag(architecture: str) -> str | None:
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if architecture.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
        return "text2text-generation"
    return None


def card_data(*, line: str, version: dict, base: dict, lineage: list[dict], adapter: bool, evaluations: dict[str, dict]):
    """The card's YAML metadata in the hub's terms: `base_model` (only a hub id: a local path
    is not one) with `base_model_relation` `adapter` (a LoRA export) or `merge` (a merged or
    full model); tags (the fusion methods of the lineage among them); and the stored `eval`
    scores as model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    methods = [m for m in dict.fromkeys(v["method"] for v in lineage) if m and m not in ("initial", "rollback")]
    task_type = pipeline_tag(base.get("architecture") or "") or "text-generation"
    results = [EvalResult(task_type=task_type, dataset_type=label, dataset_name=label, metric_type=metric,
                          metric_name=name, metric_value=round(float(scores[metric]), 4))
               for label, scores in evaluations.items()
               for metric, name in (("exact_match", "exact match"), ("rouge_l", "ROUGE-L")) if scores.get(metric) is not None]
    hub_id = base.get("hub_id")
    return ModelCardData(
        base_model=hub_id or None,
        base_model_relation=("adapter" if adapter else "merge") if hub_id else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=pipeline_tag(base.get("architecture") or ""),
        tags=[*TAGS, *methods, *(["lora"] if version["kind"] == "lora" else [])],
        model_name=f"{line}-v{version['number']}" if results else None,
        eval_results=results or None,
    )


def write_model_card(out_dir: Path, *, line: str, version: dict, base: dict, lineage: list[dict], merged: bool,
                     evaluations: dict[str, dict] | None = None) -> dict[str, str]:
    """A README.md model card with base, tasks, method, parameters, lineage, stored evaluation
    scores and file hashes."""
    from huggingface_hub import ModelCard

    hashes = {p.name: sha256_of(p) for p in sorted(out_dir.iterdir())
              if p.is_file() and p.suffix == ".safetensors"}
    adapter = version["kind"] == "lora" and not merged
    data = card_data(line=line, version=version, base=base, lineage=lineage, adapter=adapter, evaluations=evaluations or {})
    rows = "\n".join(
        f"| v{v['number']} | {v['task'] or '—'} | {v['method']} | `{json.dumps(v['params'] or {}, sort_keys=True)}` | {v['created']} |"
        for v in lineage)
    files = "\n".join(f"| `{name}` | `{sha}` |" for name, sha in hashes.items())
    scores = "\n".join(f"| {label} | {m['exact_match']:.3f} | {m['rouge_l']:.3f} | {m['examples']} |"
                       for label, m in (evaluations or {}).items())
    evaluation = f"""
## Evaluation (`kifmerge eval`, greedy)

| data | exact match | ROUGE-L | examples |
| --- | --- | --- | --- |
{scores}
""" if scores else ""
    from kifmerge.registry.catalog import held_tasks

    tasks = ", ".join(held_tasks(lineage)) or "none"
    source = (f"hub model `{base['hub_id']}` at commit `{base.get('revision') or '?'}`" if base.get("hub_id")
              else f"local folder `{base['path']}`")
    body = f"""
# {line} v{version['number']}

Produced by kifmerge (importance-guided merging, KIF / TaSL) as version
{version['number']} of line `{line}`. {"A LoRA adapter" if adapter else "A full model"} on base
`{base['name']}` ({base['architecture']}, {source}, fingerprint `{base['fingerprint'][:16]}`).

Tasks learned, in order: {tasks}.

## Lineage

| version | fused task | method | parameters | created |
| --- | --- | --- | --- | --- |
{rows}

{evaluation}
## Files

| file | sha256 |
| --- | --- |
{files}
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(out_dir / "README.md")
    return hashes
