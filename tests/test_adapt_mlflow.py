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
- both models of a meta-training run (the meta-model, the teachers' ensemble) are versions of the
  registered model ``purer-glyphs``, ``@baseline`` the meta-model and ``@champion`` the better on
  meta-val; ``mlflow models serve -m models:/purer-glyphs@champion`` answers a task over HTTP with
  `purer adapt`'s probabilities (the champion's kind), and the logged ensemble predicts what the
  comparison table's ``teachers-ensemble`` row computes;
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
    check_one_error_line,
    copy_project,
    free_port,
    lay_out_task,
    run_purer,
    write_yaml,
)

from purer_mlops.meta import scoring as metatest
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.heads import frozen_embed, head_probs
from purer_mlops.meta.tasks import stack_tasks
from purer_mlops.models.learners import build_learner
from purer_mlops.models.pool_storage import load_pool
from purer_mlops.paths import Project
from purer_mlops.serve import logged_model, registry
from purer_mlops.serve.pyfunc import IMAGE_ROOT
from purer_mlops.serve.registry import TAG_KIND, TAG_VAL, registered_name
from purer_mlops.stages.metatrain import log_selected_model
from purer_mlops.tracking import open_tracker, outputs
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
        log_selected_model(tracker, params, Project(root), metrics)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/meta_model")
    expected, support, query = metatest_probabilities(root, shot=5)
    out = model.predict(task_frame(support, query))
    assert torch.allclose(probabilities(out), expected.double(), atol=2e-6)
    assert list(out["row"]) == list(range(25, 100))  # the query rows come after 25 support rows
    assert (out["predicted"] == out["label"]).mean() == pytest.approx(
        (expected.argmax(1) == torch.arange(5).repeat_interleave(15)).float().mean().item())

    # the teachers' ensemble, logged beside it: the comparison table's teachers-ensemble row
    ensemble = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/teachers_ensemble")
    pool = load_pool(Project(root).teachers)
    test, tasks = metatest.fixed_test_tasks(adapt_params(num_sup_test=5, episode_test=1), Project(root), 5)
    heads, _ = head_probs([frozen_embed(m.eval()) for _, m in pool], test, tasks)  # (N, 1, Q, way)
    assert torch.allclose(probabilities(ensemble.predict(task_frame(support, query))), heads.mean(0)[0].double(),
                          atol=2e-6)
    check_registry(mlflow.MlflowClient(uri), tracker.run_id, metrics)

    # a second run on the same pool and meta-val tasks reads the ensemble's accuracy from the registry
    def scored_again(*_):
        raise AssertionError("the ensemble was scored on meta-val again")

    monkeypatch.setattr(registry, "ensemble_val_accuracy", scored_again)
    with open_tracker(params, "metatrain", root) as again:
        log_selected_model(again, params, Project(root), metrics)
    check_registry(mlflow.MlflowClient(uri), again.run_id, metrics)
    ensembles = [v for v in mlflow.MlflowClient(uri).search_model_versions(f"name = '{registered_name('glyphs')}'")
                 if v.tags[TAG_KIND] == "teachers-ensemble"]
    assert len(ensembles) == 2 and len({(v.tags[TAG_VAL], v.tags[registry.TAG_KEY]) for v in ensembles}) == 1


def check_registry(client, run_id: str, metrics: dict) -> None:
    """Both models of the run are versions of purer-glyphs; @baseline is the meta-model, @champion
    the version with the best meta-val accuracy."""
    name = registered_name("glyphs")
    versions = {v.tags[TAG_KIND]: v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id}
    assert set(versions) == {"meta-model", "teachers-ensemble"}
    assert float(versions["meta-model"].tags[TAG_VAL]) == pytest.approx(metrics["best_val_accuracy"], abs=1e-4)
    baseline, champion = (client.get_model_version_by_alias(name, alias) for alias in ("baseline", "champion"))
    assert baseline.version == versions["meta-model"].version
    best = max(versions.values(), key=lambda v: float(v.tags[TAG_VAL]))
    assert champion.version == best.version


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


def test_purer_ui_refuses_a_server_store_in_one_line(tmp_path):
    write_yaml(tmp_path, adapt_raw())
    proc = run_purer(tmp_path, "ui", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    check_one_error_line(proc, "MLflow server at http://127.0.0.1:9", "/#/experiments?workflowType=machine_learning")


def test_tracking_links_test_metrics_to_the_logged_meta_model_by_its_name():
    assert outputs.META_MODEL == logged_model.MODEL_NAME


def meta_models(client, experiment_id: str) -> list:
    """The experiment's logged meta-models (each meta-training run also logs the teachers' ensemble)."""
    return [m for m in client.search_logged_models(experiment_ids=[experiment_id]) if m.name == "meta_model"]


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

    (model,) = meta_models(client, experiment.experiment_id)
    assert model.source_run_id == train.info.run_id and model.name == "meta_model"
    linked = {m.key: m for m in model.metrics}
    assert linked["best_val_accuracy"].value == pytest.approx(metrics["best_val_accuracy"])
    assert linked["best_val_accuracy"].step == metrics["best_iteration"]
    tested = json.loads((server_runs["root"] / "results" / "metatest" / "details.json").read_text())
    assert linked["test_accuracy"].value == pytest.approx(tested["accuracy"])  # from the metatest run
    outputs = [(o.model_id, o.step) for o in train.outputs.model_outputs]
    assert len(outputs) == 2 and (model.model_id, metrics["best_iteration"]) in outputs  # and the ensemble

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
    (model,) = meta_models(client, experiment.experiment_id)
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


@pytest.mark.slow
def test_the_champion_alias_serves_what_purer_adapt_answers_over_http(server_runs):
    from mlflow import MlflowClient

    client = MlflowClient(server_runs["uri"])
    (train,) = runs_by_stage(client, client.get_experiment_by_name("served").experiment_id)["metatrain"]
    metrics = json.loads((server_runs["root"] / "results" / "metatrain" / "details.json").read_text())
    check_registry(client, train.info.run_id, metrics)
    name = registered_name("glyphs")
    kind = client.get_model_version_by_alias(name, "champion").tags[TAG_KIND]
    root, tmp = server_runs["root"], server_runs["tmp"]
    _, support, query = metatest_probabilities(root)
    adapted = run_purer(root, "adapt", str(support), str(query), "--model", kind, "--out", str(tmp / "adapt.csv"),
                        "--quiet")
    assert adapted.returncode == 0, adapted.stderr
    port = free_port()
    with background([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
                     "local", "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/ping",
                    tmp / "serve-champion.log", env={"MLFLOW_TRACKING_URI": server_runs["uri"]}, cwd=tmp):
        status, answer = post_task(port, task_frame(support, query, support_by_path=False))
    assert status == 200
    assert torch.allclose(probabilities(pd.DataFrame(answer["predictions"])),
                          probabilities(pd.read_csv(tmp / "adapt.csv")), atol=2e-6)


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
    (model,) = meta_models(client, client.get_experiment_by_name("served").experiment_id)
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
