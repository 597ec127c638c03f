"""DVC experiments and MLflow end to end, in a fresh clone with tiny data: `dvc repro`, a
parameter sweep, a queued experiment, `dvc exp show` / `dvc plots show`, the metatest runs
nested under their meta-training runs, and a local `mlflow server` reading the store.

One repository serves the whole module (reproducing it is the expensive part). The params
make a meta-training run take seconds: few teachers, first-order MAML, four iterations.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import pytest
from conftest import BIN, CLONE_TINY, free_port, git, make_dvc_repo, run_dvc, tool_env

METATRAIN = "tags.`purer.stage` = 'metatrain'"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> dict:
    """The clone after `dvc repro` (committed) and `dvc exp run -S adv_scale=0.5`."""
    root = make_dvc_repo(tmp_path_factory.mktemp("exp") / "repo", CLONE_TINY)
    repro = run_dvc(root, "repro", check=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "baseline")
    exp = run_dvc(root, "exp", "run", "-S", "adv_scale=0.5", check=True)
    return {"root": root, "repro_err": repro.stderr, "exp_out": exp.stdout, "exp_err": exp.stderr}


def client_for(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def metatrain_runs(root: Path) -> list:
    client = client_for(root)
    experiment = client.get_experiment_by_name("purer")
    return client.search_runs([experiment.experiment_id], filter_string=METATRAIN)


def test_repro_and_a_sweep_are_two_complete_runs_in_one_store(repo):
    root = repo["root"]
    out = repo["exp_out"]
    assert "Running stage 'metatrain'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'pretrain'" not in out

    client = client_for(root)
    runs = {r.data.params["adv_scale"]: r for r in metatrain_runs(root)}
    assert {"10.0", "0.5"} <= set(runs)
    assert runs["0.5"].data.tags["dvc.exp_name"] == runs["0.5"].info.run_name
    for run in (runs["10.0"], runs["0.5"]):
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.source.git.commit"]
        for key in ("meta_loss", "pseudo_accuracy", "inversion_loss", "adversarial",
                    "val_accuracy"):
            assert len(client.get_metric_history(run_id, key)) >= 2, key
        assert run.data.metrics["iterations"] == 4  # results/metatrain/details.json
        images = [f.path for f in client.list_artifacts(run_id, "images")]
        steps = {p.split("+")[2] for p in images if p.startswith("images/bank+step+")}
        assert steps == {"0", "2", "4"}
        checkpoints = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
        assert "checkpoints/best.safetensors" in checkpoints
        top = {f.path for f in client.list_artifacts(run_id)}
        assert {"params.yaml", "dvc.lock"} <= top
        assert run.info.artifact_uri.startswith((root / "mlruns").resolve().as_uri())
        # The metatest stage's run is nested under the meta-training run it evaluated.
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`purer.parent_run` = '{run_id}'")
        assert [c.data.tags["purer.stage"] for c in children] == ["metatest"]
        assert "test_accuracy" in children[0].data.metrics


def test_an_experiment_run_logs_its_model_and_its_inputs_with_dvc_hashes(repo):
    """`dvc exp run`: the selected model is a logged model linked to its metrics; the pool and
    meta_val are run inputs carrying the hashes DVC recorded for them."""
    import yaml

    root = repo["root"]
    client = client_for(root)
    (run,) = [r for r in metatrain_runs(root) if r.data.params["adv_scale"] == "0.5"]
    models = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
              if m.source_run_id == run.info.run_id]
    assert sorted(m.name for m in models) == ["meta_model", "teachers_ensemble"]
    (meta,) = [m for m in models if m.name == "meta_model"]
    assert {"best_val_accuracy", "test_accuracy"} <= {m.key for m in meta.metrics}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    teachers = {o["path"]: o["md5"] for o in lock["pretrain"]["outs"]}["models/teachers"]
    meta_val = {o["path"]: o["md5"] for o in lock["prepare"]["outs"]}["data/glyphs/meta_val"]
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {"teachers": teachers, "glyphs/meta_val": meta_val}


def test_a_default_experiment_run_warns_about_nothing(repo):
    # compare/dvc.yaml's models/compare, cached but never produced, made every run warn
    assert "WARNING" not in repo["exp_err"], repo["exp_err"]


# tqdm's line: "<desc>: 100%|████| 4/4 [00:01<00:00,  3.21it/s, loss=…]" — count, elapsed<ETA, rate.
PROGRESS = r"{}: +\d+%\|.*\| *\d+/\d+ \[\d+:\d+<\d+:\d+, +[\d.]+ ?(\w+/s|s/\w+)[,\]]"


@pytest.mark.parametrize("bar", ["Glyph-FS classes", "filelist glyphs", "pretrain teachers",
                                 "metatrain", "tasks"])
def test_every_stage_shows_progress_under_dvc_repro(repo, bar):
    assert re.search(PROGRESS.format(re.escape(bar)), repo["repro_err"]), repo["repro_err"][-3000:]


@pytest.mark.parametrize("command", [("metrics", "show"), ("exp", "show"), ("plots", "show")])
def test_dvc_shows_a_default_run_without_warnings(repo, command):
    proc = run_dvc(repo["root"], *command, check=True)
    output = proc.stdout + proc.stderr
    assert "WARNING" not in output and "failed to load" not in output, output


def test_exp_show_has_the_metrics_and_plots_show_renders(repo):
    root = repo["root"]
    rows = list(csv.DictReader(run_dvc(root, "exp", "show", "--csv", check=True).stdout
                               .splitlines()))
    sweep = [r for r in rows if r["adv_scale"] == "0.5" and r["typ"] != "baseline"]
    assert sweep and all(r["val_best"] not in ("", "!") and r["test_acc"] not in ("", "!") for r in sweep), rows
    run_dvc(root, "plots", "show", check=True)
    assert (root / "dvc_plots" / "index.html").is_file()


def queue_state(root: Path, name: str) -> str:
    status = run_dvc(root, "queue", "status", check=True).stdout
    line = next((ln for ln in status.splitlines() if f" {name} " in ln), "")
    return line.split()[-1] if line else ""


def test_a_queued_experiment_logs_into_the_main_store(repo):
    root = repo["root"]
    run_dvc(root, "exp", "run", "--queue", "-n", "queued-adv1", "-S", "adv_scale=1", check=True)
    try:
        run_dvc(root, "queue", "start", check=True)
        deadline = time.monotonic() + 480
        while (state := queue_state(root, "queued-adv1")) not in ("Success", "Failed"):
            assert time.monotonic() < deadline, f"queued experiment still {state!r}"
            time.sleep(5)
        assert state == "Success", run_dvc(root, "queue", "logs", "queued-adv1").stdout
    finally:
        run_dvc(root, "queue", "stop", "--kill")

    (run,) = [r for r in metatrain_runs(root) if r.info.run_name == "queued-adv1"]
    assert run.data.params["adv_scale"] == "1.0"
    assert run.data.tags["dvc.exp_name"] == "queued-adv1"
    assert run.info.status == "FINISHED"
    # The temp copy is gone; the run's files live at the real root.
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(root / "mlruns")
    assert (artifacts / "checkpoints" / "best.safetensors").is_file()
    assert sorted(root.rglob("mlflow.db")) == [root / "mlflow.db"]


def api(base: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_serves_the_runs_and_their_artifacts(repo, tmp_path):
    root = repo["root"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=tmp_path, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: the uvicorn worker goes with it
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
            try:
                with urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        experiment = api(base, "experiments/get-by-name", query={"experiment_name": "purer"})
        found = api(base, "runs/search", {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": METATRAIN})["runs"]
        assert {p["value"] for r in found for p in r["data"]["params"]
                if p["key"] == "adv_scale"} >= {"10.0", "0.5"}
        run_id = found[0]["info"]["run_id"]
        listing = {name: [f["path"] for f in api(
            base, "artifacts/list", query={"run_id": run_id, "path": name})["files"]]
            for name in ("images", "checkpoints")}
        assert any(p.endswith(".png") for p in listing["images"])
        assert "checkpoints/best.safetensors" in listing["checkpoints"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
