"""Input limits: how much kifmerge reads from a file a person or a pipeline hands it, before any
large allocation. Each is refused with one line (InvalidInputError, exit 4) naming the limit;
the README's "Limits" table lists them. Numeric option ranges live with the options
(`options.TrainOptions`) and are refused as usage errors (exit 2), or as invalid plan input
(exit 4) when they come from a plan file."""

from __future__ import annotations

import os

MIB = 1024 * 1024


def _env_bytes(name: str, default: int) -> int:
    """A byte limit, overridable by an environment variable holding a whole number of bytes."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def max_data_bytes() -> int:
    """A data file (train, eval, calibration, replay), after gzip decompression."""
    return _env_bytes("KIFMERGE_MAX_DATA_BYTES", 512 * MIB)


MAX_RECORD_BYTES = 4 * MIB          # one record of a data file (a JSONL line, a JSON array element)
MAX_PLAN_BYTES = 1 * MIB            # a plan file
MAX_CONFIG_BYTES = 16 * MIB         # a JSON config of a model or adapter (config.json, adapter_config.json)
MAX_PLAN_STEPS = 1000               # steps in one plan
MAX_NESTING = 32                    # levels of lists and objects in a plan file
MAX_PLAN_VALUES = 200_000           # values in a plan file, YAML aliases expanded
MAX_VERSION = 2**63 - 1             # a version number (SQLite's integer)
MAX_SEED = 2**32 - 1                # --seed (numpy's and Python's seeding take 32 bits)
MAX_MERGE_SEED = 2**63 - 1          # --merge-seed
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000              # --max-steps, --warmup-steps, --save-steps
MAX_EXAMPLES = 10**9                # --max-examples


def nesting_depth(value, limit: int = MAX_NESTING, max_values: int = MAX_PLAN_VALUES) -> int:
    """Levels of lists and dicts in `value`, counted iteratively (a deep value cannot overflow
    the stack); stops just past `limit` levels or `max_values` values (YAML aliases can make a
    small file a huge tree: that counts as too deep, returning limit + 1)."""
    deepest, stack, seen = 0, [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > max_values:
            return limit + 1
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
