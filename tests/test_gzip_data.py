"""Gzip-compressed data files (`FILE.jsonl.gz`, `FILE.json.gz`) through the public CLI: they
train and evaluate exactly like the plain file, and a corrupt one is one line on stderr with
exit 4, like any other bad data file."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import task_records, write_jsonl
from test_training import task_weights


def gzipped(path, out):
    out.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    return out


def one_line_error(result, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), result.stderr


def test_gzip_data_trains_and_evaluates_like_the_plain_file(cli, tmp_path, llama_dir):
    plain = write_jsonl(tmp_path / "parity.jsonl", task_records("parity", 8))
    packed = gzipped(plain, tmp_path / "parity.jsonl.gz")
    as_list = tmp_path / "parity-list.json.gz"          # a JSON list, compressed
    as_list.write_bytes(gzip.compress(json.dumps(task_records("parity", 8), indent=1).encode(), mtime=0))
    cli("base", "add", "llama", llama_dir)
    options = ["--base", "llama", "--max-steps", "2", "--lr", "1e-2"]
    runs = {name: cli.json("learn", f"t-{name}", "--data", path, "--into", name, *options)
            for name, path in (("plain", plain), ("gz", packed), ("listgz", as_list))}
    losses = {name: run["trained"]["metrics"]["train_loss"] for name, run in runs.items()}
    assert losses["gz"] == losses["plain"] == losses["listgz"], losses
    weights = {name: task_weights(cli, cli.json("show", f"t-{name}")["weights"]) for name in runs}
    assert all(torch.equal(weights["gz"][k], weights["plain"][k]) for k in weights["plain"])
    assert cli.json("show", "t-gz")["training_config"]["data"]["path"] == str(packed.resolve())

    evaluated = cli.json("eval", "plain@v1", "--data", f"plain={plain}", "--data", f"gz={packed}",
                         "--data", f"listgz={as_list}", "--max-examples", "6", "--max-new-tokens", "3")["results"]
    scores = {label: {k: evaluated[label][k] for k in ("exact_match", "rouge_l", "examples")} for label in evaluated}
    assert scores["gz"] == scores["plain"] == scores["listgz"] and scores["gz"]["examples"] == 6

    # a corrupt .gz is one line, exit 4, for eval too, and nothing is stored
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all\n")
    before = cli.json("show", "plain@v1")["evaluations"]
    one_line_error(cli("eval", "plain@v1", "--data", f"j={tmp_path / 'junk.jsonl.gz'}", code=4), "junk.jsonl.gz", "gzip")
    assert cli.json("show", "plain@v1")["evaluations"] == before


def _bad_gzip_files() -> dict[str, tuple[bytes, str]]:
    """case → (file content, what the one-line error says)."""
    good = gzip.compress(b'{"input": "a", "output": "b"}\n' * 50, mtime=0)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    return {
        "not gzip": (b"plain text, not gzip\n", "is not a valid gzip file"),
        "truncated": (good[: len(good) // 2], "is not a valid gzip file"),
        "corrupt stream": (bytes(flipped), "is not a valid gzip file"),
        "empty": (b"", "holds no records"),
        "not UTF-8 inside": (gzip.compress("é".encode("latin-1"), mtime=0), "is not UTF-8 text"),
        "bad record inside": (gzip.compress(b'{"input": "a", "output": "b"}\n{"input": "a"}\n', mtime=0),
                              ":2: record lacks a non-empty string 'output'"),
        "bad JSON inside": (gzip.compress(b'{"input": "a", "output": "b"}\n{"input": \n', mtime=0), ":2: invalid JSON"),
    }


BAD_GZIP = _bad_gzip_files()


@pytest.mark.parametrize("case", list(BAD_GZIP))
def test_bad_gzip_data_is_one_line_and_exit_4(cli, tmp_path, llama_dir, case):
    content, message = BAD_GZIP[case]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(content)
    cli("base", "add", "llama", llama_dir)
    result = cli("learn", "x", "--data", bad, "--into", "l", "--base", "llama", "--max-steps", "1", code=4)
    one_line_error(result, str(bad), message)
    assert cli.json("list", "tasks") == [] and cli.json("list", "lines") == []


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    """U+2028, U+2029 and U+0085 are legal unescaped inside a JSON string; JSONL splits on \\n only."""
    from kifmerge.data import load_records

    records = [{"input": "one\u2028two\u2029three\x85four", "output": "x"}, {"input": "b", "output": "y"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (tmp_path / "u.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    assert load_records(tmp_path / "u.jsonl") == records == load_records(tmp_path / "u.jsonl.gz")
