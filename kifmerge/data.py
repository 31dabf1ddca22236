"""Task data: records read from JSON / JSONL (plain or gzip) files, chat messages, encoding with
the prompt masked, and collation into batches.

Causal LMs learn only the answer: prompt tokens are labelled -100 (masks built from lengths,
never from the pad id, which often equals end-of-text). Batches are left-padded so every
answer sits at the right edge, which lets the loss ask the model for logits of the last few
positions only (`logits_to_keep`). Where the model keeps packed sequences apart and it saves
work, a batch's sequences are packed into fewer rows instead of padded to the longest
(`Collator.pack`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kifmerge.chat import Conversation, chat_record, render_prompt
from kifmerge.errors import InvalidInputError

IGNORE = -100
CUE_TOKENS = 16  # prompt tokens kept at the end when a prompt is truncated (the answer cue)


def load_records(path: str | Path, max_examples: int | None = None) -> list[dict[str, str]]:
    """A JSON list or JSONL of {"input", "output"} records, or of {"messages": […]} chat records
    (kifmerge/chat.py), gzip-compressed when the name ends in `.gz` (FILE.jsonl.gz, FILE.json.gz);
    a bad record is named by file and line."""
    from kifmerge.checkpoints import read_text

    path = Path(path)
    text = read_text(path, "data file")
    records = [_check_record(path, line, obj) for obj, line in _json_values(path, text)]
    if not records:
        raise InvalidInputError(f"{path} holds no records")
    return records[:max_examples] if max_examples else records


def _json_values(path: Path, text: str):
    """(value, line) for each element of a JSON array, or each line of JSONL."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped.startswith("["):
        position = text.index("[") + 1
        while True:
            position = _skip_space(text, position)
            if position < len(text) and text[position] == "]":
                return
            line = text.count("\n", 0, position) + 1
            start = position
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise InvalidInputError(f"{path}:{line}: a record nested too deeply") from None
            _check_record_size(path, line, position - start)
            yield value, line
            position = _skip_space(text, position)
            if position < len(text) and text[position] == ",":
                position += 1
            elif position >= len(text) or text[position] != "]":
                raise InvalidInputError(f"{path}:{text.count(chr(10), 0, position) + 1}: expected ',' or ']' between records")
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 etc. may sit in a string
        if line.strip():
            _check_record_size(path, number, len(line))
            try:
                yield json.loads(line), number
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise InvalidInputError(f"{path}:{number}: a record nested too deeply") from None


def _check_record_size(path: Path, line: int, size: int) -> None:
    """A record longer than MAX_RECORD_BYTES characters is refused (exit 4) before it is decoded
    (JSONL) or kept (a JSON array's element)."""
    from kifmerge.limits import MAX_RECORD_BYTES

    if size > MAX_RECORD_BYTES:
        raise InvalidInputError(f"{path}:{line}: a record of {size:,} characters; kifmerge's limit is {MAX_RECORD_BYTES:,} "
                                "(README: Limits)")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _check_record(path: Path, line: int, obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{path}:{line}: a record must be an object with \"input\" and \"output\" (or \"messages\")")
    if "messages" in obj:
        return chat_record(path, line, obj)
    for key in ("input", "output"):
        if not isinstance(obj.get(key), str) or (key == "output" and not obj[key].strip()):
            raise InvalidInputError(f"{path}:{line}: record lacks a non-empty string {key!r}")
    return {"input": obj["input"], "output": obj["output"]}


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not val_fraction:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * val_fraction)))
    if n_val >= len(records):
        raise InvalidInputError(f"--val-fraction {val_fraction} leaves no training examples out of {len(records)}")
    val = {i for i in order[:n_val]}
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# ---- tokenisation and batches -----------------------------------------------------------------
def answer_text(prompt: str, answer: str) -> str:
    """The answer as it continues the prompt: a space is added unless the prompt ends in whitespace
    (or is a chat prompt: the template's generation prompt is where the answer starts)."""
    return answer if not prompt or prompt[-1].isspace() or isinstance(prompt, Conversation) else " " + answer


@dataclass
class Encoder:
    tokenizer: Any
    seq2seq: bool
    max_length: int

    def prompt_ids(self, prompt: str, budget: int | None = None) -> list[int]:
        """Prompt tokens; when too long, the middle is cut so the instruction and the cue stay. A chat
        prompt is rendered by the chat template, which writes its own special tokens (causal LMs)."""
        if isinstance(prompt, Conversation):
            ids = self.tokenizer(render_prompt(self.tokenizer, prompt), add_special_tokens=self.seq2seq)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        budget = self.max_length if budget is None else budget
        if len(ids) > budget:
            tail = min(CUE_TOKENS, budget // 4)
            ids = ids[: budget - tail] + ids[len(ids) - tail:]
        return ids

    def __call__(self, record: dict[str, str]) -> dict[str, list[int]]:
        if self.seq2seq:
            labels = self.tokenizer(text_target=record["output"], truncation=True, max_length=self.max_length - 1)["input_ids"]
            if not labels or labels[-1] != self.tokenizer.eos_token_id:
                labels = labels + [self.tokenizer.eos_token_id]  # the decoder must learn to stop
            return {"input_ids": self.prompt_ids(record["input"]), "labels": labels}
        answer = self.tokenizer(answer_text(record["input"], record["output"]), add_special_tokens=False)["input_ids"]
        answer = answer[: self.max_length // 2] + [self.tokenizer.eos_token_id]
        prompt = self.prompt_ids(record["input"], self.max_length - len(answer))
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


@dataclass
class Collator:
    """Pads a batch: causal LMs on the left (answers aligned at the right edge), seq2seq on the right.

    `pack` (causal LMs whose forward keeps sequences packed in one row apart: `packs_sequences`):
    the relative cost of attention per token pair (`packing_cost`). When it makes the batch
    cheaper, its sequences are packed into fewer rows, each row a run of whole sequences (positions
    restarting at 0) and its padding as one more such run, so padding up to the longest sequence
    is not computed; the model attends within each sequence only, so every sequence computes what
    it would alone."""

    pad_id: int
    seq2seq: bool
    window: bool = True  # the model accepts `logits_to_keep`
    pack: float | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pack is not None and not self.seq2seq:
            rows = pack_rows([len(f["input_ids"]) for f in features], self.pack)
            if rows is not None:
                return self._packed(features, rows)
        if self.seq2seq:
            longest_label = max(len(f["labels"]) for f in features)
            return {
                "input_ids": torch.tensor([f["input_ids"] + [self.pad_id] * (longest - len(f["input_ids"])) for f in features]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]),
                "labels": torch.tensor([f["labels"] + [IGNORE] * (longest_label - len(f["labels"])) for f in features]),
            }
        pads = [longest - len(f["input_ids"]) for f in features]
        mask = torch.tensor([[0] * p + [1] * len(f["input_ids"]) for p, f in zip(pads, features, strict=True)])
        batch = {
            "input_ids": torch.tensor([[self.pad_id] * p + f["input_ids"] for p, f in zip(pads, features, strict=True)]),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": torch.tensor([[IGNORE] * p + f["labels"] for p, f in zip(pads, features, strict=True)]),
        }
        answer = max(sum(1 for t in f["labels"] if t != IGNORE) for f in features)
        batch["logits_to_keep"] = answer + 1 if self.window else longest
        return batch

    def _packed(self, features: list[dict[str, list[int]]], rows: list[list[int]]) -> dict[str, Any]:
        """Rows of whole sequences; `logits_to_keep` the positions (of any row) that predict an answer
        token of their own sequence, `answer_targets` those tokens (IGNORE elsewhere)."""
        width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
        ids, positions, labels, predicts = [], [], [], []
        for row in rows:
            row_ids, row_positions, row_labels, row_predicts = [], [], [], []
            for i in row:
                f = features[i]
                n = len(f["input_ids"])
                row_ids += f["input_ids"]
                row_positions += range(n)
                row_labels += f["labels"]
                row_predicts += [f["labels"][j + 1] != IGNORE for j in range(n - 1)] + [False]
            rest = width - len(row_ids)
            ids.append(row_ids + [self.pad_id] * rest)
            positions.append(row_positions + list(range(rest)))
            labels.append(row_labels + [IGNORE] * rest)
            predicts.append(row_predicts + [False] * rest)
        labels_t, predicts_t = torch.tensor(labels), torch.tensor(predicts)
        keep = predicts_t.any(dim=0).nonzero().flatten()
        targets = torch.where(predicts_t[:, keep], labels_t[:, keep + 1], IGNORE)
        return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions), "labels": labels_t,
                "logits_to_keep": keep, "answer_targets": targets}


def pack_rows(lengths: list[int], attention: float, gain: float = 0.05) -> list[list[int]] | None:
    """The cheapest arrangement of sequences of these lengths into rows (longest first, each into
    the shortest row so far), by the cost rows × width × (1 + attention × width): the token-wise work
    plus attention, which grows with the width. None when one sequence per row (padded) is within
    `gain` of it."""
    padded = len(lengths) * max(lengths) * (1 + attention * max(lengths))
    best, best_cost = None, padded * (1 - gain)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for count in range(1, len(lengths)):
        rows: list[list[int]] = [[] for _ in range(count)]
        sums = [0] * count
        for i in order:
            r = sums.index(min(sums))
            rows[r].append(i)
            sums[r] += lengths[i]
        width = max(sums)
        cost = count * width * (1 + attention * width)
        if cost < best_cost:
            best, best_cost = [sorted(row) for row in rows], cost
    return best
