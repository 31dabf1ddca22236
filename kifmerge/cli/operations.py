"""The commands that operate versions: aliases, MLflow, rollback, diff, and plan runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kifmerge.cli.rendering import render_table
from kifmerge.cli.runtime import QUIET, app, DebugOpt, emit, handled, JsonOpt, model_command, progress_bars, RegistryOpt


alias_app = typer.Typer(help="Named pointers to versions (LINE@champion), usable wherever LINE@vN is.", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


@alias_app.command("set")
@handled
def alias_set(
    ref: Annotated[str, typer.Argument(help="The version: LINE, LINE@vN or LINE@ALIAS.")],
    name: Annotated[str, typer.Argument(help="Alias name, e.g. champion (not v<number>).")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Point LINE@NAME at a version (create or move it atomically; logged in `history --events`)."""
    from kifmerge import api

    result = api.alias_set(ref, name, registry=registry)
    moved = lambda r: f" (was {r['previous']})" if r["previous"] else " (new)"
    emit(result, json_out, lambda r: print(f"{r['alias']} → {r['version']}" + (moved(r) if r["changed"] else " (unchanged)")))


@alias_app.command("rm")
@handled
def alias_rm(
    ref: Annotated[str, typer.Argument(help="LINE@NAME.")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Remove an alias (its version is untouched)."""
    from kifmerge import api

    result = api.alias_rm(ref, registry=registry)
    emit(result, json_out, lambda r: print(f"removed {r['alias']} (pointed at {r['version']})"))


@alias_app.command("list")
@handled
def alias_list(
    line: Annotated[Optional[str], typer.Argument(help="Only this line's aliases.")] = None,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """List aliases and the versions they point at."""
    from kifmerge import api

    rows = api.alias_list(line, registry=registry)
    emit(rows, json_out, lambda r: render_table(r, ["alias", "version", "updated"], "no aliases yet"))


mlflow_app = typer.Typer(help="Versions, lineage and metrics in an MLflow tracking server and model registry "
                              "(needs the mlflow extra of kifmerge).", no_args_is_help=True)
app.add_typer(mlflow_app, name="mlflow")
MlflowModelOpt = Annotated[str, typer.Option("--model", help="MLflow registered model: one per line, created on the first "
                                                             "push and tagged kifmerge.line; a model of anything else is refused.")]
TrackingUriOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_default=False,
    help="MLflow tracking server, e.g. http://mlflow:5000 (default: $MLFLOW_TRACKING_URI). Credentials: "
         "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, or $MLFLOW_TRACKING_TOKEN.")]
ExperimentOpt = Annotated[Optional[str], typer.Option(
    "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", show_default=False,
    help="MLflow experiment of the runs (default: $MLFLOW_EXPERIMENT_NAME, else kifmerge; created when missing).")]
MergedPushOpt = Annotated[bool, typer.Option("--merged", help="Push full models merged into the base instead of LoRA "
                                                              "adapters (a registered model holds one or the other).")]


@mlflow_app.command("push")
@handled
def mlflow_push(
    ref: Annotated[str, typer.Argument(help="LINE (newest version), LINE@vN or LINE@ALIAS.")],
    model: MlflowModelOpt, tracking_uri: TrackingUriOpt = None, experiment: ExperimentOpt = None,
    merged: MergedPushOpt = False, registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Log one version as an MLflow run (exported folder and model card as artifacts, fuse and learn
    parameters, lineage tags, eval scores and AP/BWT as metrics), register it as a version of
    --model and mirror the line's aliases. A version already there is not pushed again; an
    interrupted push is completed. kifmerge's registry is only read."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.mlflow_push(ref, model=model, tracking_uri=tracking_uri, experiment=experiment, merged=merged,
                                 registry=registry, progress=progress)
    emit(result, json_out, render_mlflow)


@mlflow_app.command("sync")
@handled
def mlflow_sync(
    line: Annotated[str, typer.Argument(help="The line whose versions to push.")],
    model: MlflowModelOpt, tracking_uri: TrackingUriOpt = None, experiment: ExperimentOpt = None,
    merged: MergedPushOpt = False, registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Push every version of LINE that --model does not hold yet (oldest first), bring the others'
    metrics up to date, then move the MLflow aliases to match the line's; --json lists what changed."""
    from kifmerge import api

    with progress_bars() as progress:
        result = api.mlflow_sync(line, model=model, tracking_uri=tracking_uri, experiment=experiment, merged=merged,
                                 registry=registry, progress=progress)
    emit(result, json_out, render_mlflow)


def render_mlflow(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    versions = result.get("versions") or [result]
    render_table([{**v, "MLflow version": v["model_version"], "run": v["run_id"]} for v in versions],
                 ["version", "status", "MLflow version", "run"], "no versions",
                 title=f"MLflow model {result['model']} at {result['tracking_uri']} (experiment {result['experiment']})")
    console = Console()
    aliases = result["aliases"]
    for name, moved in aliases["set"].items():
        console.print(escape(f"alias {name} → model version {moved['model_version']} ({moved['version']})"
                             + (f", was {moved['from']}" if moved["from"] else "")))
    for name, was in aliases["removed"].items():
        console.print(escape(f"alias {name} removed (was model version {was})"))
    for name, ref in aliases["pending"].items():
        console.print(escape(f"alias {name}: {ref} is not in MLflow yet (`kifmerge mlflow sync` pushes it)"))
    for name, why in aliases["skipped"].items():
        console.print(escape(f"alias {name} not mirrored: {why}"))
    if not result["changed"]:
        console.print("nothing changed: MLflow already holds these versions and aliases")


@app.command()
@handled
def rollback(
    line: Annotated[str, typer.Argument(help="The line to roll back.")],
    to: Annotated[str, typer.Option("--to", help="The version whose weights become the head: vN, ALIAS or LINE@….")],
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Make an earlier version's weights and profile the head again, as a NEW version."""
    from kifmerge import api

    result = api.rollback(line, to, registry=registry)
    emit(result, json_out, lambda r: print(f"{r['version']}: rolled back to {r['to']} (parent {r['parent']})"))


@app.command()
@handled
def diff(
    ref_a: Annotated[str, typer.Argument(metavar="A", help="LINE, LINE@vN or LINE@ALIAS.")],
    ref_b: Annotated[str, typer.Argument(metavar="B", help="LINE, LINE@vN or LINE@ALIAS.")],
    top: Annotated[int, typer.Option("--top", help="Show the K most changed units.")] = 10,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Per-unit relative change ‖W_B − W_A‖/‖W_A‖, and what each fuse in between kept, replaced or blended."""
    from kifmerge import api

    emit(api.diff(ref_a, ref_b, top=top, registry=registry), json_out, render_diff)


def render_diff(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def number(value: float | None) -> str:
        return "inf" if value is None else f"{value:.4g}"

    console = Console()
    summary = result["summary"]
    table = Table("from", "to", "unit", "units", "changed", "relative ‖ΔW‖/‖W‖", "max unit", title="diff")
    table.add_row(result["from"], result["to"], result["unit"], str(summary["units"]), str(summary["changed"]),
                  number(summary["relative"]), number(summary["max_relative"]))
    console.print(table)
    if result["steps"]:
        steps = Table("version", "task", "method", "kept", "replaced", "blended", title="fuses in between")
        for step in result["steps"]:
            counts = step["counts"] or {}
            note = step["params"].get("to") if step["method"] == "rollback" else None
            steps.add_row(step["version"], step["task"] or (f"(to v{note})" if note else "—"), step["method"],
                          *[str(counts[f]) if counts else "—" for f in ("kept", "replaced", "blended")])
        console.print(steps)
    elif not result["same_line"]:
        console.print("versions of different lines: no fuse steps between them")
    if result["top"]:
        ranked = Table("unit", "relative", "‖ΔW‖", "fate", title=f"top {len(result['top'])} changed units")
        for unit in result["top"]:
            ranked.add_row(unit["id"], number(unit["relative"]), f"{unit['diff_norm']:.4g}",
                           ", ".join(f"{v}: {fate}" for v, fate in unit["fates"].items()) or "—")
        console.print(ranked)


@app.command("run")
@handled
@model_command
def run_plan(
    plan: Annotated[Path, typer.Argument(help="A plan file (.yaml, .toml or .json): a line and its steps.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the plan and print it with estimates; run nothing.")] = False,
    registry: RegistryOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Run a plan's learn / add-task / fuse / eval steps in order; finished steps are skipped."""
    from kifmerge import api

    def announce(step) -> None:
        state = "already done, skipped" if step.status == "done" else ("would run" if dry_run else "running")
        sys.stderr.write(f"step {step.index}: {step.kind} {step.subject} — {state}\n")

    with progress_bars() as progress:
        result = api.run_plan(plan, dry_run=dry_run, registry=registry, progress=progress,
                              on_step=None if dry_run or QUIET.get() else announce)
    for step in result["steps"]:  # as `fuse` warns, on stderr (so with --json too)
        stale = (step.get("result") or {}).get("stale_start")
        if stale:
            print(f"kifmerge: warning: step {step['step']}: task {step['subject']!r} was trained from "
                  f"{stale['trained_from']}, not from the head {stale['head']}", file=sys.stderr)
    emit(result, json_out, render_plan)


def render_plan(result: dict) -> None:
    rows = [{**step, "estimate": ", ".join(f"{k} {_size(v)}" for k, v in step["estimate"].items() if v is not None),
             "fingerprint": step["fingerprint"][:12], "outcome": _outcome(step.get("result"))} for step in result["steps"]]
    render_table(rows, ["step", "kind", "subject", "status", "estimate", "outcome", "fingerprint"], "no steps")
    verb = "would run" if result["dry_run"] else "ran"
    sys.stdout.write(f"{result['line']}: {result['done']} step(s) done, {result['pending']} {verb if result['dry_run'] else 'pending'}\n")


def _outcome(result: dict | None) -> str:
    """What a step just made: the version, the task, or the scores (exact match)."""
    if not result:
        return ""
    if "results" in result:
        return ", ".join(f"{label} {m.get('exact_match', 0):.2f}" for label, m in result["results"].items())
    return str(result.get("version") or result.get("name") or "")


def _size(value) -> str:
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values())
    if isinstance(value, int) and value > 10_000:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if value < 1000:
                return f"{value:.0f} {unit}"
            value /= 1000
    return str(value)
