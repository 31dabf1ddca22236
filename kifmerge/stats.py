"""Paired bootstrap over evaluation examples: confidence intervals for continual-learning
summaries, and for the difference between two methods evaluated on the same examples.

Every method is scored on the same examples of each task, so one resample of example
indices per task (drawn once, shared by all methods) gives paired replicates: the spread
of `AP(a) − AP(b)` over replicates is far narrower than that of either AP, because the
examples both methods find easy or hard move together. Resampling is stratified by task
(each task keeps its size), as the summaries average tasks, not examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Scores = Sequence[Sequence[float]]  # per task, per example (0/1 for exact match)


def resample_indices(sizes: Sequence[int], replicates: int = 2000, seed: int = 0) -> list[np.ndarray]:
    """Per task, a (replicates × size) array of example indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(replicates, n)) for n in sizes]


def task_means(scores: Scores, indices: list[np.ndarray]) -> np.ndarray:
    """(replicates × tasks) mean score of each task under each resample."""
    if len(scores) != len(indices):
        raise ValueError(f"{len(scores)} tasks of scores but {len(indices)} of indices")
    columns = []
    for task_scores, idx in zip(scores, indices, strict=True):
        values = np.asarray(task_scores, dtype=np.float64)
        if values.shape[0] != idx.shape[1]:
            raise ValueError(f"a task has {values.shape[0]} scored examples, the resample expects {idx.shape[1]}")
        columns.append(values[idx].mean(axis=1))
    return np.stack(columns, axis=1)


def interval(replicates: np.ndarray, point: float, level: float = 0.95) -> dict[str, float]:
    """Percentile interval of bootstrap replicates around the point estimate."""
    low, high = np.quantile(replicates, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"value": round(float(point), 6), "low": round(float(low), 6), "high": round(float(high), 6)}


def average_precision(final: Scores, indices: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """AP = mean over tasks of the final row: (point estimate, replicates)."""
    point = float(np.mean([np.mean(s) for s in final]))
    return point, task_means(final, indices).mean(axis=1)


def backward_transfer(final: Scores, reference: Scores, indices: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """mean_{j<T} final[j] − reference[j] (reference: learned, or the diagonal), paired per example."""
    last = len(final) - 1
    if last < 1:
        raise ValueError("backward transfer needs at least two tasks")
    diffs = [np.asarray(f, dtype=np.float64) - np.asarray(r, dtype=np.float64) for f, r in zip(final[:last], reference[:last], strict=True)]
    point = float(np.mean([d.mean() for d in diffs]))
    return point, task_means(diffs, indices[:last]).mean(axis=1)


def paired_difference(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], level: float = 0.95) -> dict:
    """CI of `a − b` from replicates drawn on the same resamples; `called` only when it excludes 0."""
    result = interval(a[1] - b[1], a[0] - b[0], level)
    result["called"] = "higher" if result["low"] > 0 else "lower" if result["high"] < 0 else "no difference"
    return result


def combine(estimates: Sequence[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """The mean of several estimates (seeds, orders) that share their resamples."""
    return float(np.mean([e[0] for e in estimates])), np.mean([e[1] for e in estimates], axis=0)

