"""Vendor the benchmark data into the repository: a dev-time tool, never run by the package,
the demo or the benchmarks (they read only the files it wrote, under examples/data/).

Copies the four tasks of the standard orders 4–6 of the "Long Sequence" continual-learning
benchmark (agnews, amazon, dbpedia, yahoo; train and dev splits) from a checkout of the
benchmark's JSON lists of {"id", "input", "output"} to

    examples/data/long_sequence/{train,dev}/NAME.jsonl.gz

one JSON object per line (keys id, input, output, in that order, UTF-8, records in the source
order), gzip level 9 with mtime 0 and no file name in the header, so the same source gives the
same bytes (with the same zlib). Prints each file's records, size and sha256 for
examples/data/README.md.

    python scripts/vendor_data.py --source DIR            # write the files
    python scripts/vendor_data.py --source DIR --check    # the vendored files hold exactly the source

DIR is a checkout of the benchmark (folders train/ and dev/ of NAME.json); it lies outside this
repository, so it has no default.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "examples" / "data" / "long_sequence"
TASKS = ["agnews", "amazon", "dbpedia", "yahoo"]
SPLITS = {"train": 1000, "dev": 500}
KEYS = ("id", "input", "output")


def encode(records: list[dict]) -> bytes:
    """The records as gzip-compressed JSONL, byte-for-byte reproducible."""
    lines = []
    for record in records:
        if set(record) != set(KEYS) or not all(isinstance(record[k], str) for k in KEYS):
            raise ValueError(f"unexpected record: {str(record)[:200]}")
        lines.append(json.dumps({k: record[k] for k in KEYS}, ensure_ascii=False) + "\n")
    return gzip.compress("".join(lines).encode("utf-8"), compresslevel=9, mtime=0)


def files(source: Path):
    """(split, task, source file, target file, expected count) for every vendored file."""
    for split, count in SPLITS.items():
        for task in TASKS:
            yield split, task, source / split / f"{task}.json", TARGET / split / f"{task}.jsonl.gz", count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the benchmark folder (train/ and dev/ of NAME.json)")
    parser.add_argument("--check", action="store_true", help="compare the vendored files with the source; write nothing")
    args = parser.parse_args()
    total, mismatched = 0, []
    for split, task, src, dst, count in files(args.source):
        records = json.loads(src.read_text(encoding="utf-8"))
        if len(records) != count:
            sys.exit(f"{src}: {len(records)} records, expected {count}")
        data = encode(records)
        if args.check:
            held = dst.read_bytes() if dst.is_file() else b""
            if not held or gzip.decompress(held) != gzip.decompress(data):
                mismatched.append(str(dst.relative_to(REPO)))
            data = held or data
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        total += len(data)
        print(f"| {split} | {task} | {len(records)} | {len(data):,} | `{hashlib.sha256(data).hexdigest()}` |")
    print(f"total {total:,} bytes")
    if mismatched:
        sys.exit("differ from the source: " + ", ".join(mismatched))


if __name__ == "__main__":
    main()
