"""A line's versions in an MLflow tracking server and model registry (`kifmerge mlflow push` /
`sync`, the extra `kifmerge[mlflow]`).

Each kifmerge version becomes one MLflow run in an experiment (default `kifmerge`): the exported
adapter (or merged model) folder with its model card as artifacts, the fuse and learn parameters
as params, the lineage as `kifmerge.*` tags, the stored eval scores and the continual-learning
summaries (AP, BWT, ...) as metrics. The run is registered as a version of an MLflow registered
model that belongs to one line (tag `kifmerge.line`), and the line's aliases are mirrored onto
MLflow aliases.

kifmerge's registry is only read. Whether a version is in MLflow already is found in MLflow
itself, by the model version's `kifmerge.weights` tag (the weights manifest's sha256, with the
line and version number); an interrupted push left an unregistered run, tagged the same way,
which the next push completes instead of starting another. mlflow is imported inside the
functions, so nothing else pays for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kifmerge.errors import ConflictError, KifError, NotFoundError, RemoteError, UsageError
from kifmerge.faults import fault_point
from kifmerge.redact import redact, redact_uri, redacting_handlers, remember
from kifmerge.services.common import Progress, check_name, opened, resolve_version, start_progress

DEFAULT_EXPERIMENT = "kifmerge"
TAG = "kifmerge."
MIN_VERSION = (2, 9)  # registered-model aliases and tags, search by tag
# a server that does not answer must not keep a pipeline waiting for minutes: fewer, shorter
# retries than MLflow's defaults (7 retries with exponential backoff, 120 s per request), and
# shorter still for the first request, which finds out whether the server answers at all (a
# host that drops packets: ~20 s, not minutes); settings in the environment win
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
HTTP_FIRST_CONTACT = {**HTTP_DEFAULTS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# stdout carries the command's result (--json): no run URLs, no download bars
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
MLFLOW_ALIAS = re.compile(r"^[\w-]+$")
EVAL_METRICS = ("exact_match", "exact_match_cased", "rouge_l")
CL_METRICS = ("AP", "BWT_vs_learned", "BWT_after_fuse", "fuse_cost", "FWT")
MAX_PARAM_VALUE = 6000
MAX_NOTE = 5000  # a run's description is a tag: MLflow 2.9 takes 5000 characters


# ---- what kifmerge knows about a line (read-only) ------------------------------------------
@dataclass
class LineInfo:
    name: str
    kind: str                                    # lora | full
    base: dict[str, Any]
    versions: dict[int, dict[str, Any]]          # number → version row
    tasks: dict[str, dict[str, Any]]             # name → task row
    task_profiles: dict[str, str]                # task → profile scores blob
    evaluations: dict[int, dict[str, dict]]      # number → label → metrics (newest per label)
    aliases: dict[str, int]                      # alias → number
    report: dict[str, Any] | None                # `kifmerge report LINE` (exact match), None without evaluations

    def ref(self, number: int) -> str:
        return f"{self.name}@v{number}"


def _line_info(line: str, registry: str | os.PathLike | None) -> LineInfo:
    from kifmerge.services.evaluating import report

    with opened(registry) as reg:
        line_row = reg.catalog.get("lines", line, "line")
        versions = {v["number"]: v for v in reg.catalog.rows("versions", "line = ?", [line], order_by="number")}
        names = sorted({v["task"] for v in versions.values() if v["task"]})
        tasks = {name: reg.catalog.get("tasks", name, "task") for name in names}
        profiles = {name: row["scores"] for name in names if (row := reg.catalog.find("profiles", name))}
        evaluations: dict[int, dict[str, dict]] = {}
        for row in reg.catalog.rows("evaluations", "line = ?", [line], order_by="id"):
            evaluations.setdefault(row["number"], {})[row["label"]] = row["metrics"]  # the newest wins
        aliases = {row["name"]: row["number"] for row in reg.catalog.aliases(line)}
        base = reg.catalog.get("bases", line_row["base"], "base")
    try:
        summary = report(line, registry=registry) if evaluations else None
    except KifError:
        summary = None
    return LineInfo(line, line_row["kind"], base, versions, tasks, profiles, evaluations, aliases, summary)


def _lineage_tags(info: LineInfo, number: int, artifact: str) -> dict[str, str]:
    version, base = info.versions[number], info.base
    task = info.tasks.get(version["task"]) if version["task"] else None
    tags = {
        "line": info.name, "version": str(number), "ref": info.ref(number), "kind": info.kind, "artifact": artifact,
        "method": version["method"], "task": version["task"],
        "parent": info.ref(version["parent"]) if version["parent"] else None,
        "weights": version["weights"], "profile": version["profile"], "created": version["created"],
        "base": base["name"], "base.id": base.get("hub_id") or base["path"], "base.commit": base.get("revision"),
        "base.fingerprint": base["fingerprint"],
    }
    if task is not None:
        tags.update({"task.weights": task["weights"], "task.profile": info.task_profiles.get(task["name"]),
                     "task.trained_from": task.get("trained_from"), "task.data_sha256": task.get("data_fingerprint"),
                     "task.source": task.get("source")})
    return {TAG + k: str(v) for k, v in tags.items() if v not in (None, "")}


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    if value is None:
        return {}
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {prefix: text[:MAX_PARAM_VALUE]}


def _params(info: LineInfo, number: int) -> dict[str, str]:
    """The fuse parameters (`fuse.*`, with the method) and, for a version that learned a task,
    the task's training options (`train.*`)."""
    version = info.versions[number]
    params = {"fuse.method": version["method"], **_flatten(version["params"] or {}, "fuse")}
    task = info.tasks.get(version["task"]) if version["task"] else None
    if task is not None and task.get("training_config"):
        params.update(_flatten(task["training_config"], "train"))
    return params


def _scalar_metrics(info: LineInfo, number: int) -> dict[str, float]:
    """Stored eval scores (`eval/LABEL/METRIC`) and the continual-learning summaries of the line
    as it was at this version (`cl/AP`, `cl/BWT_vs_learned`, ...; exact match, as `report`)."""
    out: dict[str, float] = {}
    for label, metrics in info.evaluations.get(number, {}).items():
        for key in EVAL_METRICS:
            if isinstance(metrics.get(key), (int, float)):
                out[f"eval/{label}/{key}"] = float(metrics[key])
    for key, value in _cl_summary(info, number).items():
        if value is not None:
            out[f"cl/{key}"] = float(value)
    return out


def _cl_summary(info: LineInfo, number: int) -> dict[str, float | None]:
    """AP, BWT, ... of `report` for the head; for an earlier version the same summaries over
    the matrix as it stood then (rows up to it, the tasks learned by then)."""
    from kifmerge.evaluation import summarise

    rep = info.report
    if rep is None or number >= len(rep["matrix"]):
        return {}
    if number == len(rep["matrix"]) - 1:
        return {key: rep.get(key) for key in CL_METRICS}
    if rep["order"] != "learning":
        row = rep["matrix"][number]
        return {"AP": round(sum(row) / len(row), 6) if row and None not in row else None}
    return summarise([row[:number] for row in rep["matrix"][:number + 1]], rep["learned"][:number])


def _curve(info: LineInfo, number: int) -> list[tuple[str, float, int]]:
    """The training loss of the task this version learned, step by step, and its summary."""
    version = info.versions[number]
    task = info.tasks.get(version["task"]) if version["task"] else None
    metrics = (task or {}).get("metrics") or {}
    out = [("train/loss", float(point["loss"]), int(point["step"])) for point in metrics.get("curve") or []]
    for key in ("train_loss", "eval_loss"):
        if isinstance(metrics.get(key), (int, float)):
            out.append((f"train/{key}", float(metrics[key]), 0))
    return out


# ---- the MLflow side -----------------------------------------------------------------------
@dataclass
class Target:
    client: Any
    uri: str
    model: str
    experiment: str
    experiment_id: str
    artifact: str                                 # adapter | model
    merged: bool
    registered: dict[int, Any] = field(default_factory=dict)  # kifmerge number → MLflow model version


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise UsageError("this needs MLflow: pip install 'kifmerge[mlflow]' (MLflow >= 2.9)") from None
    found = tuple(int(p) for p in re.findall(r"\d+", mlflow.__version__)[:2])
    if found < MIN_VERSION:
        raise UsageError(f"MLflow {mlflow.__version__} is too old (registered-model aliases need >= 2.9): "
                         "pip install -U 'kifmerge[mlflow]'")
    return mlflow


def tracking_uri_of(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    remember(uri)  # its credentials are blanked in every message, result and table from here on
    if not uri:
        raise UsageError("no MLflow tracking server: give --tracking-uri URI or set $MLFLOW_TRACKING_URI "
                         "(e.g. http://mlflow.example.com:5000)")
    return uri


@contextmanager
def mlflow_session(uri: str) -> Iterator[Any]:
    """An MlflowClient for `uri` that has answered one request (so an unreachable server or
    refused credentials fail here, in seconds), with short HTTP retries unless the environment
    sets them, nothing printed on stdout and MLflow's INFO logging quiet; every failure of the
    server turned into one kifmerge error. The process environment is restored afterwards."""
    require_mlflow()
    from mlflow import MlflowClient

    given = {key for key in HTTP_DEFAULTS if os.environ.get(key)}
    saved = {key: os.environ.get(key) for key in (*HTTP_DEFAULTS, *QUIET_ENV)}

    def use(settings: dict[str, str]) -> None:
        os.environ.update({key: value for key, value in settings.items() if key not in given})

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with redacting_handlers("mlflow", "urllib3", "requests"), remote_errors(uri):
            use({**HTTP_FIRST_CONTACT, **QUIET_ENV})
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
            use(HTTP_DEFAULTS)
            yield client
    finally:
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def remote_errors(uri: str) -> Iterator[None]:
    """MLflow's exceptions (and the HTTP library's) as one-line RemoteErrors, exit 8."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise _remote_error(exc, uri) from exc
    except requests.exceptions.RequestException as exc:
        raise RemoteError(f"cannot reach the MLflow tracking server at {redact_uri(uri)} ({_reason(str(exc))}); check "
                          "--tracking-uri / $MLFLOW_TRACKING_URI and that the server runs, then run the command again") from exc


def _remote_error(exc: Exception, uri: str) -> RemoteError:
    """The one-line error for a failure of the server at `uri`; the URI's credentials (and any
    the server's message echoes) redacted."""
    remember(uri)
    uri = redact_uri(uri)
    message = redact(str(getattr(exc, "message", None) or exc))
    code = getattr(exc, "error_code", "")
    if code == "UNAUTHENTICATED" or "error code 401" in message:
        return RemoteError(f"the MLflow server at {uri} refused the credentials (HTTP 401): set $MLFLOW_TRACKING_USERNAME "
                           "and $MLFLOW_TRACKING_PASSWORD (or $MLFLOW_TRACKING_TOKEN) and run the command again")
    if code == "PERMISSION_DENIED" or "error code 403" in message:
        return RemoteError(f"the MLflow server at {uri} denied permission (HTTP 403): the user needs write access to the "
                           "experiment and the registered model; ask an MLflow admin, then run the command again")
    if "error code 404" in message and "/api/2.0/mlflow/" in message:
        return RemoteError(f"{uri} does not answer like an MLflow tracking server (HTTP 404 on its REST API); check "
                           "--tracking-uri / $MLFLOW_TRACKING_URI (the server's address, without a path to the UI)")
    if "failed with exception" in message or "Max retries exceeded" in message:
        return RemoteError(f"cannot reach the MLflow tracking server at {uri} ({_reason(message)}); check --tracking-uri / "
                           "$MLFLOW_TRACKING_URI and that the server runs, then run the command again")
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return RemoteError(f"the MLflow server at {uri} refused the request: {first[:300]}; run the command again once fixed")


def _reason(message: str) -> str:
    lowered = message.lower()
    for needle, reason in (("connection refused", "connection refused"), ("timed out", "timed out"),
                           ("name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                           ("temporary failure in name resolution", "unknown host"), ("ssl", "TLS error")):
        if needle in lowered:
            return reason
    return "no answer"


def _is(exc: Exception, code: str) -> bool:
    return getattr(exc, "error_code", None) == code


def _experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, tags={TAG + "created_by": "kifmerge"})
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            found = client.get_experiment_by_name(name)
    if found.lifecycle_stage != "active":
        raise ConflictError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or choose "
                            "another --experiment")
    return found.experiment_id


def _owned_model(client: Any, name: str, info: LineInfo, artifact: str) -> None:
    """Create the registered model for this line, or check that an existing one is this
    line's (tag `kifmerge.line`) and holds the same kind of artifact; anything else is refused
    before MLflow is changed."""
    from mlflow.exceptions import MlflowException

    model = None
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise
    if model is None:
        tags = {TAG + "line": info.name, TAG + "artifact": artifact, TAG + "base": info.base["name"],
                TAG + "base.fingerprint": info.base["fingerprint"], TAG + "aliases": "[]"}
        try:
            client.create_registered_model(name, tags=tags, description=(
                f"kifmerge line `{info.name}` ({info.kind}, base `{info.base['name']}`): one model version per "
                f"kifmerge version, pushed by `kifmerge mlflow push/sync`; the `{TAG}*` tags carry the lineage."))
            return
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            model = client.get_registered_model(name)
    tags = model.tags or {}
    owner = tags.get(TAG + "line")
    if owner is None:
        raise ConflictError(f"MLflow registered model {name!r} exists and was not created by kifmerge (no {TAG}line tag); "
                            f"choose another --model, or tag it {TAG}line={info.name} to let line {info.name!r} use it")
    if owner != info.name:
        raise ConflictError(f"MLflow registered model {name!r} holds kifmerge line {owner!r}, not {info.name!r}; "
                            "choose another --model (one registered model per line)")
    if tags.get(TAG + "artifact", artifact) != artifact:
        raise ConflictError(f"MLflow registered model {name!r} holds {tags[TAG + 'artifact']} folders, this push would add "
                            f"{'a merged model' if artifact == 'model' else 'an adapter'}; "
                            f"{'drop' if artifact == 'model' else 'add'} --merged, or choose another --model")


def _registered(target: Target, info: LineInfo) -> dict[int, Any]:
    """This line's versions already in the registered model, found by their tags: kifmerge
    number → model version. A model version for the same line and number with other weights was
    pushed from another kifmerge registry: refused."""
    out: dict[int, Any] = {}
    token = None
    while True:
        page = target.client.search_model_versions(f"name = '{target.model}'", page_token=token)
        for mv in page:
            tags = mv.tags or {}
            if tags.get(TAG + "line") != info.name or not str(tags.get(TAG + "version", "")).isdigit():
                continue
            number = int(tags[TAG + "version"])
            version = info.versions.get(number)
            if version is None or tags.get(TAG + "weights") != version["weights"]:
                raise ConflictError(
                    f"MLflow model {target.model!r} version {mv.version} is {info.ref(number)} with other weights "
                    f"(sha {str(tags.get(TAG + 'weights'))[:12]}): it was pushed from another kifmerge registry; "
                    "choose another --model")
            if number not in out or int(mv.version) < int(out[number].version):
                out[number] = mv
        token = getattr(page, "token", None)
        if not token:
            return out


def _version_run(target: Target, info: LineInfo, number: int) -> Any | None:
    """This version's run in the experiment, not registered in this model: left by a push that
    was interrupted, or registered in another model (the oldest, when there are several)."""
    version = info.versions[number]
    query = " and ".join(f"tags.`{TAG}{key}` = '{value}'" for key, value in (
        ("line", info.name), ("version", number), ("weights", version["weights"]), ("artifact", target.artifact),
        ("run", "version")))
    runs = target.client.search_runs([target.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=10)
    return runs[0] if runs else None


def _training_run(target: Target, info: LineInfo, task: str | None) -> str | None:
    """The newest `--report-to mlflow` training run of the task in this experiment."""
    if not task:
        return None
    query = f"tags.`{TAG}task` = '{task}' and tags.`{TAG}line` = '{info.name}' and tags.`{TAG}run` = 'training'"
    runs = target.client.search_runs([target.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _log(client: Any, run_id: str, *, params: dict[str, str] | None = None,
         metrics: list[tuple[str, float, int]] | None = None) -> None:
    from mlflow.entities import Metric, Param

    params, metrics = params or {}, metrics or []
    items = list(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    stamp = int(time.time() * 1000)
    for start in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v, step in metrics[start:start + 900]])


def _push_version(target: Target, info: LineInfo, number: int, registry: str | os.PathLike | None,
                  progress: Progress) -> dict[str, Any]:
    """One version: nothing when it is registered already (but eval scores stored since it was
    pushed are logged to its run); else its run (created; or the one an interrupted push left,
    finished; or, complete, the one pushed for another registered model), then the model version."""
    from mlflow.entities import RunStatus

    from kifmerge.services.exporting import export

    client, ref = target.client, info.ref(number)
    version = info.versions[number]
    scalars = _scalar_metrics(info, number)
    mv = target.registered.get(number)
    if mv is not None:
        run = client.get_run(mv.run_id) if mv.run_id else None
        stale = {k: v for k, v in scalars.items() if run is not None and run.data.metrics.get(k) != v}
        if stale:
            _log(client, run.info.run_id, metrics=[(k, v, 0) for k, v in stale.items()])
        return {**_public(target, ref, "updated" if stale else "unchanged", mv, mv.run_id, sorted(stale)), "run": "registered"}
    run = _version_run(target, info, number)
    if run is None:
        tags = {**_lineage_tags(info, number, target.artifact), TAG + "run": "version", TAG + "state": "incomplete"}
        training = _training_run(target, info, version["task"])
        if training:
            tags[TAG + "training_run"] = training
        run = client.create_run(target.experiment_id, tags=tags, run_name=ref)
        fault_point("mlflow.run-created")
        how = "created"
    else:  # a push that was interrupted before registering (or this version's run, registered in another model)
        how = "reused" if run.data.tags.get(TAG + "state") == "complete" else "resumed"
    run_id = run.info.run_id
    logged = client.get_run(run_id).data
    _log(client, run_id, params={k: v for k, v in _params(info, number).items() if k not in logged.params},
         metrics=[m for m in _curve(info, number) if m[0] not in logged.metrics]
         + [(k, v, 0) for k, v in scalars.items() if logged.metrics.get(k) != v])
    if how != "reused":
        artifact_dir = target.artifact
        with tempfile.TemporaryDirectory(prefix="kifmerge-mlflow-") as tmp:
            folder = Path(tmp) / artifact_dir
            export(ref, folder, merged=target.merged, registry=registry, progress=progress, record=False)
            card = (folder / "README.md").read_text(encoding="utf-8")
            client.log_artifacts(run_id, str(folder), artifact_path=artifact_dir)
        fault_point("mlflow.artifacts-logged")
        client.set_tag(run_id, "mlflow.note.content", card[:MAX_NOTE])  # the run's description in the UI
        client.set_tag(run_id, TAG + "state", "complete")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    task = f"task {version['task']} by {version['method']}" if version["task"] else version["method"]
    mv = client.create_model_version(
        target.model, source=f"{run.info.artifact_uri}/{target.artifact}", run_id=run_id,
        tags=_lineage_tags(info, number, target.artifact),
        description=f"kifmerge {ref}: {task}" + (f", from {info.ref(version['parent'])}" if version["parent"] else ""))
    fault_point("mlflow.version-registered")
    target.registered[number] = mv
    return {**_public(target, ref, "pushed", mv, run_id, sorted(scalars)), "run": how}


def _public(target: Target, ref: str, status: str, mv: Any, run_id: str | None, metrics: list[str]) -> dict[str, Any]:
    return {"version": ref, "status": status, "model": target.model, "model_version": str(mv.version), "run_id": run_id,
            "source": mv.source, "artifact": target.artifact, "metrics": metrics}


def _mirror_aliases(target: Target, info: LineInfo) -> dict[str, Any]:
    """Point every kifmerge alias of the line at the model version of its version. An alias
    whose version is not in MLflow yet is left as it is (`pending`); names MLflow does not take
    (a '.', `latest`) are `skipped`; aliases kifmerge set before and the line no longer has are
    removed. The aliases kifmerge manages are listed in the model's `kifmerge.aliases` tag,
    so aliases set in MLflow by people are never removed."""
    client = target.client
    model = client.get_registered_model(target.model)
    current = {name: str(v) for name, v in (model.aliases or {}).items()}
    try:
        managed = set(json.loads((model.tags or {}).get(TAG + "aliases") or "[]"))
    except ValueError:
        managed = set()
    out: dict[str, Any] = {"set": {}, "removed": {}, "unchanged": [], "pending": {}, "skipped": {}}
    wanted: dict[str, str] = {}
    for name, number in sorted(info.aliases.items()):
        if not MLFLOW_ALIAS.match(name) or name.lower() == "latest":
            out["skipped"][name] = "MLflow alias names take letters, digits, '_' and '-' only, and not 'latest'"
        elif number not in target.registered:
            out["pending"][name] = info.ref(number)
        else:
            wanted[name] = str(target.registered[number].version)
    gone = {name for name in managed - set(info.aliases) if name in current}
    keep = {name for name in managed if name in current and name in out["pending"]}
    # record the names first, so an interruption cannot leave an alias kifmerge set but does not manage
    if not set(wanted) <= managed:
        _tag_aliases(client, target.model, managed | set(wanted))
    for name, mv in wanted.items():
        if current.get(name) == mv:
            out["unchanged"].append(name)
            continue
        client.set_registered_model_alias(target.model, name, mv)
        out["set"][name] = {"version": info.ref(info.aliases[name]), "model_version": mv, "from": current.get(name)}
    for name in sorted(gone):
        client.delete_registered_model_alias(target.model, name)
        out["removed"][name] = current[name]
    final = set(wanted) | keep
    if final != managed | set(wanted):
        _tag_aliases(client, target.model, final)
    return out


def _tag_aliases(client: Any, model: str, names: set[str]) -> None:
    client.set_registered_model_tag(model, TAG + "aliases", json.dumps(sorted(names)))


def _target(client: Any, uri: str, model: str, experiment: str | None, info: LineInfo, merged: bool) -> Target:
    artifact = "adapter" if info.kind == "lora" and not merged else "model"
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment_id = _experiment(client, name)
    _owned_model(client, model, info, artifact)
    target = Target(client, uri, model, name, experiment_id, artifact, merged)
    target.registered = _registered(target, info)
    return target


def _changed(versions: list[dict[str, Any]], aliases: dict[str, Any]) -> bool:
    return any(v["status"] != "unchanged" for v in versions) or bool(aliases["set"] or aliases["removed"])


# ---- the services ----------------------------------------------------------------------------
def mlflow_push(ref: str, *, model: str, tracking_uri: str | None = None, experiment: str | None = None, merged: bool = False,
         registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Log version REF (`LINE`, `LINE@vN`, `LINE@ALIAS`) as one MLflow run, register it as a
    version of registered model `model`, and mirror the line's aliases. Pushing a version that
    is there already changes nothing (its metrics are brought up to date); a push that was
    interrupted is completed. kifmerge's registry is only read."""
    check_name(model, "MLflow model")
    require_mlflow()
    uri = tracking_uri_of(tracking_uri)
    with opened(registry) as reg:
        line, version = resolve_version(reg, ref)
    info = _line_info(line, registry)
    with mlflow_session(uri) as client:
        target = _target(client, uri, model, experiment, info, merged)
        result = _push_version(target, info, version["number"], registry, progress)
        aliases = _mirror_aliases(target, info)
    return {**result, "line": line, "experiment": target.experiment, "experiment_id": target.experiment_id,
            "tracking_uri": redact_uri(uri), "aliases": aliases, "changed": _changed([result], aliases)}


def mlflow_sync(line: str, *, model: str, tracking_uri: str | None = None, experiment: str | None = None, merged: bool = False,
         registry: str | os.PathLike | None = None, progress: Progress = None) -> dict[str, Any]:
    """Push every version of LINE that is not in registered model `model` yet (oldest first;
    interrupted pushes completed), bring the metrics of the others up to date, then mirror the
    aliases. `versions` has every version's status; `pushed`, `updated` and `aliases` what changed."""
    check_name(model, "MLflow model")
    require_mlflow()
    uri = tracking_uri_of(tracking_uri)
    info = _line_info(line, registry)
    if not info.versions:
        raise NotFoundError(f"line {line!r} has no versions yet; nothing to push")
    with mlflow_session(uri) as client:
        target = _target(client, uri, model, experiment, info, merged)
        advance = start_progress(progress, f"pushing {line} to MLflow", len(info.versions))
        versions = []
        for number in sorted(info.versions):
            versions.append(_push_version(target, info, number, registry, None))
            if advance:
                advance(1)
        aliases = _mirror_aliases(target, info)
    return {"line": line, "model": model, "experiment": target.experiment, "experiment_id": target.experiment_id,
            "tracking_uri": redact_uri(uri), "versions": versions,
            "pushed": [v["version"] for v in versions if v["status"] == "pushed"],
            "updated": [v["version"] for v in versions if v["status"] == "updated"],
            "aliases": aliases, "changed": _changed(versions, aliases)}


def check_tracking_server(uri: str | None = None) -> None:
    """Before a `--report-to mlflow` training: the tracking server answers and takes the
    credentials (RemoteError, exit 8, in seconds rather than after the Trainer's set-up). A local
    store (no URI, `file:`, `sqlite:`) needs no check."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    remember(uri)
    if not uri or not uri.startswith(("http://", "https://")):
        return
    with mlflow_session(uri):
        pass


@contextmanager
def training_environment(task: str, line: str | None) -> Iterator[None]:
    """For transformers' MLflowCallback (`--report-to mlflow`): the run goes to experiment
    $MLFLOW_EXPERIMENT_NAME, else `kifmerge` (where `mlflow push` logs the versions), tagged
    `kifmerge.task`, `kifmerge.line` and `kifmerge.run=training` (merged into $MLFLOW_TAGS);
    MLflow prints no run URL on stdout. The environment is restored afterwards."""
    try:
        tags = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
    except ValueError:
        raise UsageError("$MLFLOW_TAGS is not a JSON object; fix or unset it") from None
    tags.update({TAG + "task": task, TAG + "run": "training", **({TAG + "line": line} if line else {})})
    settings = {"MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                "MLFLOW_TAGS": json.dumps(tags), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
