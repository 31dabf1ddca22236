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
from kifmerge.limits import MAX_EXAMPLES
from kifmerge.registry.blobs import sha256_input
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


TASK_PREFIX = "task:"  # `task:NAME`: a registered task's own weights, before any fuse


def evaluate(ref: str, data: dict[str, str | Path], *, max_examples: int | None = 100, max_new_tokens: int = 8,
             max_length: int = 256, batch_size: int = 16, bf16: bool = False, bf16_force: bool = False, force: bool = False,
             registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Generate greedy answers of LINE@vN (`@v0`: the base, zero-shot), or of `task:NAME` (a
    registered task's own weights: base + its adapter merged, or its full weights), for each
    labelled data file, score them, and store the scores. A result for the same weights, data
    and settings is reused unless `force` (so a version whose weights are its task's, such as
    a line's first version, reuses the task's evaluation, and the other way round)."""
    from kifmerge.evaluation import generate_answers, score
    from kifmerge.precision import resolve_bf16
    from kifmerge.data import load_records

    if not data:
        raise UsageError("give at least one --data NAME=FILE")
    for label in data:
        check_name(label, "data label")
    if max_new_tokens < 1 or max_length < 8 or batch_size < 1 or (max_examples is not None and max_examples < 1):
        raise UsageError("--max-new-tokens, --max-length, --batch-size and --max-examples must be positive")
    if max_new_tokens > 65536 or max_length > 2**20 or batch_size > 65536 or (max_examples or 0) > MAX_EXAMPLES:
        raise UsageError(f"--max-new-tokens and --batch-size go up to 65536, --max-length to {2**20}, --max-examples to "
                         f"{MAX_EXAMPLES:,} (README: Limits)")
    settings = {"max_examples": max_examples, "max_new_tokens": max_new_tokens, "max_length": max_length}
    bf16 = resolve_bf16(bf16, bf16_force, what="evaluation")  # float32 where bf16 is not native, unless forced
    if bf16:  # only when asked: float32 results stored before this option keep matching
        settings["bf16"] = True
    with opened(registry) as reg:
        task = None
        if ref.startswith(TASK_PREFIX):
            task_row = reg.catalog.get("tasks", check_name(ref[len(TASK_PREFIX):], "task"), "task")
            task = task_row["name"]
            base_row = reg.catalog.get("bases", task_row["base"], "base")
            # rows of a task's evaluation: line "task:NAME" (no line name has a ':'), number 0
            line, number, subject, kind, weights = f"{TASK_PREFIX}{task}", 0, task_row["weights"], task_row["kind"], task_row["weights"]
            name = line
        else:
            line, number = parse_ref(ref)
            line_row = reg.catalog.get("lines", line, "line")
            base_row = reg.catalog.get("bases", line_row["base"], "base")
            kind, weights = line_row["kind"], None
            if number == 0:
                subject = f"base:{base_row['fingerprint']}"
            else:
                line, version = resolve_version(reg, ref)
                number, subject, weights = version["number"], version["weights"], version["weights"]
            name = f"{line}@v{number}"
        inputs = {label: (load_records(path, max_examples), sha256_input(Path(path))) for label, path in data.items()}
        results, rows, model = {}, [], None
        for label, (records, fingerprint) in inputs.items():
            known = None if force else reg.catalog.find_evaluation(subject, fingerprint, settings, base_row["name"])
            if known:
                metrics = _complete_metrics(reg, known)
                results[label] = {**metrics, "reused": True}
                rows.append({"metrics": metrics, "predictions": known["predictions"], "label": label, "data_fingerprint": fingerprint})
                continue
            if model is None:
                model, tokenizer, seq2seq = _model_for_evaluation(reg, base_row, kind, weights)
            t0 = time.perf_counter()
            answers = generate_answers(model, tokenizer, [r["input"] for r in records], seq2seq=seq2seq,
                                       max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size, bf16=bf16,
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
            reg.catalog.event("eval", name, {"labels": sorted(data), "settings": settings})
        return {"version": name, "task": task, "settings": settings, "results": results}


def _predictions(reg: Registry, sha: str | None, cache: dict[str, list[dict]] | None = None) -> list[dict] | None:
    """An evaluation's stored answers, [{output, prediction}] in the data's order (verified read)."""
    if not sha:
        return None
    if cache is not None and sha in cache:
        return cache[sha]
    found = json.loads(reg.blobs.read_bytes(sha))
    if cache is not None:
        cache[sha] = found
    return found


def _complete_metrics(reg: Registry, row: dict, cache: dict | None = None) -> dict[str, Any]:
    """The row's metrics, with the ones added since it was stored (`exact_match_cased`)
    recomputed from its stored predictions."""
    from kifmerge.evaluation import METRICS, score

    metrics = dict(row["metrics"])
    if any(m not in metrics for m in METRICS):
        pairs = _predictions(reg, row.get("predictions"), cache)
        if pairs:
            fresh = score([p["prediction"] for p in pairs], [p["output"] for p in pairs])
            metrics.update({m: fresh[m] for m in METRICS if m not in metrics})
    return metrics


def _model_for_evaluation(reg: Registry, base_row: dict, kind: str, weights: str | None):
    """The model to generate with: the base (`weights` None), base + a merged adapter (`kind`
    lora), or full weights — of a version or of a task."""
    from kifmerge.export import copy_model_side_files
    from kifmerge.modeling import is_seq2seq, load_model, load_tokenizer

    folder = base_dir(reg, base_row)
    tokenizer = load_tokenizer(folder)
    staging = reg.blobs.staging_dir()
    try:
        if weights is None:
            model = load_model(folder, base_row["config"])
        elif kind == "lora":
            reg.copy_weights(weights, staging)
            model = load_model(folder, base_row["config"], adapter_dir=staging, merge=True)
        else:
            reg.copy_weights(weights, staging)
            copy_model_side_files(folder, staging, include_config=True)
            model = load_model(folder, base_row["config"], weights_dir=staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer, is_seq2seq(base_row["config"])


def report(line: str, *, tasks: list[str] | None = None, metric: str = "exact_match", examples: bool = False,
           registry: str | os.PathLike | None = None) -> dict[str, Any]:
    """The continual-learning matrix R[i][j] (score on task j after version i; row 0 the base)
    from stored evaluations; `learned` L[j] (task j's own weights, evaluated with `kifmerge eval
    task:NAME`), the `diagonal` R[j][j]; the summaries AP, BWT_vs_learned, BWT_after_fuse,
    fuse_cost and FWT; per task the majority-class score and the predicted-answer distribution
    of the final row. `examples`: also the per-example scores of the final row, the diagonal
    and learned, in each data file's order (for paired bootstrap intervals)."""
    from kifmerge.evaluation import METRICS, summarise

    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}: choose {', '.join(METRICS)}")
    with opened(registry) as reg:
        reg.catalog.get("lines", line, "line")
        versions = reg.catalog.rows("versions", "line = ?", [line], order_by="number")
        cells: dict[tuple[int, str], dict] = {}
        for row in reg.catalog.rows("evaluations", "line = ?", [line], order_by="id"):
            cells[(row["number"], row["label"])] = row  # the newest evaluation wins
        labels = sorted({label for _, label in cells})
        ordered = tasks is not None
        if tasks is None:  # labels named like the fused tasks give the learning order
            learned_order = [v["task"] for v in versions if v["task"] in labels]
            ordered = len(learned_order) == len(versions)
            tasks = learned_order + [label for label in labels if label not in learned_order]
        missing = [t for t in tasks if t not in labels]
        if missing:
            raise NotFoundError(f"line {line!r} has no evaluation labelled {missing[0]!r}; run `kifmerge eval {line}@vN --data {missing[0]}=FILE`")
        cache: dict[str, list[dict]] = {}

        def value(row: dict | None, name: str = metric) -> float | None:
            return None if row is None else _complete_metrics(reg, row, cache).get(name)

        numbers = [0] + [v["number"] for v in versions]
        grid = [[cells.get((n, t)) for t in tasks] for n in numbers]
        final_row = grid[-1]
        done = min(len(versions), len(tasks)) if ordered else 0  # columns j whose task version j+1 fused
        diagonal_rows = [grid[j + 1][j] if j < done else None for j in range(len(tasks))]
        learned_tasks = [versions[j]["task"] if j < done else None for j in range(len(tasks))]
        learned_rows = [_learned_evaluation(reg, name, label, final)
                        for name, label, final in zip(learned_tasks, tasks, final_row, strict=True)]
        matrix = [[value(cell) for cell in row] for row in grid]
        learned = [value(row) for row in learned_rows]
        summary = summarise(matrix, learned)
        if not ordered:  # everything but AP needs column j to be the task version j+1 learned
            summary.update({k: None for k in summary if k != "AP"})
        em = "exact_match_cased" if metric == "exact_match_cased" else "exact_match"
        per_task = [_task_summary(reg, cache, label, final, diagonal, learned_row, learned_task, metric, em, value)
                    for label, final, diagonal, learned_row, learned_task
                    in zip(tasks, final_row, diagonal_rows, learned_rows, learned_tasks, strict=True)]
        result = {"line": line, "metric": metric, "tasks": tasks, "versions": [f"v{n}" for n in numbers],
                  "fused": [None] + [v["task"] for v in versions], "made_by": [None] + [_made_by(v) for v in versions],
                  "matrix": matrix,
                  "diagonal": [value(row) for row in diagonal_rows], "learned": learned, **summary,
                  "per_task": per_task,
                  "order": "learning" if ordered else "unknown: name the labels like the tasks, or pass --tasks in learning order"}
        if examples:
            result["examples"] = {name: [_example_scores(reg, cache, row, metric) for row in rows]
                                  for name, rows in (("final", final_row), ("diagonal", diagonal_rows), ("learned", learned_rows))}
        return result


def _made_by(version: dict) -> str:
    """How a version came to be, for the rows that fused no task (`rollback to v2`)."""
    if version["method"] == "rollback":
        return f"rollback to v{(version.get('params') or {}).get('to')}"
    return version["method"]


def _learned_evaluation(reg: Registry, task: str | None, label: str, final: dict | None) -> dict | None:
    """The newest evaluation of `task`'s own weights on `label` (`kifmerge eval task:NAME`, or
    a version with the very same weights); one on the same data and settings as the final row's
    is preferred, so that L and R are scored on the same examples."""
    task_row = reg.catalog.find("tasks", task) if task else None
    if task_row is None:
        return None
    found = [row for row in reg.catalog.rows("evaluations", "subject = ? and label = ?", [task_row["weights"], label],
                                             order_by="id desc") if reg.catalog.evaluated_base(row) == task_row["base"]]
    if final is not None:
        same = [row for row in found if row["data_fingerprint"] == final["data_fingerprint"] and row["settings"] == final["settings"]]
        found = same or found
    return found[0] if found else None


def _task_summary(reg: Registry, cache: dict, label: str, final: dict | None, diagonal: dict | None,
                  learned: dict | None, learned_task: str | None, metric: str, em: str, value) -> dict[str, Any]:
    from kifmerge.evaluation import answer_distribution

    out: dict[str, Any] = {
        "task": label, "learned_task": learned_task,
        "final": value(final), "diagonal": value(diagonal), "learned": value(learned),
        "final_exact_match": value(final, em), "learned_exact_match": value(learned, em),
        "examples": final["metrics"].get("examples") if final else None,
        "data_fingerprint": final["data_fingerprint"] if final else None,
        "learned_from": _evaluated(learned),
        "learned_same_data": (learned["data_fingerprint"] == final["data_fingerprint"] and learned["settings"] == final["settings"])
        if learned and final else None,
    }
    pairs = _predictions(reg, final.get("predictions"), cache) if final else None
    distribution = answer_distribution([p["prediction"] for p in pairs], [p["output"] for p in pairs],
                                       cased=em == "exact_match_cased") if pairs else \
        {"majority_answer": None, "majority_class": None, "predictions": [], "predictions_other": None}
    return {**out, **distribution}


def _evaluated(row: dict | None) -> str | None:
    if row is None:
        return None
    return row["line"] if row["line"].startswith(TASK_PREFIX) else f"{row['line']}@v{row['number']}"


def _example_scores(reg: Registry, cache: dict, row: dict | None, metric: str) -> list[float] | None:
    from kifmerge.evaluation import per_example

    pairs = _predictions(reg, row.get("predictions"), cache) if row else None
    if not pairs:
        return None
    return per_example(metric, [p["prediction"] for p in pairs], [p["output"] for p in pairs])
