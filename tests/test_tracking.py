"""The MLflow tracker in-process, against real SQLite stores: where the store lives, what a
run holds, how later stages link to the meta-training run, and how a broken store fails."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, run_purer, write_params
from PIL import Image

from purer_mlops.config import from_dict, load_params
from purer_mlops.errors import UserError
from purer_mlops.tracking import Tracker, open_tracker, scenario

DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Tests set the DVC and MLflow variables they need; none leaks in from outside."""
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One store root for the module (as DVC_ROOT): creating a SQLite store takes seconds."""
    return tmp_path_factory.mktemp("store")


def client_for(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def fake_metatrain_outputs(root: Path, model: bytes = b"weights") -> None:
    """The files a finished metatrain stage leaves (contents do not matter to the tracker)."""
    (root / "models" / "meta").mkdir(parents=True, exist_ok=True)
    (root / "models" / "meta" / "best.safetensors").write_bytes(model)
    (root / "models" / "meta" / "best.json").write_text("{}")
    (root / "models" / "meta" / "last.safetensors").write_bytes(model)
    (root / "results" / "metatrain").mkdir(parents=True, exist_ok=True)
    (root / "results" / "metatrain" / "details.json").write_text(
        json.dumps({"best_val_accuracy": 41.5, "iterations": 4, "oracle": False, "note": "x"}))


def png(path: Path) -> Path:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    return path


def test_tracking_false_gives_the_noop_tracker_and_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = from_dict({"tracking": False})
    with open_tracker(params, "metatrain", tmp_path) as tracker:
        assert type(tracker) is Tracker
        tracker.log_metrics({"meta_loss": 1.0}, step=1)
    assert not list(tmp_path.iterdir())  # no mlflow.db, no mlruns/


def test_metatrain_run_holds_params_tags_series_and_outputs(project, store, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(store))
    params = load_params(write_params(project, experiment_name="holds"))
    with open_tracker(params, "metatrain", project) as tracker:
        for step in (1, 2):
            tracker.log_metrics({"meta_loss": 1.0 / step, "adversarial": step == 2}, step=step)
            tracker.log_image(png(project / f"bank{step}.png"), key="bank", step=step)
        fake_metatrain_outputs(project)

    client = client_for(store)
    experiment = client.get_experiment_by_name("holds")
    assert experiment.artifact_location == (store / "mlruns").resolve().as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "metatrain-glyphs-maml-5w1s-adv10"
    assert run.data.params == {k: str(v) for k, v in params.flat().items()}
    tags = run.data.tags
    assert (tags["stage"], tags["dataset"], tags["scenario"], tags["meta_learner"]) == (
        "metatrain", "glyphs", "SS", "maml")
    assert "mlflow.source.git.commit" not in tags  # the project is no git repository
    assert [m.step for m in client.get_metric_history(run_id, "meta_loss")] == [1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "adversarial")] == [0.0, 1.0]
    assert run.data.metrics["best_val_accuracy"] == 41.5  # details.json, numbers only
    assert "note" not in run.data.metrics
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert sum(p.startswith("images/bank+step+") and p.endswith(".png") for p in images) == 2
    assert {f.path for f in client.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/best.safetensors", "checkpoints/best.json", "checkpoints/last.safetensors"}
    assert "params.yaml" in {f.path for f in client.list_artifacts(run_id)}
    assert not (project / "mlflow.db").exists()  # the store is DVC_ROOT's, not the copy's


def test_metrics_reach_the_store_in_batches_and_all_by_the_end(project, store, monkeypatch):
    from purer_mlops.tracking.tracker import MlflowTracker

    monkeypatch.setenv("DVC_ROOT", str(store))
    monkeypatch.setattr(MlflowTracker, "FLUSH_SECONDS", 3600.0)
    params = load_params(write_params(project, experiment_name="batches"))
    client = client_for(store)
    with open_tracker(params, "metatrain", project) as tracker:
        for step in (1, 2, 3):
            tracker.log_metrics({"meta_loss": float(step)}, step=step)
        assert client.get_metric_history(tracker.run_id, "meta_loss") == []  # buffered
        tracker.log_image(png(project / "bank.png"), key="bank", step=3)  # writes what is buffered
        assert [m.step for m in client.get_metric_history(tracker.run_id, "meta_loss")] == [1, 2, 3]
        monkeypatch.setattr(MlflowTracker, "FLUSH_SECONDS", 0.0)
        tracker.log_metrics({"meta_loss": 4.0}, step=4)  # the interval has passed: written at once
        assert len(client.get_metric_history(tracker.run_id, "meta_loss")) == 4
        monkeypatch.setattr(MlflowTracker, "FLUSH_SECONDS", 3600.0)
        tracker.log_metrics({"meta_loss": 5.0}, step=5)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "meta_loss")] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_dvc_variables_name_and_tag_the_run(project, store, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(store))
    monkeypatch.setenv("DVC_EXP_NAME", "lofty-yard")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.setenv("DVC_STAGE", "metatrain")
    params = load_params(write_params(project, experiment_name="dvc-vars"))
    with open_tracker(params, "metatrain", project) as tracker:
        run_id = tracker.run_id
    run = client_for(store).get_run(run_id)
    assert run.info.run_name == "lofty-yard"
    assert run.data.tags["dvc.exp_name"] == "lofty-yard"
    assert run.data.tags["dvc.baseline_rev"] == "a" * 40


def test_metatest_run_links_to_the_run_that_trained_its_model(tmp_path, store, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(store))
    params = from_dict({"experiment_name": "links"})
    trained = {}
    for model in (b"model-a", b"model-b"):
        root = tmp_path / model.decode()
        root.mkdir()
        with open_tracker(params, "metatrain", root) as tracker:
            fake_metatrain_outputs(root, model)
        trained[model] = tracker.run_id
    with open_tracker(params, "metatest", tmp_path / "model-a") as tracker:
        tracker.log_metrics({"accuracy": 40.0})
    tags = client_for(store).get_run(tracker.run_id).data.tags
    assert tags["purer.parent_run"] == tags["mlflow.parentRunId"] == trained[b"model-a"]
    assert tags["stage"] == "metatest"


def test_a_failing_stage_marks_its_run_failed(project, store, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(store))
    params = load_params(write_params(project, experiment_name="fails"))
    with pytest.raises(UserError, match="diverged"):
        with open_tracker(params, "metatrain", project) as tracker:
            raise UserError("diverged")
    assert client_for(store).get_run(tracker.run_id).info.status == "FAILED"


@pytest.mark.parametrize("kind", ["file-in-the-way", "no-server"])
def test_a_broken_store_fails_before_the_stage_starts(tmp_path, monkeypatch, kind):
    (tmp_path / "afile").write_text("not a folder")
    uri = {"file-in-the-way": f"sqlite:///{tmp_path}/afile/mlflow.db",
           "no-server": f"http://127.0.0.1:{free_port()}"}[kind]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    entered = False
    with pytest.raises(UserError, match="MLflow") as err:
        with open_tracker(from_dict({}), "metatrain", tmp_path):
            entered = True
    assert not entered
    assert uri in str(err.value) and "tracking: false" in str(err.value)


def test_cli_stops_with_exit_2_on_an_unwritable_store(project, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    proc = run_purer(project, "metatrain", "--quiet", timeout=120,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/afile/mlflow.db"})
    assert proc.returncode == 2, proc.stderr
    assert "error: cannot log to the MLflow store" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "models").exists()


def test_scenario_follows_the_teacher_pool():
    assert scenario(from_dict({})) == "SS"
    assert scenario(from_dict({"pre_backbone": "mix", "average": False})) == "SH"
    assert scenario(from_dict({"pool_datasets": ["glyphs", "cifar100"], "average": False})) == "MH"


def test_system_metrics_are_logged_only_when_asked(project, store, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(store))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    logged = {}
    for on in (False, True):
        params = load_params(write_params(project, experiment_name="system", tracking_system_metrics=on))
        with open_tracker(params, "metatest", project) as tracker:
            time.sleep(1.5)
        logged[on] = client_for(store).get_run(tracker.run_id).data.metrics
    assert not any(k.startswith("system/") for k in logged[False])
    assert "system/cpu_utilization_percentage" in logged[True]
    assert "system/system_memory_usage_megabytes" in logged[True]


def test_dataset_hashes_are_dvc_s_own(tmp_path):
    from conftest import run_dvc

    from purer_mlops.paths import Project
    from purer_mlops.tracking.inputs import dvc_md5, recorded_md5

    folder = tmp_path / "data" / "glyphs" / "meta_val"
    for cls, n in (("a", 2), ("b", 1)):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            png(folder / cls / f"{i}.png")
    (folder / "b" / "notes.txt").write_text("any file counts")
    run_dvc(tmp_path, "init", "--no-scm", check=True)
    run_dvc(tmp_path, "add", "data/glyphs/meta_val", check=True)
    recorded = recorded_md5(Project(tmp_path), folder)  # from data/glyphs/meta_val.dvc
    assert recorded is not None and recorded.endswith(".dir")
    assert dvc_md5(folder) == recorded
    png(folder / "a" / "2.png")
    assert dvc_md5(folder) != recorded
