"""Evaluation: greedy generation, answer scoring, and the continual-learning summaries.

Scoring is exact match after normalisation (strip, case-fold, collapse whitespace) plus
ROUGE-L F1 over whitespace tokens for free-text answers. The continual-learning matrix
R[i][j] is the score on task j after version i (row 0: the base, zero-shot):
    AP  = mean_j R[T][j]
    BWT = mean_{j<T} (R[T][j] − R[j][j])
    FWT = mean_{j>1} (R[j−1][j] − R[0][j])
"""

from __future__ import annotations

import re
from typing import Callable

WHITESPACE = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    return WHITESPACE.sub(" ", text.strip()).casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised whitespace tokens."""
    pred, ref = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for token in pred:
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {"exact_match": round(sum(map(exact_match, predictions, references)) / n, 6),
            "rouge_l": round(sum(map(rouge_l, predictions, references)) / n, 6), "examples": n}


def first_line(text: str) -> str:
    """A generated answer ends at the first line break (the model may go on rambling)."""
    return text.strip().split("\n", 1)[0].strip()


def generate_answers(model, tokenizer, prompts: list[str], *, seq2seq: bool, max_new_tokens: int, max_length: int,
                     batch_size: int, advance: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers, batched; causal prompts are left-padded and truncated in the middle
    exactly as in training (instruction and answer cue kept)."""
    import torch

    from kifmerge.training import Encoder

    encoder = Encoder(tokenizer, seq2seq, max_length)
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encoder.prompt_ids(p, max_length - (0 if seq2seq else max_new_tokens)) for p in prompts[start:start + batch_size]]
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        if seq2seq:
            ids = [c + [pad] * (width - len(c)) for c in chunk]
            mask = [[1] * len(c) + [0] * (width - len(c)) for c in chunk]
        else:
            ids = [[pad] * (width - len(c)) + c for c in chunk]
            mask = [[0] * (width - len(c)) + [1] * len(c) for c in chunk]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        new = out if seq2seq else out[:, width:]
        answers.extend(first_line(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
        if advance:
            advance(len(chunk))
    return answers


def summarise(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """AP, BWT, FWT from R: row 0 the base (zero-shot), row i the version that learned task
    i−1 (columns in learning order; a single-version multi-task line has more columns than
    versions). A summary whose inputs are missing is None."""
    T = len(matrix) - 1
    final = matrix[T] if T >= 1 else []
    learned = min(T, len(final))
    ap = _mean(final) if final and None not in final else None
    backward = [(final[j], matrix[j + 1][j]) for j in range(learned - 1)]
    forward = [(matrix[j][j], matrix[0][j]) for j in range(1, learned)]
    bwt = _mean([a - b for a, b in backward]) if backward and all(None not in p for p in backward) else None
    fwt = _mean([a - b for a, b in forward]) if forward and all(None not in p for p in forward) else None
    return {"AP": ap, "BWT": bwt, "FWT": fwt}


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)
