"""Human output: short summaries and tables, numbers rounded, never raw JSON."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator


HEX_ID = re.compile(r"^[0-9a-f]{40,64}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:\d\d|Z)?$")


def _brief(value: Any, sep: str = ", ") -> str:
    """One value for people: floats to 4 significant digits, hashes to 12 characters, times to
    the local minute, yes/no, lists joined, dicts as `k=v` (nested keys dotted, empty ones left out)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        if HEX_ID.match(value):
            return value[:12]
        if TIMESTAMP.match(value):
            from datetime import datetime

            return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
        return value
    if isinstance(value, dict):
        return " ".join(f"{key}={_brief(item, ',')}" for key, item in _flat(value)) or "—"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(item, (dict, list, tuple)) for item in value):
            return sep.join(_brief(item) for item in value) or "—"
        return f"{len(value)} entries"
    return str(value)


def _flat(mapping: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if value is None or (isinstance(value, (dict, list, tuple)) and not value):
            continue
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"
    from kifmerge.progress import clock

    return clock(value)


def _print_summary(head: str, rows: list[tuple[str, Any]], result: dict, known: set[str]) -> None:
    """A headline, then `label  value` lines (empty ones left out), then any other key of the
    result (what a newer service adds still shows, briefly)."""
    import textwrap

    from rich.console import Console
    from rich.text import Text

    rows = [(label, value) for label, value in rows if value not in (None, "", "—")]
    rows += [(key, _brief(value)) for key, value in result.items()
             if key not in known and value is not None and value is not False and value != {} and value != []]
    console = Console()
    console.print(Text(head, style="bold"))
    indent = 2 + max((len(label) for label, _ in rows), default=0) + 2
    for label, value in rows:
        lines = textwrap.wrap(str(value), max(console.width - indent, 20), break_on_hyphens=False) or [""]
        console.print(Text(f"  {label:<{indent - 4}}  " + ("\n" + " " * indent).join(lines)), soft_wrap=True)


VERSION_KEYS = {"type", "version", "line", "number", "parent", "task", "kind", "method", "params", "timings", "created",
                "aliases", "trained", "reused", "stale_start", "weights", "profile_blob", "evaluations"}


def render_version(result: dict) -> None:
    """fuse, learn, show LINE@vN."""
    method, params = result["method"], result.get("params") or {}
    if method == "initial":
        what = f"{result['task']}, the first version of {result['line']}"
    elif method == "rollback":
        what = f"rollback of {result['line']} to v{params.get('to')} (from {result['parent']})"
    else:
        what = f"{result['task']} fused into {result['line']} by {method} (from {result['parent']})"
    if result.get("reused"):
        what += "; already learned, nothing trained"
    timings = result.get("timings") or {}
    trained = result.get("trained")
    evaluations = result.get("evaluations") or {}
    _print_summary(f"{result['version']}: {what}", [
        ("params", _brief({k: v for k, v in params.items() if k != "to"}) if method not in ("initial", "rollback") else None),
        ("time", ", ".join(f"{k.removesuffix('_s')} {_seconds(v)}" for k, v in timings.items()) or None),
        ("trained", _training(trained.get("metrics"), trained.get("trained_from")) if trained else None),
        ("profile", _profile(trained.get("profile")) if trained else None),
        ("aliases", ", ".join(result.get("aliases") or []) or None),
        ("scores", "; ".join(f"{label} {_score_line(m)}" for label, m in evaluations.items()) or None),
        ("weights", _brief(result.get("weights"))),
        ("created", _brief(result.get("created"))),
    ], result, VERSION_KEYS)


def _training(metrics: dict | None, trained_from: str | None = None) -> str | None:
    if not metrics:
        return None
    examples = metrics.get("examples") or {}
    parts = [f"{metrics.get('steps')} steps", f"loss {_brief(metrics.get('train_loss'))}",
             f"{examples.get('train')} examples" + (f" (+{examples['val']} held out, loss {_brief(metrics.get('eval_loss'))})"
                                                     if examples.get("val") else ""),
             _seconds(metrics.get("runtime_s"))]
    return ", ".join(parts) + (f"; from {trained_from}" if trained_from else "")


def _profile(profile: dict | None) -> str | None:
    if not profile:
        return None
    layout = profile.get("layout") or profile
    return (f"{layout.get('units')} {layout.get('unit') or profile.get('unit')} units in {layout.get('groups')} groups "
            f"(estimator: {profile.get('estimator')})")


def _score_line(metrics: dict) -> str:
    def score(key: str) -> str:
        return "—" if metrics.get(key) is None else f"{metrics[key]:.3f}"

    return f"exact match {score('exact_match')}, ROUGE-L {score('rouge_l')} ({metrics.get('examples')} examples)"


TASK_KEYS = {"type", "name", "base", "kind", "trained_from", "data_fingerprint", "source", "created", "metrics", "profile",
             "weights", "adapter_config", "training_config", "fused_into", "validation"}
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "task_type")


def render_task(result: dict) -> None:
    """train, add-task, show TASK."""
    origin = f", trained from {result['trained_from']}" if result.get("trained_from") else ""
    adapter = result.get("adapter_config") or {}
    training = {k: v for k, v in (result.get("training_config") or {}).items() if k not in ("data", "lr")}
    _print_summary(f"task {result['name']}: {result['kind']} on base {result['base']}{origin}", [
        ("training", _training(result.get("metrics"))),
        ("profile", _profile(result.get("profile"))),
        ("source", result.get("source")),
        ("data", f"sha256 {_brief(result.get('data_fingerprint'))}" if result.get("data_fingerprint") else None),
        ("adapter", _brief({k: adapter[k] for k in ADAPTER_KEYS if adapter.get(k) not in (None, False)}) if adapter else None),
        ("options", _brief(training) if training else None),
        ("fused into", ", ".join(result.get("fused_into") or []) or None),
        ("validation", f"{result['validation']['records']} examples from {result['validation']['source']}"
                       if result.get("validation") else None),
        ("weights", _brief(result.get("weights"))),
        ("created", _brief(result.get("created"))),
    ], result, TASK_KEYS)


def render_line(result: dict) -> None:
    """show LINE."""
    _print_summary(f"line {result['name']}: {result['kind']} on base {result['base']}, head {result.get('head') or '(no versions)'}", [
        ("tasks", ", ".join(task for task in result.get("tasks") or [] if task) or None),  # a rollback fuses none
        ("aliases", _brief(result.get("aliases") or None)),
        ("created", _brief(result.get("created"))),
    ], result, {"type", "name", "base", "kind", "head", "tasks", "aliases", "created"})


def render_base(result: dict) -> None:
    """base add."""
    hub = f"{result['hub_id']}" + (f" @ {result['revision']}" if result.get("revision") else "") if result.get("hub_id") else None
    _print_summary(f"base {result['name']}: {result['architecture']} ({result.get('model_type')}) at {result['path']}", [
        ("hub", hub), ("copied", "yes: its files are kept in the registry" if result.get("copied") else "no"),
        ("fingerprint", _brief(result.get("fingerprint"))), ("created", _brief(result.get("created"))),
    ], result, {"name", "architecture", "model_type", "path", "hub_id", "revision", "copied", "fingerprint", "created"})


def render_export(result: dict) -> None:
    """export."""
    files = result.get("files") or []
    _print_summary(f"exported {result['version']} to {result['out']} ({result.get('kind')}, {len(files)} files)", [
        ("files", ", ".join(files) or None),
    ], result, {"version", "out", "kind", "files", "sha256"})


def render_mapping(result: dict) -> None:
    """A command's result for people, by its shape: a version (fuse, learn), a task (train,
    add-task), a line, a base, an export, or else `key  value` lines; values summarised by
    `_brief`, never raw JSON."""
    kind = result.get("type")
    if kind == "version" or (kind is None and {"version", "line", "method"} <= result.keys()):
        render_version(result)
    elif kind == "task" or (kind is None and {"name", "base", "trained_from"} <= result.keys()):
        render_task(result)
    elif kind == "line":
        render_line(result)
    elif {"architecture", "fingerprint", "path"} <= result.keys():
        render_base(result)
    elif {"version", "out", "files"} <= result.keys():
        render_export(result)
    else:
        _print_summary(str(kind or "result"), [], result, {"type"})


def render_table(rows: list[dict], columns: list[str], empty: str, title: str | None = None,
                 cell: Callable[[str, Any], str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not rows:
        console.print(Text(empty))
        return
    cells = [[cell(c, row.get(c)) if cell else _cell(row.get(c)) for c in columns] for row in rows]
    table = Table(title=title)
    for i, column in enumerate(columns):  # short columns kept whole, long ones wrapped
        short = all(len(line) <= 16 for values in cells for line in values[i].splitlines())
        table.add_column(column, no_wrap=short, overflow="fold")
    for values in cells:
        table.add_row(*map(Text, values))
    console.print(table)


def _cell(value: Any) -> str:
    return _brief(value)
