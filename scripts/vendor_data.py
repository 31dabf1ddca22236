"""Vendor the benchmark data into the repository: a dev-time tool, never run by the package,
the demo or the benchmarks (they read only the files it wrote, under examples/data/).

From a checkout of the "Long Sequence" continual-learning benchmark's JSON lists of
{"id", "input", "output"} (folders train/ and dev/ of NAME.json) it writes two tables of files:

    examples/data/long_sequence/{train,dev}/NAME.jsonl.gz      the four tasks of the standard
        orders 4–6 (agnews, amazon, dbpedia, yahoo): all 1000 train and all 500 dev records
    examples/data/heldout/{train,dev,val}/NAME.jsonl.gz        a held-out sequence that is none of
        orders 4–6 (sst-2, mnli, qqp; examples/data/heldout/sequence.json): the 1000 train
        records; dev = dev records 1–300 (the ones the benchmark reports); val = dev records
        301–400 (disjoint from dev; what `validated` and --max-regression score on)

one JSON object per line (keys id, input, output, in that order, UTF-8, records unchanged and in
the source order), gzip level 9 with mtime 0 and no file name in the header, so the same source
gives the same bytes (with the same zlib). Prints each file's row of the Files table in
examples/data/README.md (path under examples/data/, records, gzip bytes, JSONL bytes, sha256)
and the totals.

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
DATA = REPO / "examples" / "data"
KEYS = ("id", "input", "output")


def encode(records: list[dict]) -> bytes:
    """The records as gzip-compressed JSONL, byte-for-byte reproducible."""
    lines = []
    for record in records:
        if set(record) != set(KEYS) or not all(isinstance(record[k], str) for k in KEYS):
            raise ValueError(f"unexpected record: {str(record)[:200]}")
        lines.append(json.dumps({k: record[k] for k in KEYS}, ensure_ascii=False) + "\n")
    return gzip.compress("".join(lines).encode("utf-8"), compresslevel=9, mtime=0)


# folder under examples/data → (tasks, {split written: (source split, records in the source file,
# the slice of them written)})
TABLES = {
    "long_sequence": (["agnews", "amazon", "dbpedia", "yahoo"],
                      {"train": ("train", 1000, slice(None)), "dev": ("dev", 500, slice(None))}),
    "heldout": (["sst-2", "mnli", "qqp"],
                {"train": ("train", 1000, slice(None)), "dev": ("dev", 500, slice(0, 300)),
                 "val": ("dev", 500, slice(300, 400))}),
}


def files(source: Path):
    """(folder, split, task, source file, target file, expected source count, slice) for every
    vendored file."""
    for folder, (tasks, splits) in TABLES.items():
        for split, (from_split, count, part) in splits.items():
            for task in tasks:
                yield (folder, split, task, source / from_split / f"{task}.json",
                       DATA / folder / split / f"{task}.jsonl.gz", count, part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the benchmark folder (train/ and dev/ of NAME.json)")
    parser.add_argument("--check", action="store_true", help="compare the vendored files with the source; write nothing")
    args = parser.parse_args()
    totals, mismatched = {}, []
    for folder, split, task, src, dst, count, part in files(args.source):
        records = json.loads(src.read_text(encoding="utf-8"))
        if len(records) != count:
            sys.exit(f"{src}: {len(records)} records, expected {count}")
        records = records[part]
        data = encode(records)
        if args.check:
            held = dst.read_bytes() if dst.is_file() else b""
            if not held or gzip.decompress(held) != gzip.decompress(data):
                mismatched.append(str(dst.relative_to(REPO)))
            data = held or data
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        plain = len(gzip.decompress(data))
        total = totals.setdefault(folder, [0, 0, 0])
        total[0], total[1], total[2] = total[0] + len(records), total[1] + len(data), total[2] + plain
        print(f"| `{dst.relative_to(DATA).as_posix()}` | {len(records)} | {len(data):,} | {plain:,} | "
              f"`{hashlib.sha256(data).hexdigest()}` |")
    for folder, (records, packed, plain) in totals.items():
        print(f"{folder}: {records} records, {packed:,} bytes (gzip), {plain:,} bytes (JSONL)")
    records, packed, plain = (sum(t[i] for t in totals.values()) for i in range(3))
    print(f"| **total** | {records} | **{packed:,}** | {plain:,} | |")
    if mismatched:
        sys.exit("differ from the source: " + ", ".join(mismatched))


if __name__ == "__main__":
    main()
