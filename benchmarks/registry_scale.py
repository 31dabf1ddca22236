"""Registry commands at scale: `list`, `history`, `show`, `alias set` and `add-task` over a
registry of 10 000 tasks and 1 000 versions across 10 lines, with aliases, evaluations and
the events all of those log (issue 14, item 4). Goals: < 100 ms per read command in-process
(the `kifmerge.api` function the CLI calls) and < 0.5 s as a command (a fresh process, wall),
and no read command imports torch, transformers, peft or safetensors.torch.

How the registry is built (once; cached in benchmarks/work/registry_scale/, gitignored):

- real, through the public API (`kifmerge.api`): `init`, `base add` of a tiny Llama-style model
  (kifmerge/testing.py), `add-task` of four small LoRA adapters with profiles, two `fuse`s
  (line-00@v1 initial, line-00@v2 kif), two `alias set`s (one a move) and one `eval` (two labels);
- in bulk, straight into the catalog in one transaction: copies of those real rows (the same
  blob hashes, so `verify` checks real blobs) with new names, numbers and timestamps — tasks
  with profiles and `task.add` events up to --tasks, versions up to --versions across --lines
  lines (`fuse` events, two evaluations and an `eval` event per version, aliases champion /
  staging / prod with their `alias.set` moves). The bulk rows are shaped exactly like the API's;
  making them one by one would take ~10 h as `kifmerge add-task` commands (3.7 s each on 2
  shared cores, mostly importing torch) or ~10 min in-process, for no different catalog.

Each run copies the built registry (so `alias set` and `add-task` never change the cache),
brings its schema up to date (`kifmerge.api.init`), then measures:

- in-process: one fresh process imports kifmerge.api and calls each command's service function
  (one warm-up call, then the median of --repeats); afterwards it records which of torch,
  transformers, peft and safetensors.torch are in `sys.modules` (before add-task, which needs them);
- as a command: `python -m kifmerge …` under GNU time (median wall of --repeats after one warm-up
  run; peak RSS; bytecode cached as for an installed package), and once under
  `python -X importtime` to list the heavy modules the command imported;
- `verify` (non-deep) on the scaled registry, once.

Writes benchmarks/results/registry_scale.{json,md}. `--label baseline` files a run as the
"before" figures (kept by later runs), the default `current` as the "after" ones.

    python benchmarks/registry_scale.py [--tasks 10000] [--versions 1000] [--lines 10] [--repeats 5] [--label current]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    WORK,
    add_results_option,
    argument_parser,
    git_commit,
    run_record,
    stamp,
    timed,
    uncommitted_changes,
    write_results,
)

HEAVY = ("torch", "transformers", "peft", "safetensors.torch")
GOALS = {"inprocess_ms": 100, "command_s": 0.5}
REAL_LINE = "line-00"
ALIASES = ("champion", "staging", "prod")


# ---- building -------------------------------------------------------------------------------
def make_adapter(base: Path, out: Path, seed: int) -> None:
    """A LoRA adapter of the tiny model (r=4 on q_proj, v_proj) and a profile, as peft writes them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if (out / "profile.safetensors").exists():
        return
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    scores = {name[: -len(".lora_A.default.weight")]: torch.rand(4, generator=generator)
              for name, _ in model.named_parameters() if name.endswith("lora_A.default.weight")}
    save_file(scores, str(out / "profile.safetensors"), metadata={"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"})


def make_inputs(inputs: Path) -> None:
    from kifmerge.testing import build_llama, task_records, write_jsonl

    inputs.mkdir(parents=True, exist_ok=True)
    build_llama(inputs / "model")
    for seed, task in enumerate(("parity", "vowel")):
        write_jsonl(inputs / f"{task}-dev.jsonl", task_records(task, 8, 100 + seed))
    for seed in range(1, 6):  # real-1 … real-4 go into the registry; adapter 5 is what add-task is timed with
        make_adapter(inputs / "model", inputs / f"adapter-{seed}", seed)


def build_real(registry: Path, inputs: Path) -> None:
    """The handful of tasks and versions made through the public API; their rows are the templates."""
    from kifmerge import api

    api.init(registry)
    api.add_base("tiny", inputs / "model", registry=registry)
    for i in (1, 2, 3, 4):
        adapter = inputs / f"adapter-{i}"
        api.add_task(f"real-{i}", adapter, base="tiny", profile=adapter / "profile.safetensors",
                     line=REAL_LINE if i > 1 else None, registry=registry)
        if i <= 2:
            api.fuse(f"real-{i}", REAL_LINE, registry=registry)
    api.alias_set(f"{REAL_LINE}@v1", "champion", registry=registry)
    api.alias_set(f"{REAL_LINE}@v2", "champion", registry=registry)  # a move: alias.set with from/to
    api.evaluate(f"{REAL_LINE}@v2", {"parity": inputs / "parity-dev.jsonl", "vowel": inputs / "vowel-dev.jsonl"},
                 max_examples=4, max_new_tokens=2, registry=registry)


def _rows(db: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
    cursor = db.execute(sql, args)
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _insert(db: sqlite3.Connection, table: str, rows: list[dict]) -> None:
    if rows:
        columns = list(rows[0])
        db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                       [tuple(row[c] for c in columns) for row in rows])


def _stamp(start: float, offset_ms: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(start + offset_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


def build_bulk(registry: Path, tasks: int, versions: int, lines: int) -> dict:
    """Copies of the real rows (raw, as the catalog stores them) up to the requested sizes."""
    db = sqlite3.connect(registry / "kifmerge.db", isolation_level=None)
    one = lambda sql, *args: _rows(db, sql, args)[0]  # noqa: E731
    task_t = one("SELECT * FROM tasks WHERE name = 'real-2'")
    profile_t = one("SELECT * FROM profiles WHERE task = 'real-2'")
    task_event_t = one("SELECT * FROM events WHERE action = 'task.add' AND subject = 'real-2'")
    initial_t = one("SELECT * FROM versions WHERE line = ? AND number = 1", REAL_LINE)
    kif_t = one("SELECT * FROM versions WHERE line = ? AND number = 2", REAL_LINE)
    fuse_event_t = one("SELECT * FROM events WHERE action = 'fuse' AND subject = ?", f"{REAL_LINE}@v2")
    initial_event_t = one("SELECT * FROM events WHERE action = 'fuse' AND subject = ?", f"{REAL_LINE}@v1")
    line_t = one("SELECT * FROM lines WHERE name = ?", REAL_LINE)
    line_event_t = one("SELECT * FROM events WHERE action = 'line.create'")
    eval_t = _rows(db, "SELECT * FROM evaluations ORDER BY id")
    eval_event_t = one("SELECT * FROM events WHERE action = 'eval'")
    real_tasks = one("SELECT count(*) AS n FROM tasks")["n"]
    real_versions = one("SELECT count(*) AS n FROM versions")["n"]
    start = time.time() - 86400 * 30
    clock = iter(range(10**9))  # milliseconds after `start`: every row a distinct, increasing time
    new_tasks, new_profiles, events = [], [], []
    per_line = versions // lines
    fused = [(line, number) for line in range(lines) for number in range(1, per_line + 1)
             if not (line == 0 and number <= real_versions)]
    names = [f"task-{i:05d}" for i in range(1, tasks - real_tasks + 1)]
    trained_from = {name: f"line-{line:02d}@v{number - 1}" for name, (line, number) in zip(names, fused)}
    for name in names:
        created = _stamp(start, next(clock))
        new_tasks.append({**task_t, "name": name, "created": created, "trained_from": trained_from.get(name),
                          "source": task_t["source"].replace("adapter-2", name)})
        new_profiles.append({**profile_t, "task": name, "created": created})
        payload = {**json.loads(task_event_t["payload"]), "source": new_tasks[-1]["source"]}
        events.append({"ts": created, "action": "task.add", "subject": name, "payload": json.dumps(payload, sort_keys=True)})
    new_lines, new_versions, evaluations, aliases = [], [], [], []
    task_of = dict(zip(fused, names))
    for line in range(lines):
        line_name = f"line-{line:02d}"
        if line:
            created = _stamp(start, next(clock))
            new_lines.append({**line_t, "name": line_name, "created": created})
            events.append({**line_event_t, "id": None, "ts": created, "subject": line_name})
        pointer = {}
        for number in range(1, per_line + 1):
            if (line, number) not in task_of:
                continue  # made through the API
            template, event_t = (initial_t, initial_event_t) if number == 1 else (kif_t, fuse_event_t)
            created = _stamp(start, next(clock))
            task = task_of[(line, number)]
            new_versions.append({**template, "id": None, "line": line_name, "number": number, "task": task,
                                 "parent": number - 1 if number > 1 else None, "created": created})
            payload = {**json.loads(event_t["payload"]), "task": task}
            events.append({"ts": created, "action": "fuse", "subject": f"{line_name}@v{number}",
                           "payload": json.dumps(payload, sort_keys=True)})
            created = _stamp(start, next(clock))
            evaluations += [{**row, "id": None, "line": line_name, "number": number, "created": created} for row in eval_t]
            events.append({**eval_event_t, "id": None, "ts": created, "subject": f"{line_name}@v{number}"})
            for alias, every in zip(ALIASES, (10, per_line, 25)):  # champion moves every 10 versions, prod every 25
                if number % every == 0 or (alias == "staging" and number == per_line // 2):
                    created = _stamp(start, next(clock))
                    events.append({"ts": created, "action": "alias.set", "subject": f"{line_name}@{alias}",
                                   "payload": json.dumps({"alias": alias, "from": pointer.get(alias), "line": line_name,
                                                          "to": number}, sort_keys=True)})
                    pointer[alias] = number
        for alias, number in pointer.items():
            aliases.append({"line": line_name, "name": alias, "number": number, "updated": _stamp(start, next(clock))})
    db.execute("BEGIN IMMEDIATE")
    _insert(db, "tasks", new_tasks)
    _insert(db, "profiles", new_profiles)
    _insert(db, "lines", new_lines)
    _insert(db, "versions", [{k: v for k, v in row.items() if k != "id"} for row in new_versions])
    _insert(db, "evaluations", [{k: v for k, v in row.items() if k != "id"} for row in evaluations])
    db.execute("DELETE FROM aliases WHERE line = ?", (REAL_LINE,))  # line-00's champion is re-pointed like the others'
    _insert(db, "aliases", aliases)
    _insert(db, "events", [{k: v for k, v in row.items() if k != "id"} for row in events])
    db.execute("COMMIT")
    counts = {table: one(f"SELECT count(*) AS n FROM {table}")["n"]
              for table in ("tasks", "profiles", "lines", "versions", "aliases", "evaluations", "events")}
    db.close()
    return counts


def build(root: Path, tasks: int, versions: int, lines: int) -> dict:
    """The cached, pristine registry of these sizes (built once)."""
    done = root / "built.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    make_inputs(root / "inputs")
    shutil.rmtree(root / "pristine", ignore_errors=True)
    print("building the real part through kifmerge.api …", flush=True)
    build_real(root / "pristine", root / "inputs")
    real_s = time.perf_counter() - t0
    print(f"bulk rows up to {tasks} tasks, {versions} versions in {lines} lines …", flush=True)
    t1 = time.perf_counter()
    counts = build_bulk(root / "pristine", tasks, versions, lines)
    info = {"counts": counts, "real_build_s": round(real_s, 1), "bulk_build_s": round(time.perf_counter() - t1, 2),
            "how": "4 tasks, 2 versions (fuse), 2 alias sets and 1 eval (2 labels) through kifmerge.api; every other "
                   "row a copy of those rows (same blob hashes, new names/numbers/timestamps) inserted in one transaction",
            "built_at_commit": git_commit()}
    done.write_text(json.dumps(info, indent=2))
    return info


# ---- what is measured -------------------------------------------------------------------------
def read_ops(line: str, task: str) -> list[tuple[str, list[str]]]:
    """(label, CLI arguments) of the read commands; the in-process runner maps each to its service call."""
    return [("list tasks", ["list", "tasks"]), ("list tasks --json", ["list", "tasks", "--json"]),
            ("list lines", ["list", "lines"]), ("list versions", ["list", "versions"]), ("list", ["list"]),
            ("history LINE", ["history", line]), ("history LINE --events", ["history", line, "--events"]),
            ("show TASK", ["show", task]), ("show LINE", ["show", line]), ("show LINE@vN", ["show", f"{line}@v50"]),
            ("show LINE@ALIAS", ["show", f"{line}@champion"]), ("alias list", ["alias", "list"])]


def service_call(api, args: list[str], registry: str):
    """The service call the CLI makes for these arguments (as kifmerge/cli.py does: `list`'s
    table asks for its last LIST_LIMIT + 1 rows, --json for all of them)."""
    import inspect

    command, rest = args[0], [a for a in args[1:] if a != "--json"]
    if command == "list":
        try:
            from kifmerge.cli import LIST_LIMIT
        except ImportError:  # before `list --limit`: every row, always
            LIST_LIMIT = None
        table = "--json" not in args and LIST_LIMIT and "limit" in inspect.signature(api.list_items).parameters
        limit = {"limit": LIST_LIMIT + 1} if table else {}
        if not rest:
            return lambda: {s: api.list_items(s, registry=registry, **limit) for s in ("bases", "lines", "tasks")}
        return lambda: api.list_items(rest[0], registry=registry, **limit)
    if command == "history":
        fn = api.line_events if "--events" in rest else api.history
        return lambda: fn(rest[0], registry=registry)
    if command == "show":
        return lambda: api.show(rest[0], registry=registry)
    if command == "alias" and rest[0] == "list":
        return lambda: api.alias_list(registry=registry)
    if command == "alias" and rest[0] == "set":
        return lambda: api.alias_set(rest[1], rest[2], registry=registry)
    raise ValueError(args)


def alias_args(i: int, line: str) -> list[str]:
    """Every call moves the alias (between v40 and v60), so each one writes."""
    return ["alias", "set", f"{line}@v{40 if i % 2 else 60}", "bench"]


def inprocess(registry: str, repeats: int, line: str, task: str, adapter: str, tag: str) -> dict:
    """Runs in its own process: time each command's service function, then check sys.modules."""
    t0 = time.perf_counter()
    from kifmerge import api

    out = {"import_api_ms": round(1000 * (time.perf_counter() - t0), 1), "ops": {}}
    for label, args in read_ops(line, task) + [("alias set", None)]:
        times, size = [], None
        for i in range(repeats + 1):
            call = service_call(api, args or alias_args(i, line), registry)
            t = time.perf_counter()
            result = call()
            times.append(1000 * (time.perf_counter() - t))
            size = len(result) if isinstance(result, list) else sum(map(len, result.values())) if label == "list" else None
        out["ops"][label] = {"first_ms": round(times[0], 2), "median_ms": round(statistics.median(times[1:]), 2), "rows": size}
    out["heavy_modules_after_reads"] = [m for m in HEAVY if m in sys.modules]
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        api.add_task(f"bench-{tag}-inproc-{i}", adapter, base="tiny", profile=Path(adapter) / "profile.safetensors", registry=registry)
        times.append(1000 * (time.perf_counter() - t))
    out["ops"]["add-task"] = {"first_ms": round(times[0], 2), "median_ms": round(statistics.median(times[1:]), 2), "rows": None}
    return out


def imported_heavy(args: list[str], env: dict) -> tuple[list[str], float]:
    """The heavy modules a command imports, and its total import time (s), from -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "kifmerge", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kifmerge {' '.join(args)} failed: {done.stderr[-2000:]}")
    modules, total_us = set(), 0
    for row in done.stderr.splitlines():
        if row.startswith("import time:") and "|" in row and "self [us]" not in row:
            self_us, _, name = row[len("import time:"):].split("|")
            modules.add(name.strip())
            total_us += int(self_us)
    return [m for m in HEAVY if m in modules], round(total_us / 1e6, 3)


def measure(root: Path, lines: int, repeats: int, tag: str) -> dict:
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(root / "pristine", run / "registry", symlinks=True)
    registry = str(run / "registry")
    from kifmerge import api

    t0 = time.perf_counter()
    api.init(registry)  # brings the copy's schema up to date (a no-op when the cache was built by this code)
    upgrade_s = time.perf_counter() - t0
    line = f"line-{lines // 2:02d}"  # line-05 of 10
    task = api.history(line, registry=registry)[49]["task"]  # a task fused into the line (v50)
    adapter = str(root / "inputs" / "adapter-5")
    # bytecode cached as for an installed package (kept out of the checkout), even where the environment says not to
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "KIFMERGE_REGISTRY": registry,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPYCACHEPREFIX": str(root.parent / "pycache")}
    print("in-process …", flush=True)
    done = subprocess.run([sys.executable, __file__, "--inprocess", registry, "--repeats", str(repeats), "--line", line,
                           "--task", task, "--adapter", adapter, "--tag", tag], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"in-process run failed:\n{done.stderr[-3000:]}")
    inproc = json.loads(done.stdout.strip().splitlines()[-1])
    commands = {}
    kif = [sys.executable, "-m", "kifmerge"]
    floor = [timed([sys.executable, "-c", "pass"], env) for _ in range(repeats)]
    startup = [timed([*kif, "--help"], env) for _ in range(repeats + 1)][1:]
    print("as commands …", flush=True)
    for label, args in read_ops(line, task) + [("alias set", None), ("add-task", None)]:
        def argv(i: int) -> list[str]:
            if label == "alias set":
                return alias_args(i, line)
            if label == "add-task":
                return ["add-task", f"bench-{tag}-cmd-{i}", adapter, "--base", "tiny", "--profile", f"{adapter}/profile.safetensors"]
            return args

        timed([*kif, *argv(repeats + 1)], env)  # a warm-up run, not counted (bytecode, page cache)
        runs = [timed([*kif, *argv(i)], env) for i in range(repeats)]
        heavy, import_s = imported_heavy(args or alias_args(repeats, line), env) if label != "add-task" else (None, None)
        commands[label] = {"wall_s": statistics.median(w for w, _ in runs), "peak_rss_mb": round(statistics.median(r for _, r in runs), 1),
                           "heavy_modules": heavy, "import_s": import_s}
        print(f"  {label:<24} {commands[label]['wall_s']:.2f} s  {commands[label]['peak_rss_mb']:.0f} MB  "
              f"in-process {inproc['ops'][label]['median_ms']:.1f} ms  heavy imports: {heavy}", flush=True)
    t0 = time.perf_counter()
    report = api.verify(registry=registry)
    verify = {"ok": report["ok"], "blobs_checked": report["blobs_checked"], "seconds": round(time.perf_counter() - t0, 2)}
    return {**stamp(), "dirty": uncommitted_changes(), "repeats": repeats,
            "schema_upgrade_s": round(upgrade_s, 3), "line": line, "task": task, "inprocess": inproc, "commands": commands,
            "python_startup_s": statistics.median(w for w, _ in floor),
            "kifmerge_help_s": statistics.median(w for w, _ in startup), "verify": verify}


# ---- results -----------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    runs = result["runs"]
    after = runs.get("current") or next(iter(runs.values()))
    before = runs.get("baseline") if "current" in runs else None
    counts = result["build"]["counts"]
    lines = [f"# registry_scale — {after['when']} (commit {after['git_commit'][:8]}{', uncommitted changes' if after['dirty'] else ''}; "
             f"median of {after['repeats']}; {result['cpus']} CPUs)", "",
             f"{counts['tasks']} tasks (with profiles), {counts['versions']} versions in {counts['lines']} lines, "
             f"{counts['aliases']} aliases, {counts['evaluations']} evaluations, {counts['events']} events. "
             f"Built: {result['build']['how']}.", "",
             "| command | in-process ms | as a command s | peak RSS MB | heavy modules imported | goal |",
             "| --- | --- | --- | --- | --- | --- |"]

    def pair(key: str, label: str, field: str, fmt: str) -> str:
        """`before → after` of one figure (just `after` without a baseline run)."""
        def get(run: dict) -> dict | None:
            return run["inprocess"]["ops"].get(label) if key == "inprocess" else run["commands"].get(label)

        value = format(get(after)[field], fmt)
        then = get(before) if before else None
        return f"{format(then[field], fmt)} → {value}" if then else value

    for label in after["commands"]:
        inproc, command = after["inprocess"]["ops"][label], after["commands"][label]
        reads = label not in ("alias set", "add-task")
        met = "—" if not reads else ("met" if inproc["median_ms"] < GOALS["inprocess_ms"] and command["wall_s"] < GOALS["command_s"]
                                     and not command["heavy_modules"] else "missed")
        heavy = "—" if command["heavy_modules"] is None else (", ".join(command["heavy_modules"]) or "none")
        lines.append(f"| `{label}` | {pair('inprocess', label, 'median_ms', '.1f')} | {pair('commands', label, 'wall_s', '.2f')} | "
                     f"{pair('commands', label, 'peak_rss_mb', '.0f')} | {heavy} | {met} |")
    lines += ["", f"In-process: `import kifmerge.api` {after['inprocess']['import_api_ms']:.0f} ms; torch & co. in `sys.modules` "
              f"after the read commands and `alias set`: {', '.join(after['inprocess']['heavy_modules_after_reads']) or 'none'} "
              "(`add-task` needs torch; its in-process figure is after the first call, which imports it: "
              f"first call {after['inprocess']['ops']['add-task']['first_ms']:.0f} ms).",
              f"Floors: `python -c pass` {after['python_startup_s']:.2f} s, `kifmerge --help` {after['kifmerge_help_s']:.2f} s "
              "(any command parses its options with typer, which imports pydantic and rich).",
              "`alias set` and `add-task` commit a transaction: in-process they are mostly the commit's fsync, which "
              "varied from 5 to 60 ms from one call to the next on this shared disk.",
              f"`verify` on the scaled registry: {'ok' if after['verify']['ok'] else 'FAILED'}, "
              f"{after['verify']['blobs_checked']} blobs, {after['verify']['seconds']:.2f} s.", ""]
    if before:
        lines += [f"Before: commit {before['git_commit'][:8]} ({before['when']}, load average {before['load_average']:.1f}); "
                  f"after: commit {after['git_commit'][:8]} ({after['when']}, load average {after['load_average']:.1f}). "
                  + before.get("how", ""), ""]
    lines += [result["note"], "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--versions", type=int, default=1_000)
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", choices=["current", "baseline"], default="current",
                        help="file this run as the 'after' (current) or 'before' (baseline) figures")
    parser.add_argument("--rebuild", action="store_true", help="build the registry again instead of reusing the cached one")
    parser.add_argument("--work", type=Path, default=WORK / "registry_scale",
                        help="where built registries are cached (default benchmarks/work/registry_scale)")
    add_results_option(parser)
    for hidden in ("--inprocess", "--line", "--task", "--adapter", "--tag"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess:
        print(json.dumps(inprocess(args.inprocess, args.repeats, args.line, args.task, args.adapter, args.tag)))
        return
    if args.versions % args.lines or args.versions // args.lines < 60 or args.tasks < args.versions + 4:
        sys.exit("need --versions a multiple of --lines with at least 60 versions per line, and --tasks ≥ --versions + 4")
    root = args.work / f"{args.tasks}t-{args.versions}v-{args.lines}l"
    if args.rebuild:
        shutil.rmtree(root, ignore_errors=True)
    build_info = build(root, args.tasks, args.versions, args.lines)
    run = measure(root, args.lines, args.repeats, f"{args.label}-{int(time.time())}")
    out = args.results / "registry_scale.json"
    result = {**run_record("registry_scale"), "goals": GOALS, "build": build_info,
              "sizes": {"tasks": args.tasks, "versions": args.versions, "lines": args.lines}, "runs": {},
              "note": "Timings are medians of repeats on a machine shared with other work (2 cores, load average "
                      "recorded per run); the absolute figures move with the load, the comparisons within a run less so."}
    if out.exists():  # keep the other label's run when the sizes are the same
        kept = json.loads(out.read_text())
        if kept.get("sizes") == result["sizes"]:
            result["runs"] = {k: v for k, v in kept.get("runs", {}).items() if k != args.label}
            if args.label == "baseline":
                result["command"] = kept.get("command", result["command"])
    result["runs"][args.label] = run
    result["runs"] = dict(sorted(result["runs"].items()))  # baseline before current
    table = markdown(result)
    write_results(out, result, table)
    print(table)


if __name__ == "__main__":
    main()
