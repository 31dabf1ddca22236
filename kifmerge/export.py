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


def point_adapter_at_base(out_dir: Path, base_dir: Path) -> None:
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def quiet_transformers() -> None:
    """kifmerge shows its own progress; transformers' per-call bars and notices only add noise."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def model_class_for(config: dict):
    """The transformers class named in the config (`architectures[0]`), else the Auto class."""
    import transformers

    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if config.get("is_encoder_decoder"):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def merge_adapter_into_base(adapter_dir: Path, base_dir: Path, base_config: dict, out_dir: Path) -> None:
    """peft: load base, apply the adapter, `merge_and_unload`, save as safetensors."""
    import torch
    from peft import PeftModel

    quiet_transformers()
    model = model_class_for(base_config).from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
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
    tasks = ", ".join(v["task"] for v in lineage if v["task"])
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
