"""The commands that build and inspect a registry: init, base, add-task, fuse, export, train,
learn, eval, report, verify, gc, list, show, history, profile. Each parses, calls one
`kifmerge.api` function and renders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kifmerge.cli.options import with_fuse_options, with_train_options
from kifmerge.cli.rendering import _brief, _flat, _seconds, render_mapping, render_table
from kifmerge.cli.runtime import (
    ALLOW_PICKLE_HELP,
    app,
    base_app,
    DebugOpt,
    emit,
    handled,
    JsonOpt,
    model_command,
    profile_app,
    progress_bars,
    RegistryOpt,
)
from kifmerge.fusion import methods


ValOpt = Annotated[Optional[Path], typer.Option("--val", help="Validation examples of the task, stored with it (same formats "
                                                           "as --data): for fuse --method validated and --max-regression.")]

@app.command()
@handled
def init(
    force: Annotated[bool, typer.Option("--force", help="Make a registry of a folder that is not empty and is not one "
                                                      "(refused otherwise, exit 4); kifmerge never deletes files it did not write.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Create the registry (or upgrade its schema); safe to run twice. A folder that is not empty
    and is not a registry is refused unless --force."""
    from kifmerge import api

    result = api.init(registry, force=force)
    emit(result, json_out, lambda r: print(f"{'created' if r['created'] else 'ready'}: registry at {r['registry']}"))


@base_app.command("add")
@handled
def base_add(
    name: Annotated[str, typer.Argument(help="Name for the base model.")],
    model: Annotated[Path, typer.Argument(help="Local Hugging Face model folder (safetensors), or a hub id (org/name) "
                                               "resolved through the Hugging Face cache (HF_HUB_OFFLINE is honoured).")],
    copy: Annotated[bool, typer.Option("--copy", help="Also store the model's files in the registry.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP + " (implies --copy).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit (hub ids only; default: main).")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Register a base model: its path (and hub id + commit), architecture and a fingerprint of
    config + weight headers."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.add_base(name, model, copy=copy, allow_pickle=allow_pickle, revision=revision, registry=registry,
                              progress=progress)
    emit(result, json_out, render_mapping)


@profile_app.command("show")
@handled
def profile_show(
    ref: Annotated[str, typer.Argument(help="TASK, or LINE / LINE@vN / LINE@ALIAS for a line's accumulated profile.")],
    line: Annotated[bool, typer.Option("--line", help="Read REF as a line even when a task has that name.")] = False,
    top: Annotated[int, typer.Option("--top", help="How many of the most and of the least important units.")] = 10,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw a layer × module heatmap (needs matplotlib).")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The most and least important skill units of a task's profile, or of a line version's
    accumulated profile (a bare name is a task if one has that name, else the line's newest version)."""
    from kifmerge import api

    if png:
        from kifmerge.plots import checked_png

        checked_png(png)
    result = api.profile_show(ref, line=line, top=top, registry=registry)
    if png:
        from kifmerge.plots import draw_profile_heatmap

        result["png"] = str(draw_profile_heatmap(result, png))
    emit(result, json_out, render_profile)


def render_profile(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    subject = result.get("version") or f"task {result['task']}"
    console.print(f"{subject}: {result['units']} {result['unit']} units in {result['groups']} groups "
                  f"(scores normalised to [0, 1])")
    holds = [f"element scores for {result['element_scores']} tensors (kif-element)"] if result.get("element_scores") else []
    holds += [f"Gram matrices for {result['gram_matrices']} modules (regmean)"] if result.get("gram_matrices") else []
    if holds:
        console.print("also holds " + " and ".join(holds))
    for title, rows in (("most important", result["top"]), ("least important", result["bottom"])):
        table = Table("unit", "score", "raw", title=title)
        for row in rows:
            table.add_row(row["unit"], f"{row['score']:.3f}", f"{row['raw']:.4g}")
        console.print(table)
    if result.get("png"):
        console.print(f"heatmap: {result['png']}")


@app.command("add-task")
@handled
def add_task(
    task: Annotated[str, typer.Argument(help="Name for the task.")],
    checkpoint: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder or full fine-tuned model folder.")],
    base: Annotated[str, typer.Option("--base", help="The registered base it was trained from.")],
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Importance profile (kifmerge-profile safetensors).")] = None,
    line: Annotated[Optional[str], typer.Option("--line", help="The version it was trained from: LINE (its newest version), LINE@vN or LINE@ALIAS; a line not created yet: trained from the base.")] = None,
    calibrate: Annotated[Optional[Path], typer.Option("--calibrate", help="Compute the profile from gradients on this data.")] = None,
    calibrate_batches: Annotated[int, typer.Option("--calibrate-batches", help="Batches of --calibrate data.")] = 8,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Calibration batch size (default: 8).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Calibration max tokens (default: 256).")] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="first | mixed | fisher (default: first).")] = None,
    gram: Annotated[Optional[bool], typer.Option("--gram/--no-gram", help="With --calibrate: record each LoRA module's input "
                                                 "Gram matrix on the calibration data (for the default fuse rule, regmean). "
                                                 "Default: on for a LoRA adapter.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP + ".")] = False,
    val: ValOpt = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Register a checkpoint trained elsewhere, validated against its base, with its profile
    given (--profile) or computed from calibration data (--calibrate)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.add_task(task, checkpoint, base=base, profile=profile, line=line, calibrate=calibrate,
                              calibrate_batches=calibrate_batches,
                              calibrate_options={"batch_size": batch_size, "max_length": max_length, "importance": importance, "gram": gram},
                              allow_pickle=allow_pickle, val=val, registry=registry, progress=progress)
    emit(result, json_out, render_mapping)




@app.command()
@handled
@model_command
@with_fuse_options
def fuse(
    task: Annotated[str, typer.Argument(help="A registered task (with a profile, unless the rule reads none: magmax, ties, dare-*, task-arithmetic; "
                                                       "the default then fuses by ties).")],
    into: Annotated[str, typer.Option("--into", help="The line to fuse into (created when new).")],
    again: Annotated[bool, typer.Option("--again", help="Fuse TASK even when the line already holds it; without it "
                                                        "that is refused (exit 6), so a retried step cannot fuse twice.")] = False,
    max_regression: Annotated[Optional[float], typer.Option(
        "--max-regression", help="Quality gate: refuse the version (exit 6, nothing written) when a task the line holds "
                                 "would lose more than POINTS of exact match on its validation examples (--val) against "
                                 "the head.", metavar="POINTS")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False, fuse_options: dict = None,
) -> None:
    """Fuse TASK into LINE unit by unit → a new immutable version."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.fuse(task, into, **fuse_options, again=again, max_regression=max_regression, registry=registry,
                          progress=progress)
    stale = result.get("stale_start")
    if stale:  # on stderr, so with --json too
        how = ("merged with the head as two task vectors against the base; what the line learned since the task's "
               "start counts once, through the head" if methods.METHODS[result["method"]].family == methods.TASK_VECTOR else
               "blended unit by unit as usual; what the line learned since may be lost in the units it takes")
        print(f"kifmerge: warning: task {task!r} was trained from {stale['trained_from']}, not from the head "
              f"{stale['head']}; fused by {result['method']} ({how})", file=sys.stderr)
    emit(result, json_out, render_mapping)


@app.command()
@handled
def export(
    ref: Annotated[str, typer.Argument(help="LINE, LINE@vN or LINE@ALIAS.")],
    out: Annotated[Path, typer.Argument(help="New output folder.")],
    merged: Annotated[bool, typer.Option("--merged", help="Merge a LoRA line into the base: a full model folder.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Export a version as a folder peft / transformers load, with a model card."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.export(ref, out, merged=merged, registry=registry, progress=progress)
    emit(result, json_out, render_mapping)



@app.command()
@handled
@model_command
@with_train_options
def train(
    task: Annotated[str, typer.Argument(help="Name for the new task.")],
    data: Annotated[Path, typer.Option("--data", help="JSON list or JSONL of {input, output} or {messages} (chat template) records.")],
    line: Annotated[str, typer.Option("--line", help="Train from this line's newest version.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model, when the line does not exist yet.")] = None,
    val: ValOpt = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False, train_options: dict = None,
) -> None:
    """Fine-tune from LINE's newest version, record each unit's importance, register TASK."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.train(task, data, line, base=base, options=train_options, val=val, registry=registry, progress=progress)
    if result is not None:
        emit(result, json_out, render_mapping)


@app.command()
@handled
@model_command
@with_fuse_options
@with_train_options
def learn(
    task: Annotated[str, typer.Argument(help="Name for the new task.")],
    data: Annotated[Path, typer.Option("--data", help="JSON list or JSONL of {input, output} or {messages} (chat template) records.")],
    into: Annotated[str, typer.Option("--into", help="The line to train from and fuse into.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model, when the line does not exist yet.")] = None,
    rebase: Annotated[bool, typer.Option("--rebase", help="When the line gained a version while TASK trained, fuse it onto "
                                                          "the new head anyway (recorded, and warned about); without it "
                                                          "that fails with exit 6 and records nothing.")] = False,
    val: ValOpt = None,
    max_regression: Annotated[Optional[float], typer.Option(
        "--max-regression", help="Quality gate: refuse the version (exit 6; neither task nor version is recorded) when a "
                                 "task the line holds would lose more than POINTS of exact match on its validation "
                                 "examples against the head.", metavar="POINTS")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
    train_options: dict = None, fuse_options: dict = None,
) -> None:
    """Train TASK and fuse it into LINE in one step: one new version, or nothing on failure."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.learn(task, data, into, base=base, options=train_options, **fuse_options, rebase=rebase, val=val,
                           max_regression=max_regression, registry=registry, progress=progress)
    rebased = (result or {}).get("rebased")
    if rebased:  # on stderr, so with --json too
        print(f"kifmerge: warning: --rebase: line {into!r} moved to {rebased['head']} while task {task!r} trained from "
              f"{rebased['trained_from']}; fused onto {rebased['head']} by {result['method']}, so what the line learned "
              "since may be lost in the units the task takes", file=sys.stderr)
    if result is not None and result.get("reused") and not json_out:
        print(f"kifmerge: task {task!r} was already learned into {result['version']} from the same data and options; "
              "nothing was trained (reused)", file=sys.stderr)
    if result is not None:
        emit(result, json_out, render_mapping)


def _labelled_files(items: list[str]) -> dict[str, Path]:
    from kifmerge.errors import UsageError

    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"--data takes NAME=FILE, got {item!r}")
        if label in out:  # the later file would silently replace the earlier one's scores
            raise UsageError(f"--data label {label!r} is given twice ({out[label]} and {path}); give each file its own label")
        out[label] = Path(path)
    return out


@app.command("eval")
@handled
@model_command
def eval_(
    ref: Annotated[str, typer.Argument(help="LINE, LINE@vN, LINE@ALIAS, LINE@v0 for the base model zero-shot, "
                                            "or task:NAME for the weights of task NAME as trained, before any fuse.")],
    data: Annotated[list[str], typer.Option("--data", help="NAME=FILE, once per task (JSON/JSONL of {input, output}).")],
    max_examples: Annotated[int, typer.Option("--max-examples", help="Evaluate the first N records of each file.")] = 100,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer generated.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Max prompt tokens (middle truncated).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together (batched by length).")] = 16,
    bf16: Annotated[bool, typer.Option("--bf16", help="Generate under bfloat16 autocast (stored as its own setting); on a CPU "
                                                      "without native bf16 it falls back to float32 with a warning.")] = False,
    bf16_force: Annotated[bool, typer.Option("--bf16-force", help="Use bf16 even where it is not native (much slower).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Evaluate again even when a stored result matches.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Generate answers greedily, score exact match (case-folded and cased) and ROUGE-L, store them on the version (or task)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.evaluate(ref, _labelled_files(data), max_examples=max_examples, max_new_tokens=max_new_tokens,
                              max_length=max_length, batch_size=batch_size, bf16=bf16, bf16_force=bf16_force, force=force,
                              registry=registry, progress=progress)
    emit(result, json_out, render_eval)


def render_eval(result: dict) -> None:
    rows = [{"task": label, "exact match": f"{m['exact_match']:.3f}", "cased": f"{m['exact_match_cased']:.3f}",
             "ROUGE-L": f"{m['rouge_l']:.3f}", "examples": m["examples"], "time": _seconds(m.get("seconds")),
             "stored": "reused" if m.get("reused") else "new"} for label, m in result["results"].items()]
    subject = result.get("version") or f"task {result.get('task')}"
    render_table(rows, ["task", "exact match", "cased", "ROUGE-L", "examples", "time", "stored"], "no data",
                 title=f"{subject}: {_brief(result.get('settings') or {})}")


@app.command()
@handled
def report(
    line: Annotated[str, typer.Argument(help="A line with evaluated versions.")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated task labels, in learning order.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="exact_match | exact_match_cased | rouge_l")] = "exact_match",
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw the matrix and forgetting curves (needs matplotlib).")] = None,
    examples: Annotated[bool, typer.Option("--examples", help="With --json: per-example scores of the final row, "
                                                                "the diagonal and learned (for paired bootstrap).")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The continual-learning matrix R (version × task) from stored evaluations; per task learned
    (`eval task:NAME`), fused (diagonal) and final scores, the majority class and the predicted
    answers; AP, BWT vs learned, BWT after fuse, fuse cost and FWT."""
    from kifmerge import api

    if png:
        from kifmerge.plots import checked_png

        checked_png(png)
    result = api.report(line, tasks=tasks.split(",") if tasks else None, metric=metric, examples=examples, registry=registry)
    if png:
        from kifmerge.plots import draw_report

        result["png"] = str(draw_report(result, png))
    emit(result, json_out, render_report)


REPORT_SUMMARIES = (("AP", "AP (mean final row)"), ("BWT_vs_learned", "BWT vs learned (final − learned)"),
                    ("BWT_after_fuse", "BWT after fuse (final − fused diagonal)"),
                    ("fuse_cost", "fuse cost (learned − fused diagonal)"), ("FWT", "FWT"))


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_report(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table("version", "fused", *result["tasks"], title=f"{result['line']}: {result['metric']} (points)")
    for i, (version, fused, row) in enumerate(zip(result["versions"], result["fused"], result["matrix"], strict=True)):
        table.add_row(version, fused or ("(base)" if i == 0 else f"({result['made_by'][i]})"), *map(_points, row))
    console.print(table)
    tasks = Table("task", "learned", "fused (diagonal)", "final", "majority class", "top predictions",
                  title="per task (points; learned: `kifmerge eval task:NAME`)")
    for t in result["per_task"]:
        top = ", ".join(f"{escape(p['answer']) or '(empty)'} {_points(p['share'])}" for p in t["predictions"][:3])  # model text
        majority = "—" if t["majority_class"] is None else f"{_points(t['majority_class'])} ({escape(t['majority_answer'])})"
        tasks.add_row(t["task"], _points(t["learned"]), _points(t["diagonal"]), _points(t["final"]), majority, top)
    console.print(tasks)
    width = max(len(name) for _, name in REPORT_SUMMARIES)
    for key, name in REPORT_SUMMARIES:
        console.print(f"{name:<{width}}  {_points(result[key]):>6}", highlight=False)
    if result["order"] != "learning":
        console.print(f"column order {result['order']}", style="yellow")


@app.command()
@handled
def verify(
    deep: Annotated[bool, typer.Option("--deep", help="Re-hash every blob and every registered base's weight files, and check each profile against its weights' units.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Check every blob the registry references, and the weight files of bases read from their folder (exit 5
    when any is missing, corrupt, changed or inconsistent)."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.verify(deep=deep, registry=registry, progress=progress)
    emit(result, json_out, render_verify)


def render_verify(result: dict) -> None:
    deep = f" (deep: every blob re-hashed, {result['profiles_checked']} profiles match their weights)" if result["deep"] else ""
    bases = f", {result['bases_checked']} base folder(s) unchanged" if result.get("bases_checked") else ""
    print(f"ok: {result['blobs_checked']} blobs verified{deep}{bases} in {result['registry']}")


@app.command()
@handled
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    grace: Annotated[float, typer.Option("--grace", help="Keep unreferenced files younger than this many seconds.")] = 3600.0,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Remove blobs no row references and leftovers of interrupted commands."""
    from kifmerge import api

    result = api.gc(dry_run=dry_run, grace_s=grace, registry=registry)
    emit(result, json_out, lambda r: print(f"{'would remove' if r['dry_run'] else 'removed'} {len(r['removed'])} "
                                          f"files, {r['bytes_freed']} bytes; {r['kept_blobs']} blobs in use"))


LIST_COLUMNS = {
    "tasks": ["name", "base", "kind", "profile", "trained_from", "created"],
    "lines": ["name", "base", "kind", "head", "tasks", "aliases", "created"],
    "versions": ["version", "task", "method", "parent", "aliases", "created"],
    "bases": ["name", "architecture", "hub_id", "path", "copied", "created"],
}


LIST_SECTIONS = ("bases", "lines", "tasks")
LIST_LIMIT = 100  # rows per list in the table by default: a table of 10 000 tasks takes seconds to draw and no one reads it


@app.command("list")
@handled
def list_(
    what: Annotated[Optional[str], typer.Argument(help="tasks | lines | versions | bases (default: bases, lines and tasks; "
                                                       "with --json an object with those three lists).",
                                                  show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, show_default=False,
                                                 help=f"At most N rows per list, the last ones (tasks: the newest); 0: all "
                                                      f"(default: {LIST_LIMIT} in the table, all with --json). A note on "
                                                      "stderr says when some were left out.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """List tasks, lines, versions or bases; without an argument, bases, lines and tasks."""
    from kifmerge import api

    if limit is None:
        limit = 0 if json_out else LIST_LIMIT
    if what is None:
        sections = {section: _last(api, section, limit, registry) for section in LIST_SECTIONS}
        emit(sections, json_out, render_sections)
        return
    rows = _last(api, what, limit, registry)
    emit(rows, json_out, lambda r: render_table(r, LIST_COLUMNS[what], f"no {what} yet"))


def _last(api, what: str, limit: int, registry: Path | None) -> list[dict]:
    """The last `limit` rows of a list (all when 0); one more is read to tell whether some are
    left out, which a note on stderr then says."""
    rows = api.list_items(what, limit=limit + 1 if limit else None, registry=registry)
    if not limit or len(rows) <= limit:
        return rows
    print(f"kifmerge: {what}: only the last {limit} shown; --limit 0 shows all", file=sys.stderr)
    return rows[1:]


def render_sections(sections: dict[str, list[dict]]) -> None:
    for section, rows in sections.items():
        render_table(rows, LIST_COLUMNS[section], f"{section}: none yet", title=section)


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(help="TASK, LINE, LINE@vN or LINE@ALIAS.")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Show one task, line or version."""
    from kifmerge import api

    emit(api.show(ref, registry=registry), json_out, render_mapping)


@app.command()
@handled
def history(
    line: Annotated[str, typer.Argument(help="A line.")],
    events: Annotated[bool, typer.Option("--events", help="The line's event log instead: fuses, rollbacks, alias moves, evals, exports.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """The versions of a line, oldest first (with --events: its audit log)."""
    from kifmerge import api

    if events:
        rows = api.line_events(line, registry=registry)
        emit(rows, json_out, lambda r: render_table(r, ["ts", "action", "subject", "details"], "no events"))
        return
    rows = api.history(line, registry=registry)
    emit(rows, json_out, render_history)


def render_history(rows: list[dict]) -> None:
    """One row per version, its aliases under it; params as `k=v`, one a line. What the fuse
    computed (`methods.COMPUTED_BY_THE_FUSE`) is left to `show` and --json: a row stays a few lines;
    a method the default fell back to says so under it."""
    def cell(column: str, value: Any) -> str:
        if column == "params" and isinstance(value, dict):
            chosen = {k: v for k, v in value.items() if k not in methods.COMPUTED_BY_THE_FUSE}
            return "\n".join(f"{k}={_brief(v, ',')}" for k, v in _flat(chosen)) or "—"
        return _brief(value)

    rows = [{**row, "version": row["version"] + "".join(f"\n@{alias}" for alias in row.get("aliases") or []),
             "method": row["method"] + ("\n(the default's\nfallback)" if (row.get("params") or {}).get("fallback") else "")}
            for row in rows]
    render_table(rows, ["version", "task", "method", "params", "created"], "no versions yet", cell=cell)
