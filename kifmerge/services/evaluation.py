"""Evaluating versions and building the continual-learning report."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kifmerge.errors import NotFoundError, UsageError
from kifmerge.registry import Registry
from kifmerge.registry.blobs import sha256_file
from kifmerge.services.common import (
    Progress,
    base_dir,
    check_name,
    now,
    opened,
    parse_ref,
    resolve_version,
    start_progress,
)


def evaluate(ref: str, data: dict[str, str | Path], *, max_examples: int | None = 100, max_new_tokens: int = 8,
             max_length: int = 256, batch_size: int = 16, force: bool = False,
             registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Generate greedy answers of LINE@vN (`@v0`: the base, zero-shot) for each labelled data
    file, score them, and store the scores. A result for the same weights, data and settings
    is reused unless `force`."""
    from kifmerge.evaluation import generate_answers, score
    from kifmerge.training import load_records

    if not data:
        raise UsageError("give at least one --data NAME=FILE")
    for label in data:
        check_name(label, "data label")
    if max_new_tokens < 1 or max_length < 8 or batch_size < 1 or (max_examples is not None and max_examples < 1):
        raise UsageError("--max-new-tokens, --max-length, --batch-size and --max-examples must be positive")
    settings = {"max_examples": max_examples, "max_new_tokens": max_new_tokens, "max_length": max_length}
    with opened(registry) as reg:
        line, number = parse_ref(ref)
        line_row = reg.catalog.get("lines", line, "line")
        base_row = reg.catalog.get("bases", line_row["base"], "base")
        if number == 0:
            version, subject = None, f"base:{base_row['fingerprint']}"
        else:
            line, version = resolve_version(reg, ref)
            subject = version["weights"]
        number = version["number"] if version else 0
        inputs = {label: (load_records(path, max_examples), sha256_file(Path(path))) for label, path in data.items()}
        results, rows, model = {}, [], None
        for label, (records, fingerprint) in inputs.items():
            known = None if force else reg.catalog.find_evaluation(subject, fingerprint, settings)
            if known:
                results[label] = {**known["metrics"], "reused": True}
                rows.append({**{k: known[k] for k in ("metrics", "predictions")}, "label": label, "data_fingerprint": fingerprint})
                continue
            if model is None:
                model, tokenizer, seq2seq = _model_for_evaluation(reg, base_row, line_row, version)
            t0 = time.perf_counter()
            answers = generate_answers(model, tokenizer, [r["input"] for r in records], seq2seq=seq2seq,
                                       max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size,
                                       advance=start_progress(progress, f"evaluating {label}", len(records)))
            metrics = {**score(answers, [r["output"] for r in records]), "seconds": round(time.perf_counter() - t0, 3)}
            predictions = reg.blobs.put_bytes(json.dumps(
                [{"output": r["output"], "prediction": a} for r, a in zip(records, answers, strict=True)]).encode())
            results[label] = {**metrics, "reused": False}
            rows.append({"metrics": metrics, "predictions": predictions, "label": label, "data_fingerprint": fingerprint})
        with reg.catalog.transaction():
            for row in rows:
                reg.catalog.insert("evaluations", {**row, "line": line, "number": number, "subject": subject,
                                                   "settings": settings, "created": now()})
            reg.catalog.event("eval", f"{line}@v{number}", {"labels": sorted(data), "settings": settings})
        return {"version": f"{line}@v{number}", "settings": settings, "results": results}


def _model_for_evaluation(reg: Registry, base_row: dict, line_row: dict, version: dict | None):
    """The model of a version, ready to generate: base, base + merged adapter, or full weights."""
    import torch

    from kifmerge.export import model_class_for, quiet_transformers
    from kifmerge.training import is_seq2seq, load_tokenizer

    quiet_transformers()
    folder = base_dir(reg, base_row)
    tokenizer = load_tokenizer(folder)
    cls = model_class_for(base_row["config"])
    staging = reg.blobs.staging_dir()
    try:
        if version is None:
            model = cls.from_pretrained(folder, dtype=torch.float32)
        elif line_row["kind"] == "lora":
            from peft import PeftModel

            reg.copy_weights(version["weights"], staging)
            model = PeftModel.from_pretrained(cls.from_pretrained(folder, dtype=torch.float32), staging).merge_and_unload()
        else:
            from kifmerge.export import copy_model_side_files

            reg.copy_weights(version["weights"], staging)
            copy_model_side_files(folder, staging, include_config=True)
            model = cls.from_pretrained(staging, dtype=torch.float32)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer, is_seq2seq(base_row["config"])


def report(line: str, *, tasks: list[str] | None = None, metric: str = "exact_match",
           registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """The continual-learning matrix R[i][j] (score on task j after version i; row 0 the base)
    from stored evaluations, with AP, BWT and FWT."""
    from kifmerge.evaluation import summarise

    if metric not in ("exact_match", "rouge_l"):
        raise UsageError(f"unknown metric {metric!r}: choose exact_match or rouge_l")
    with opened(registry) as reg:
        reg.catalog.get("lines", line, "line")
        versions = reg.catalog.rows("versions", "line = ?", [line], order_by="number")
        scores: dict[tuple[int, str], float] = {}
        for row in reg.catalog.rows("evaluations", "line = ?", [line], order_by="id"):
            scores[(row["number"], row["label"])] = row["metrics"][metric]  # the newest evaluation wins
        labels = sorted({label for _, label in scores})
        ordered = tasks is not None
        if tasks is None:  # labels named like the fused tasks give the learning order
            learned = [v["task"] for v in versions if v["task"] in labels]
            ordered = len(learned) == len(versions)
            tasks = learned + [label for label in labels if label not in learned]
        missing = [t for t in tasks if t not in labels]
        if missing:
            raise NotFoundError(f"line {line!r} has no evaluation labelled {missing[0]!r}; run `kifmerge eval {line}@vN --data {missing[0]}=FILE`")
        rows = [0] + [v["number"] for v in versions]
        matrix = [[scores.get((n, t)) for t in tasks] for n in rows]
        summary = summarise(matrix)
        if not ordered:  # BWT and FWT need column j to be the task version j+1 learned
            summary.update(BWT=None, FWT=None)
        return {"line": line, "metric": metric, "tasks": tasks, "versions": [f"v{n}" for n in rows],
                "fused": [None] + [v["task"] for v in versions], "matrix": matrix, **summary,
                "order": "learning" if ordered else "unknown: name the labels like the tasks, or pass --tasks in learning order"}
