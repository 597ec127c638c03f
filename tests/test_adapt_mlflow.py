"""The meta-model as an MLflow 3 logged model, and what a run records, read back for real.

- the pyfunc model logged into a run (SQLite store) and loaded back with
  ``mlflow.pyfunc.load_model`` predicts exactly what the metatest code path predicts;
- through a real ``mlflow server`` on 127.0.0.1, the real CLI's metatrain, metatest and compare
  runs hold: the experiment marked as model training, the logged model at the selected step
  with its linked metrics, the teachers and splits as dataset inputs with their DVC hashes (from
  dvc.lock when it records them), metatest nested under metatrain, one child run per compared
  method;
- ``mlflow models serve`` on 127.0.0.1 answers one task over HTTP with the in-process predictions,
  after refusing, in one line with HTTP 400, a request that names a file on the server;
- ``purer serve`` refuses a body over its bound (413) or without a length (411) before reading
  it, and answers the next task as ``mlflow models serve`` does.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    BIN,
    adapt_params,
    adapt_raw,
    background,
    copy_project,
    free_port,
    lay_out_task,
    run_purer,
    write_yaml,
)

from purer_mlops.meta import scoring as metatest
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.tasks import stack_tasks
from purer_mlops.models.learners import build_learner
from purer_mlops.paths import Project
from purer_mlops.serve.pyfunc import IMAGE_ROOT
from purer_mlops.stages.metatrain import log_selected_model
from purer_mlops.tracking import open_tracker
from purer_mlops.tracking.inputs import dvc_md5

DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)


def task_frame(support: Path, query: Path, support_by_path: bool = True) -> pd.DataFrame:
    """The task of two folders as the pyfunc model's input: support by path (or as image bytes),
    query as image bytes."""
    rows = [{"role": "support", "label": f.parent.name, "path": str(f) if support_by_path else "",
             "image": b"" if support_by_path else f.read_bytes()} for f in sorted(support.glob("*/*.png"))]
    rows += [{"role": "query", "label": f.parent.name, "path": "", "image": f.read_bytes()}
             for f in sorted(query.glob("*/*.png"))]
    return pd.DataFrame(rows)


def metatest_probabilities(root: Path, shot: int = 1) -> tuple[torch.Tensor, Path, Path]:
    """The first fixed meta-test task's query probabilities by the metatest code path, and the
    task laid out as folders."""
    params = adapt_params(num_sup_test=shot, episode_test=1)
    test, tasks = metatest.fixed_test_tasks(params, Project(root), shot)
    folder = root / f"task{shot}"
    support, query = (folder / "support", folder / "query") if folder.exists() else lay_out_task(test, tasks[0],
                                                                                                   folder)
    model, _ = load_model(Project(root).meta.best)
    learner = build_learner("maml", model, params.test_inner_update_num, params.inner_lr)
    xs, ys, xq, _ = stack_tasks(test, tasks, torch.device("cpu")).task(0)
    with torch.no_grad():
        logits = learner.query_logits({k: v.detach() for k, v in model.named_parameters()}, xs, ys, xq, 5)
    return logits.softmax(1), support, query


def probabilities(frame: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(dtype="float64"))


def test_the_logged_pyfunc_model_predicts_what_metatest_predicts(adapt_project, tmp_path, monkeypatch):
    root = copy_project(adapt_project, tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(IMAGE_ROOT, str(root))  # the support goes by path: allowed under this folder only
    params = adapt_params(tracking=True, experiment_name="pyfunc")
    metrics = json.loads((adapt_project / "results" / "metatrain" / "details.json").read_text())
    with open_tracker(params, "metatrain", root) as tracker:
        log_selected_model(tracker, Project(root).meta.best, metrics)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/meta_model")
    expected, support, query = metatest_probabilities(root, shot=5)
    out = model.predict(task_frame(support, query))
    assert torch.allclose(probabilities(out), expected.double(), atol=2e-6)
    assert list(out["row"]) == list(range(25, 100))  # the query rows come after 25 support rows
    assert (out["predicted"] == out["label"]).mean() == pytest.approx(
        (expected.argmax(1) == torch.arange(5).repeat_interleave(15)).float().mean().item())


COMPARE = {"compare": {"methods": ["random", "purer"], "shots": [1]}, "episode_test": 2}


@pytest.fixture(scope="module")
def server_runs(adapt_project, tmp_path_factory) -> Iterator[dict]:
    """metatrain, metatest and compare through the real CLI, logged to a real `mlflow server`."""
    tmp = tmp_path_factory.mktemp("server")
    root = copy_project(adapt_project, tmp / "project")
    for stem in ("best", "last"):  # metatrain retrains; keep nothing stale around
        for suffix in (".safetensors", ".json"):
            (root / "models" / "meta" / f"{stem}{suffix}").unlink(missing_ok=True)
    write_yaml(root, adapt_raw(tracking=True, experiment_name="served", **COMPARE))
    # dvc.lock records meta_val's hash: the run must carry that one (the teachers' is computed).
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "purer prepare", "outs": [
        {"path": "data/glyphs/meta_val", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": base}
    with background([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                     "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"], f"{base}/health", tmp / "server.log", cwd=tmp):
        for stage in ("metatrain", "metatest", "compare"):
            out = run_purer(root, stage, "--quiet", env=env)
            assert out.returncode == 0, out.stderr[-3000:]
        yield {"root": root, "uri": base, "tmp": tmp}


def runs_by_stage(client, experiment_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id]):
        out.setdefault(run.data.tags["purer.stage"], []).append(run)
    return out


@pytest.mark.slow
def test_the_server_holds_model_metrics_datasets_and_child_runs(server_runs):
    from mlflow import MlflowClient

    client = MlflowClient(server_runs["uri"])
    experiment = client.get_experiment_by_name("served")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = runs_by_stage(client, experiment.experiment_id)
    (train,) = runs["metatrain"]
    metrics = json.loads((server_runs["root"] / "results" / "metatrain" / "details.json").read_text())

    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == train.info.run_id and model.name == "meta_model"
    linked = {m.key: m for m in model.metrics}
    assert linked["best_val_accuracy"].value == pytest.approx(metrics["best_val_accuracy"])
    assert linked["best_val_accuracy"].step == metrics["best_iteration"]
    tested = json.loads((server_runs["root"] / "results" / "metatest" / "details.json").read_text())
    assert linked["test_accuracy"].value == pytest.approx(tested["accuracy"])  # from the metatest run
    assert [(o.model_id, o.step) for o in train.outputs.model_outputs] == [(model.model_id, metrics["best_iteration"])]

    inputs = {d.dataset.name: d for d in train.inputs.dataset_inputs}
    assert set(inputs) == {"teachers", "glyphs/meta_val"}
    assert inputs["glyphs/meta_val"].dataset.digest == "0123456789abcdef0123456789abcdef.dir"
    assert inputs["teachers"].dataset.digest == dvc_md5(server_runs["root"] / "models" / "teachers")
    assert {t.key: t.value for t in inputs["teachers"].tags}["mlflow.data.context"] == "training"

    (test,) = runs["metatest"]
    assert test.data.tags["mlflow.parentRunId"] == train.info.run_id
    assert [d.dataset.name for d in test.inputs.dataset_inputs] == ["glyphs/meta_test"]
    # child runs inherit their parent's tags (purer.stage too); the parent hangs under metatrain
    (compare,) = [r for r in runs["compare"] if r.data.tags["mlflow.parentRunId"] == train.info.run_id]
    children = [r for r in runs["compare"] if r.data.tags["mlflow.parentRunId"] == compare.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["purer-1shot", "random-1shot"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_task_over_http(server_runs):
    from mlflow import MlflowClient

    client = MlflowClient(server_runs["uri"])
    experiment = client.get_experiment_by_name("served")
    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    root, tmp = server_runs["root"], server_runs["tmp"]
    expected, support, query = metatest_probabilities(root)
    frame = task_frame(support, query, support_by_path=False)
    spied = frame.copy()
    spied.loc[0, ["path", "image"]] = ["/etc/passwd", b""]
    port = free_port()
    with background([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{model.model_id}", "--env-manager",
                     "local", "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/ping",
                    tmp / "serve.log", env={"MLFLOW_TRACKING_URI": server_runs["uri"]}, cwd=tmp):
        status, refused = post_task(port, spied)
        _, answer = post_task(port, frame)  # the next good request is answered
    assert status == 400 and "stack_trace" not in refused and refused["error_code"] == "INVALID_PARAMETER_VALUE"
    assert refused["message"].startswith("row 0 names a file path") and "\n" not in refused["message"]  # no echo
    answer = pd.DataFrame(answer["predictions"])
    assert len(answer) == 75
    assert torch.allclose(probabilities(answer), expected.double(), atol=2e-6)


def post_task(port: int, frame: pd.DataFrame) -> tuple[int, dict]:
    """POST the task to a served model on 127.0.0.1: HTTP status and the JSON answer."""
    body = {"dataframe_split": {"columns": list(frame.columns), "data": [
        [r.role, r.label, r.path, base64.b64encode(r.image).decode()] for r in frame.itertuples()]}}
    return answer_of(Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"}))


@pytest.mark.slow
def test_purer_serve_bounds_the_request_before_reading_it(server_runs):
    from mlflow import MlflowClient

    client = MlflowClient(server_runs["uri"])
    (model,) = client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name("served").experiment_id])
    root, tmp = server_runs["root"], server_runs["tmp"]
    expected, support, query = metatest_probabilities(root)
    port = free_port()
    with background([str(BIN / "purer"), "serve", f"models:/{model.model_id}", "--port", str(port),
                     "--max-request-mb", "1"], f"http://127.0.0.1:{port}/ping", tmp / "purer-serve.log",
                    env={"MLFLOW_TRACKING_URI": server_runs["uri"]}, cwd=tmp):
        url = f"http://127.0.0.1:{port}/invocations"
        too_large = answer_of(Request(url, data=b"{" + b" " * 2**21 + b"}",
                                      headers={"Content-Type": "application/json"}))
        unsized = answer_of(Request(url, data=iter([b"{}"]), headers={"Content-Type": "application/json"}))
        status, answer = post_task(port, task_frame(support, query, support_by_path=False))
    assert too_large[0] == 413 and "over the 1048576 this server takes" in too_large[1]["message"]
    assert unsized[0] == 411 and "Content-Length" in unsized[1]["message"]
    assert status == 200
    assert torch.allclose(probabilities(pd.DataFrame(answer["predictions"])), expected.double(), atol=2e-6)


def answer_of(request: Request) -> tuple[int, dict]:
    try:
        with urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except HTTPError as err:
        return err.code, json.loads(err.read())
