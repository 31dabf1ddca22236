"""`kifmerge mlflow push / sync` and `--report-to mlflow` against a real MLflow tracking server
(no mocks): started once for this module on 127.0.0.1 with a SQLite backend store, a local
artifact root and basic authentication, stopped at the end. One small registry: line `main`
learned parity (v1, its training reported to MLflow) then vowel (v2), both evaluated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("flask_wtf")  # the server's basic-auth app (mlflow[auth])

from conftest import Cli, task_records, write_jsonl  # noqa: E402

USER, PASSWORD = "admin", "kifmerge-test-password"
START_TIMEOUT_S = 120
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    uri: str
    folder: Path

    def client(self):  # credentials: from the environment (the `env` fixture)
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 3600\n")  # one password hash per run, not one per request
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="kifmerge-tests",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(folder / "server.log", "wb")
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (folder / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the MLflow server did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.3)
        yield Server(uri, folder)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture
def env(server, monkeypatch):
    """The tracking server and its credentials in the environment, as a pipeline would set them."""
    for key in MLFLOW_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture(scope="module")
def reg(server, llama_dir, tmp_path_factory) -> Cli:
    """Line `main`: v1 parity (trained with --report-to mlflow), v2 vowel; every version and
    each task's own weights evaluated on both tasks; aliases champion → v1, staging → v2."""
    folder = tmp_path_factory.mktemp("mlflow-registry")
    data = {"parity": write_jsonl(folder / "parity.jsonl", task_records("parity", 16)),
            "vowel": write_jsonl(folder / "vowel.jsonl", task_records("vowel", 16, seed=1))}
    cli = Cli(folder / "registry")
    with pytest.MonkeyPatch.context() as patch:
        for key in MLFLOW_ENV:
            patch.delenv(key, raising=False)
        patch.setenv("MLFLOW_TRACKING_URI", server.uri)
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        cli("init")
        cli("base", "add", "llama", llama_dir)
        learned = cli.json("learn", "parity", "--data", data["parity"], "--into", "main", "--base", "llama",
                           "--max-steps", "3", "--report-to", "mlflow")  # stdout stays JSON: MLflow prints no run URL
        assert learned["version"] == "main@v1"
        cli("learn", "vowel", "--data", data["vowel"], "--into", "main", "--max-steps", "2")
        both = ["--data", f"parity={data['parity']}", "--data", f"vowel={data['vowel']}", "--max-examples", "4",
                "--max-new-tokens", "2"]
        for ref in ("main@v1", "main@v2", "task:parity", "task:vowel"):
            cli("eval", ref, *both)
        cli("alias", "set", "main@v1", "champion")
        cli("alias", "set", "main@v2", "staging")
    cli.data = data
    return cli


def catalog_dump(cli: Cli) -> list[str]:
    with sqlite3.connect(cli.registry / "kifmerge.db") as db:
        return list(db.iterdump())


def runs_of(client, ref: str, experiment: str = "kifmerge") -> list:
    line, number = ref.split("@v")
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id],
                              f"tags.`kifmerge.line` = '{line}' and tags.`kifmerge.version` = '{number}' "
                              "and tags.`kifmerge.run` = 'version'")


def versions_of(client, model: str) -> list:
    return list(client.search_model_versions(f"name = '{model}'"))


def test_push_logs_one_run_registers_it_and_a_repush_changes_nothing(reg, env):
    # each test logs into an experiment of its own: what another test pushed never changes its answers
    where = ["--model", "kif-main", "--experiment", "push"]
    before = catalog_dump(reg)
    result = reg.json("mlflow", "push", "main@v1", *where)
    assert (result["status"], result["run"], result["model_version"], result["changed"]) == ("pushed", "created", "1", True)
    assert result["aliases"]["set"] == {"champion": {"version": "main@v1", "model_version": "1", "from": None}}
    assert result["aliases"]["pending"] == {"staging": "main@v2"}  # v2 is not in MLflow yet
    client = env.client()
    run = client.get_run(result["run_id"])
    version = reg.json("show", "main@v1")
    task = reg.json("show", "parity")
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "main@v1"
    assert {k: tags[f"kifmerge.{k}"] for k in ("line", "version", "task", "method", "weights", "profile", "base",
                                               "base.fingerprint", "state", "task.profile")} == {
        "line": "main", "version": "1", "task": "parity", "method": version["method"], "weights": version["weights"],
        "profile": version["profile_blob"], "base": "llama", "base.fingerprint": reg.json("list", "bases")[0]["fingerprint"],
        "state": "complete", "task.profile": task["profile"]["scores"]}
    assert tags["kifmerge.base.id"] == reg.json("list", "bases")[0]["path"] and "kifmerge.parent" not in tags
    assert "main v1" in tags["mlflow.note.content"]  # the model card, the run's description in the UI
    params = run.data.params
    assert params["fuse.method"] == version["method"] and params["train.max_steps"] == "3"
    assert params["train.data.sha256"] == task["training_config"]["data"]["sha256"]
    metrics = run.data.metrics
    for label, scores in version["evaluations"].items():
        assert metrics[f"eval/{label}/exact_match"] == scores["exact_match"]
        assert metrics[f"eval/{label}/rouge_l"] == scores["rouge_l"]
    assert metrics["train/train_loss"] == task["metrics"]["train_loss"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3  # the training curve, step by step
    assert "cl/AP" in metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/README.md",
            "adapter/kifmerge-profile.safetensors"} <= files
    (mv,) = versions_of(client, "kif-main")
    assert mv.run_id == run.info.run_id and mv.source.endswith("/adapter")
    assert mv.tags["kifmerge.weights"] == version["weights"] and mv.tags["kifmerge.line"] == "main"
    model = client.get_registered_model("kif-main")
    assert model.tags["kifmerge.line"] == "main" and model.aliases == {"champion": "1"}

    again = reg.json("mlflow", "push", "main@v1", *where)
    assert (again["status"], again["changed"], again["run_id"], again["model_version"]) == ("unchanged", False, run.info.run_id, "1")
    assert len(runs_of(client, "main@v1", "push")) == 1 and len(versions_of(client, "kif-main")) == 1
    assert len(client.get_metric_history(run.info.run_id, "eval/parity/exact_match")) == 1
    text = reg("mlflow", "push", "main@v1", *where).stdout
    assert "unchanged" in text and "nothing changed" in text
    assert catalog_dump(reg) == before  # kifmerge's registry is only read


def test_sync_pushes_the_missing_versions_and_mirrors_aliases(reg, env):
    client = env.client()
    reg.json("mlflow", "push", "main@v1", "--model", "kif-sync-first", "--experiment", "sync")  # v1's run exists
    first = reg.json("mlflow", "sync", "main", "--model", "kif-sync", "--experiment", "sync")
    assert first["pushed"] == ["main@v1", "main@v2"] and first["changed"]
    assert [v["status"] for v in first["versions"]] == ["pushed", "pushed"]
    assert client.get_registered_model("kif-sync").aliases == {"champion": "1", "staging": "2"}
    head = client.get_run(first["versions"][1]["run_id"])
    report = reg.json("report", "main")
    assert head.data.metrics["cl/AP"] == report["AP"]  # the head's summaries are `kifmerge report`'s
    assert head.data.metrics["cl/BWT_vs_learned"] == report["BWT_vs_learned"]
    assert head.data.tags["kifmerge.parent"] == "main@v1" and head.data.tags["kifmerge.task"] == "vowel"
    assert len(runs_of(client, "main@v1", "sync")) == 1  # v1's run (pushed to kif-sync-first before) is registered, not logged again
    client.set_registered_model_alias("kif-sync", "prod", "1")  # set by a person in MLflow: never touched
    try:
        reg("alias", "set", "main@v2", "champion")
        reg("alias", "rm", "main@staging")
        reg("alias", "set", "main@v1", "old.one")  # a name MLflow does not take
        second = reg.json("mlflow", "sync", "main", "--model", "kif-sync", "--experiment", "sync")
        assert second["pushed"] == [] and second["updated"] == [] and second["changed"]
        assert second["aliases"]["set"] == {"champion": {"version": "main@v2", "model_version": "2", "from": "1"}}
        assert second["aliases"]["removed"] == {"staging": "2"} and list(second["aliases"]["skipped"]) == ["old.one"]
        assert client.get_registered_model("kif-sync").aliases == {"champion": "2", "prod": "1"}
        third = reg.json("mlflow", "sync", "main", "--model", "kif-sync", "--experiment", "sync")
        assert not third["changed"] and [v["status"] for v in third["versions"]] == ["unchanged", "unchanged"]
    finally:
        reg("alias", "set", "main@v1", "champion")
        reg("alias", "set", "main@v2", "staging")
        reg("alias", "rm", "main@old.one")
    assert len(versions_of(client, "kif-sync")) == 2


def test_new_eval_scores_update_the_pushed_run(reg, env, tmp_path):
    client = env.client()
    shutil.copytree(reg.registry, tmp_path / "registry")  # the eval below stays in this copy
    own = Cli(tmp_path / "registry")
    where = ["--model", "kif-eval", "--experiment", "eval"]
    pushed = own.json("mlflow", "push", "main@v2", *where)
    own("eval", "main@v2", "--data", f"extra={reg.data['parity']}", "--max-examples", "3", "--max-new-tokens", "2")
    again = own.json("mlflow", "push", "main@v2", *where)
    assert again["status"] == "updated" and "eval/extra/rouge_l" in again["metrics"]
    latest = own.json("show", "main@v2")["evaluations"]["extra"]
    assert client.get_run(pushed["run_id"]).data.metrics["eval/extra/exact_match"] == latest["exact_match"]
    assert len(versions_of(client, "kif-eval")) == 1


def test_training_reports_to_the_same_experiment_tagged_with_the_task(reg, env):
    client = env.client()
    experiment = client.get_experiment_by_name("kifmerge")
    (training,) = client.search_runs([experiment.experiment_id], "tags.`kifmerge.run` = 'training'")
    assert training.data.tags["kifmerge.task"] == "parity" and training.data.tags["kifmerge.line"] == "main"
    assert training.info.run_name == "parity" and training.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(training.info.run_id, "loss")] == [1, 2, 3]
    # the version's run links the training run of the same experiment (the only test that pushes into it)
    reg.json("mlflow", "push", "main@v1", "--model", "kif-training")
    (version_run,) = runs_of(client, "main@v1")
    assert version_run.data.tags["kifmerge.training_run"] == training.info.run_id


def test_a_registered_version_downloads_and_loads(reg, env, llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reg.json("mlflow", "push", "main@champion", "--model", "kif-load", "--experiment", "load")
    reg.json("mlflow", "push", "main@v1", "--model", "kif-merged", "--merged", "--experiment", "load")
    exported = reg.json("export", "main@v1", tmp_path / "export")["out"]
    adapter = mlflow.artifacts.download_artifacts(artifact_uri="models:/kif-load@champion", tracking_uri=env.uri,
                                                  dst_path=str(tmp_path / "adapter"))
    merged = mlflow.artifacts.download_artifacts(artifact_uri="models:/kif-merged/1", tracking_uri=env.uri,
                                                 dst_path=str(tmp_path / "merged"))
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    from_mlflow = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter))
    from_registry = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), exported))
    assert torch.equal(from_mlflow, from_registry)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(merged)), from_registry, atol=1e-5)


def retry_budgets(monkeypatch) -> list[dict]:
    """Records, for every HTTP request MLflow makes, the retries, backoff and per-try timeout it
    was configured with, and the worst case they allow: (retries + 1) tries of `timeout` seconds
    plus the backoff sleeps factor·2^(i−1) between them. Quick means a small budget, whatever
    the machine's load (no elapsed-seconds threshold)."""
    from mlflow.utils import rest_utils

    calls: list[dict] = []
    original = rest_utils._get_http_response_with_retries

    def recording(method, url, max_retries, backoff_factor, *args, **kwargs):
        timeout = kwargs.get("timeout")
        calls.append({"retries": int(max_retries), "backoff": float(backoff_factor), "timeout": float(timeout),
                      "budget_s": (max_retries + 1) * float(timeout) + sum(backoff_factor * 2 ** i for i in range(max_retries))})
        return original(method, url, max_retries, backoff_factor, *args, **kwargs)

    monkeypatch.setattr(rest_utils, "_get_http_response_with_retries", recording)
    return calls


def test_an_unreachable_server_is_one_line_and_quick(reg, env, monkeypatch):
    before = catalog_dump(reg)
    calls = retry_budgets(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    result = reg("mlflow", "push", "main@v1", "--model", "kif-main", code=8)
    # the first request finds out: 1 retry of 10 s (kifmerge's first-contact setting), 2·10 + 1 = 21 s at most
    assert calls == [{"retries": 1, "backoff": 1.0, "timeout": 10.0, "budget_s": 21.0}]
    assert result.stderr.count("\n") == 1 and "cannot reach the MLflow tracking server" in result.stderr
    assert "connection refused" in result.stderr
    result = reg("learn", "x", "--data", reg.data["parity"], "--into", "main", "--report-to", "mlflow", code=8)
    assert "cannot reach" in result.stderr  # checked before any training
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the environment's settings win over kifmerge's
        calls.clear()
        result = reg("mlflow", "sync", "main", "--model", "kif-main", code=8)
        # one request, 1 s per try as the environment says: 2·1 + 1 = 3 s at most
        assert calls == [{"retries": 1, "backoff": 1.0, "timeout": 1.0, "budget_s": 3.0}] and "(timed out)" in result.stderr
    assert catalog_dump(reg) == before


def test_wrong_credentials_are_one_line_and_a_rerun_completes(reg, env, monkeypatch):
    before = catalog_dump(reg)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    result = reg("mlflow", "sync", "main", "--model", "kif-creds", code=8)
    assert result.stderr.count("\n") == 1 and "refused the credentials (HTTP 401)" in result.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert "refused the credentials" in reg("mlflow", "push", "main", "--model", "kif-creds", code=8).stderr
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert reg.json("mlflow", "sync", "main", "--model", "kif-creds", "--experiment", "creds")["pushed"] == ["main@v1", "main@v2"]
    assert len(versions_of(env.client(), "kif-creds")) == 2
    assert catalog_dump(reg) == before


def test_a_registered_model_owned_by_something_else_is_refused(reg, env):
    client = env.client()
    client.create_registered_model("someone-elses")
    client.create_registered_model("other-line", tags={"kifmerge.line": "support"})
    reg.json("mlflow", "push", "main@v1", "--model", "kif-adapters", "--experiment", "owned")  # a model of adapter folders
    runs = len(client.search_runs([client.get_experiment_by_name("kifmerge").experiment_id]))
    result = reg("mlflow", "push", "main", "--model", "someone-elses", code=6)
    assert result.stderr.count("\n") == 1 and "was not created by kifmerge" in result.stderr
    assert "holds kifmerge line 'support'" in reg("mlflow", "sync", "main", "--model", "other-line", code=6).stderr
    assert "holds adapter folders" in reg("mlflow", "push", "main", "--model", "kif-adapters", "--merged", code=6).stderr
    assert not versions_of(client, "someone-elses") and not versions_of(client, "other-line")
    assert len(client.search_runs([client.get_experiment_by_name("kifmerge").experiment_id])) == runs
    assert "invalid MLflow model name" in reg("mlflow", "push", "main", "--model", "a'b", code=2).stderr


def kifmerge(reg: Cli, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KIFMERGE_FAULT_POINT": fault or "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kifmerge", *args, "--registry", str(reg.registry)], env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("point", ["mlflow.run-created", "mlflow.artifacts-logged", "mlflow.version-registered"])
def test_a_push_killed_half_way_is_completed_by_the_next_without_duplicates(reg, env, point):
    name = point.split(".")[1].split("-")[0]
    client, model, where = env.client(), f"kif-{name}", ["--model", f"kif-{name}", "--experiment", f"crash-{name}"]
    before = catalog_dump(reg)
    killed = kifmerge(reg, "mlflow", "push", "main@v2", *where, fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    registered = versions_of(client, model)
    assert len(registered) == (point == "mlflow.version-registered")
    assert client.get_registered_model(model).aliases == {}  # killed before the aliases
    result = reg.json("mlflow", "push", "main@v2", *where)
    assert (result["status"], result["run"]) == (("unchanged", "registered") if registered else ("pushed", "resumed"))
    assert result["aliases"]["set"]["staging"]["model_version"] == "1"
    (mv,) = versions_of(client, model)
    (run,) = runs_of(client, "main@v2", f"crash-{name}")  # the interrupted run, completed; no second one
    assert mv.run_id == run.info.run_id and run.info.status == "FINISHED" and run.data.tags["kifmerge.state"] == "complete"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "adapter")} >= {"adapter/adapter_model.safetensors"}
    assert catalog_dump(reg) == before


def test_without_mlflow_the_commands_say_what_to_install(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    result = cli("mlflow", "push", "main", "--model", "m", "--tracking-uri", "http://127.0.0.1:1", code=2)
    assert "pip install 'kifmerge[mlflow]'" in result.stderr and result.stderr.count("\n") == 1


def test_nothing_but_the_mlflow_commands_imports_mlflow(tmp_path):
    code = ("import sys, kifmerge.cli, kifmerge.api, kifmerge.services.mlflow_sync, kifmerge.services.preflight; "
            "kifmerge.api.__dir__(); sys.exit('mlflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_password_in_the_tracking_uri_appears_in_no_output(reg, env, monkeypatch):
    """Issue 23: credentials written into --tracking-uri (`http://user:PASSWORD@host`) reach the
    server (requests sends them) but no output channel: stdout, stderr, --json, the tables, the
    registry's events, nor anything MLflow stores (run tags, params, the registered model's and
    its versions' tags and descriptions); error paths included."""
    for key in MLFLOW_ENV:
        monkeypatch.delenv(key, raising=False)  # the credentials come from the URI alone
    host = env.uri.removeprefix("http://")
    secret_uri = f"http://{USER}:{PASSWORD}@{host}"
    before = catalog_dump(reg)
    seen = []
    pushed = reg("mlflow", "push", "main@v1", "--model", "kif-secret", "--tracking-uri", secret_uri, "--json")
    assert json.loads(pushed.stdout)["tracking_uri"] == f"http://{USER}:***@{host}"
    table = reg("mlflow", "sync", "main", "--model", "kif-secret", "--tracking-uri", secret_uri)
    assert f"{USER}:***@" in table.stdout.replace("\n", "")
    seen += [pushed.stdout, pushed.stderr, table.stdout, table.stderr]
    for uri, code in ((f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}", 8),    # unreachable
                      (f"http://{USER}:{PASSWORD}x@{host}", 8),                       # refused credentials
                      (f"http://{USER}:{PASSWORD}@{host}/no/such/path", 8)):          # not an MLflow server there
        failed = reg("mlflow", "push", "main@v1", "--model", "kif-secret", "--tracking-uri", uri, "--json", code=code)
        assert failed.stderr.count("\n") == 1 and "***" in failed.stderr, failed.stderr
        seen += [failed.stdout, failed.stderr]
    assert not any(PASSWORD in text for text in seen), [text for text in seen if PASSWORD in text]
    assert catalog_dump(reg) == before and not any(PASSWORD in row for row in before)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = env.client()
    stored = [client.get_registered_model("kif-secret")]
    stored += versions_of(client, "kif-secret")
    experiment = client.get_experiment_by_name("kifmerge")
    stored += [(run.data.tags, run.data.params, run.info.artifact_uri) for run in client.search_runs([experiment.experiment_id])]
    assert PASSWORD not in repr(stored)
