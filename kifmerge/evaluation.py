"""Evaluation: greedy generation, answer scoring, and the continual-learning summaries.

Scoring is exact match after normalisation (strip, case-fold, collapse whitespace), the
same without case-folding (`exact_match_cased`: label sets such as P/p stay apart), plus
ROUGE-L F1 over whitespace tokens for free-text answers. The continual-learning matrix
R[i][j] is the score on task j after version i (row 0: the base, zero-shot); L[j] is the
score on task j of task j's own trained weights, before any fuse ("learned"):
    AP             = mean_j R[T][j]
    BWT_vs_learned = mean_{j<T} (R[T][j] − L[j])    forgetting, including what the fuse gives up
    BWT_after_fuse = mean_{j<T} (R[T][j] − R[j][j])  forgetting after each task's own fuse
    fuse_cost      = mean_{j>1} (L[j] − R[j][j])     what fusing task j costs it at once (task 1 becomes v1 as it is)
    FWT            = mean_{j>1} (R[j−1][j] − R[0][j])
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from typing import Callable

WHITESPACE = re.compile(r"\s+")


def normalise_answer(text: str, *, cased: bool = False) -> str:
    collapsed = WHITESPACE.sub(" ", text.strip())
    return collapsed if cased else collapsed.casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def exact_match_cased(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction, cased=True) == normalise_answer(reference, cased=True))


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


PER_EXAMPLE = {"exact_match": exact_match, "exact_match_cased": exact_match_cased, "rouge_l": rouge_l}
METRICS = tuple(PER_EXAMPLE)


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {**{name: round(sum(map(fn, predictions, references)) / n, 6) for name, fn in PER_EXAMPLE.items()},
            "examples": n}


def per_example(metric: str, predictions: list[str], references: list[str]) -> list[float]:
    """One score per example (0/1 for exact match), in the data's order."""
    return [PER_EXAMPLE[metric](p, r) for p, r in zip(predictions, references, strict=True)]


def answer_distribution(predictions: list[str], references: list[str], *, cased: bool = False,
                        top: int = 5) -> dict[str, object]:
    """Label bias at a glance: the majority-class score (the share of references equal to the
    most common reference: what answering that one label everywhere would score) and the most
    common predicted answers with their shares (`top` of them, the rest as one "other" share).
    Answers are compared normalised, case-folded unless `cased`."""
    n = len(references)
    if n == 0:
        return {"majority_answer": None, "majority_class": None, "predictions": [], "predictions_other": 0.0}
    refs = Counter(normalise_answer(r, cased=cased) for r in references)
    majority, count = min(refs.items(), key=lambda kv: (-kv[1], kv[0]))
    preds = sorted(Counter(normalise_answer(p, cased=cased) for p in predictions).items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [{"answer": answer, "share": round(k / n, 6)} for answer, k in preds[:top]]
    return {"majority_answer": majority, "majority_class": round(count / n, 6), "predictions": shown,
            "predictions_other": round(sum(k for _, k in preds[top:]) / n, 6)}


def first_line(text: str) -> str:
    """A generated answer ends at the first line break (the model may go on rambling)."""
    return text.strip().split("\n", 1)[0].strip()


MIN_SHARED_PREFIX = 8  # prompt tokens every prompt starts with, worth one forward of their own


def generate_answers(model, tokenizer, prompts: list[str], *, seq2seq: bool, max_new_tokens: int, max_length: int,
                     batch_size: int, bf16: bool = False, advance: Callable[[int], None] | None = None,
                     references: list[str] | None = None, share_prefix: bool = True) -> list[str]:
    """Greedy answers, in the prompts' order; causal prompts are left-padded and truncated in
    the middle exactly as in training (instruction and answer cue kept, room left for
    `max_new_tokens`). Prompts are batched by length (sorted, so a batch carries little padding);
    `bf16` generates under bfloat16 autocast. Prompts of chat records (kifmerge/chat.py
    `Conversation`) are rendered by the tokenizer's chat template with the generation prompt, as
    in training.

    Work that cannot change an answer is skipped:
    - causal prompts that all start with the same tokens (a task's instruction) share that
      prefix's keys and values: it is run once, not once per example (`share_prefix`); each row is
      laid out as prefix, padding, rest of the prompt, with positions counted over real tokens
      only, so every row computes what it would alone;
    - under `bf16`, the linear layers' weights are cast to bfloat16 once for the call (autocast
      would cast them at every forward, each generated token included; the products are the same).

    `references` (the labels; not used by `kifmerge eval`): generation stops after the longest
    reference's tokens plus one (its end-of-text, or the token that makes an answer longer than
    every label). That cannot turn a wrong answer right or a right one wrong in practice, but it
    cuts the stored text of longer answers, and it saves little: the prompts cost most
    (benchmarks/results/eval_speed.md).
    """
    import torch

    from kifmerge.data import Encoder
    from kifmerge.modeling import cast_linear_weights

    encoder = Encoder(tokenizer, seq2seq, max_length)
    model.eval()
    encoded = [encoder.prompt_ids(p, max_length - (0 if seq2seq else max_new_tokens)) for p in prompts]
    limit = max_new_tokens
    if references:
        limit = min(max_new_tokens, longest_answer(tokenizer, prompts, references, seq2seq) + 1)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str | None] = [None] * len(encoded)
    pad = tokenizer.pad_token_id
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    restore = cast_linear_weights(model, torch.bfloat16) if bf16 else (lambda: None)
    try:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            prefix, prefix_cache = (0, None) if seq2seq or not share_prefix else _shared_prefix(model, encoded, device)
            for start in range(0, len(order), batch_size):
                members = order[start:start + batch_size]
                chunk = [encoded[i][prefix:] for i in members]
                width = max(map(len, chunk))
                head = encoded[members[0]][:prefix]
                if seq2seq:
                    ids = [c + [pad] * (width - len(c)) for c in chunk]
                    mask = [[1] * len(c) + [0] * (width - len(c)) for c in chunk]
                else:
                    ids = [head + [pad] * (width - len(c)) + c for c in chunk]
                    mask = [[1] * prefix + [0] * (width - len(c)) + [1] * len(c) for c in chunk]
                extra = {}
                if prefix_cache is not None:
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(chunk))
                    extra[_cache_keyword(model)] = cache
                out = model.generate(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
                                     do_sample=False, num_beams=1, max_new_tokens=limit, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id, **extra)
                new = out if seq2seq else out[:, prefix + width:]
                for i, text in zip(members, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                    answers[i] = first_line(text)
                if advance:
                    advance(len(chunk))
    finally:
        restore()
    return answers


def longest_answer(tokenizer, prompts: list, references: list[str], seq2seq: bool) -> int:
    """Tokens of the longest reference as the model would write it after its prompt (as in
    training: kifmerge.data.Encoder), end-of-text not counted."""
    from kifmerge.data import answer_text

    eos = tokenizer.eos_token_id
    longest = 0
    for prompt, reference in zip(prompts, references, strict=True):
        if seq2seq:
            ids = tokenizer(text_target=reference)["input_ids"]
            ids = ids[:-1] if ids and ids[-1] == eos else ids
        else:
            ids = tokenizer(answer_text(prompt, reference), add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
    return longest


def _shared_prefix(model, encoded: list[list[int]], device: str):
    """(length, key/value cache) of the tokens every prompt starts with, leaving each prompt at least
    one token of its own; (0, None) when that is short or the model's cache cannot be shared."""
    import torch

    shortest = min(map(len, encoded))
    first = encoded[0]
    length = 0
    while length < shortest - 1 and all(e[length] == first[length] for e in encoded):
        length += 1
    if length < MIN_SHARED_PREFIX or len(encoded) < 2 or getattr(getattr(model, "generation_config", None), "cache_implementation", None):
        return 0, None
    try:
        from transformers import DynamicCache
    except ImportError:
        return 0, None
    out = model(input_ids=torch.tensor([first[:length]], device=device), use_cache=True,
                **({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}))
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not hasattr(cache, "batch_repeat_interleave") or (
            layers is not None and any(type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in layers)):
        return 0, None  # quantised, static, linear-attention or other caches: generate each prompt whole
    return length, cache


def _cache_keyword(model) -> str:
    """What the model (and so generate) calls the cache to continue from: `cache` (transformers ≥ 5),
    else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def summarise(matrix: list[list[float | None]], learned: list[float | None] | None = None) -> dict[str, float | None]:
    """AP, BWT_vs_learned, BWT_after_fuse, fuse_cost and FWT from R (row 0 the base, zero-shot;
    row i the version that learned task i−1, columns in learning order; a single-version
    multi-task line has more columns than versions) and L (`learned`, aligned with the
    columns). A summary whose inputs are missing is None."""
    T = len(matrix) - 1
    final = matrix[T] if T >= 1 else []
    done = min(T, len(final))  # columns that a version has learned
    L = list(learned) if learned is not None else [None] * len(final)
    diagonal = [matrix[j + 1][j] for j in range(done)]
    ap = _mean(final) if final and None not in final else None
    return {"AP": ap,
            "BWT_vs_learned": _mean_difference([(final[j], L[j]) for j in range(done - 1)]),
            "BWT_after_fuse": _mean_difference([(final[j], diagonal[j]) for j in range(done - 1)]),
            # over the fused tasks: the first becomes v1 as it is, and its zero would dilute the cost by 1/T
            "fuse_cost": _mean_difference([(L[j], diagonal[j]) for j in range(1, done)]),
            "FWT": _mean_difference([(matrix[j][j], matrix[0][j]) for j in range(1, done)])}


def _mean_difference(pairs: list[tuple[float | None, float | None]]) -> float | None:
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return _mean([a - b for a, b in pairs])


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)
