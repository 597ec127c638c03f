"""Meta-testing, ICFIL and the comparison table.

- the 95% interval is 1.96·std/√n over tasks;
- the fixed test tasks are the same images for every method (same seed → same tasks);
- ICFIL on and off on one fixed task: both predict, deterministically, and ICFIL changes the
  prediction;
- the metatest stage writes accuracy, ci95, episodes and the per-task accuracies;
- the metatest stage also scores the nearest-prototype head (details.json, per_task.csv, MLflow)
  and leaves the adaptation head's number as it scores alone;
- the compare stage scores every method (and every meta-model's prototype head) at two shots
  on shared tasks, writes the table, the JSON rows, the paired differences and the bar chart,
  and reuses what it trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LEARNER_NAMES, copy_project, tiny_params, tiny_raw, write_yaml

from purer_mlops.errors import UserError
from purer_mlops.meta import scoring as metatest
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.evaluation import mean_ci95
from purer_mlops.meta.heads import FORM, prototype_accuracies
from purer_mlops.meta.icfil import ICFIL
from purer_mlops.meta.pool import init_meta_model
from purer_mlops.meta.tasks import stack_tasks
from purer_mlops.models.learners import build_learner
from purer_mlops.paths import Project
from purer_mlops.stages import compare
from purer_mlops.stages import metatest as metatest_stage
from purer_mlops.stages import metatrain as train
from purer_mlops.tracking import open_tracker


def test_interval_is_1_96_std_over_sqrt_n() -> None:
    mean, ci = mean_ci95([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5
    assert math.isclose(ci, 1.96 * 0.5 / 2)
    values = torch.rand(600, generator=torch.Generator().manual_seed(0))
    assert math.isclose(mean_ci95(values)[1], 1.96 * values.double().std(unbiased=False).item() / math.sqrt(600))


def test_fixed_tasks_are_the_same_images_for_every_method(pool_project: Path) -> None:
    p = tiny_params(episode_test=7)
    test_a, tasks_a = metatest.fixed_test_tasks(p, Project(pool_project))
    test_b, tasks_b = metatest.fixed_test_tasks(p, Project(pool_project))
    a = stack_tasks(test_a, tasks_a, torch.device("cpu"))
    b = stack_tasks(test_b, tasks_b, torch.device("cpu"))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.xq, b.xq)
    other = metatest.fixed_test_tasks(p.replace(**{"metatest.seed": 7}), Project(pool_project))[1]
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(tasks_a, other, strict=True))


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_icfil_on_and_off_on_one_fixed_task(pool_project: Path, kind: str) -> None:
    p = tiny_params(meta_learner=kind, test_inner_update_num=2)
    test, tasks = metatest.fixed_test_tasks(p.replace(episode_test=1), Project(pool_project))
    xs, ys, xq, _ = stack_tasks(test, tasks, torch.device("cpu")).task(0)
    model = init_meta_model(p.replace(average=False), None, test.image_size)
    learner = build_learner(kind, model, p.test_inner_update_num, p.inner_lr)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        plain = learner.query_logits(params, xs, ys, xq, p.way_test)
    icfil = ICFIL(learner, p.calibration, p.inversion, seed=3)
    calibrated = icfil(params, xs, ys, xq, p.way_test)
    assert calibrated.shape == plain.shape == (len(xq), p.way_test)
    assert torch.isfinite(calibrated).all()
    assert torch.equal(calibrated, icfil(params, xs, ys, xq, p.way_test))  # seeded: deterministic
    assert not torch.allclose(calibrated, plain)  # it calibrated something


def test_metatest_stage_writes_both_heads_interval_and_per_task(pool_project: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    root = copy_project(pool_project, tmp_path / "root")
    p = tiny_params(episode_test=9, icfil=True, **{"metatest.reference_protocol": True})
    train.run(p, Project(root), progress=False)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):  # the store: root/mlflow.db
        monkeypatch.delenv(name, raising=False)
    with open_tracker(p.replace(tracking=True), "metatest", root) as tracker:
        m = metatest_stage.run(p, Project(root), progress=False, tracker=tracker)
    assert m["episodes"] == 9 and 0 <= m["accuracy"] <= 100 and m["ci95"] >= 0
    assert set(m["icfil"]["gain"]) == {"difference", "ci95"}
    assert m["reference_protocol"]["checkpoints"] >= 2
    rows = (root / "results/metatest/per_task.csv").read_text().splitlines()
    assert rows[0] == "task,accuracy,accuracy_icfil,accuracy_prototype" and len(rows) == 10
    on_disk = json.loads((root / "results/metatest/details.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"]
    headline = json.loads((root / "results/metatest/metrics.json").read_text())  # what `dvc exp show` shows
    assert headline == {k: round(v, 2) for k, v in {
        "test_acc": m["accuracy"], "test_ci": m["ci95"], "test_proto": m["prototype"]["accuracy"],
        "test_proto_ci": m["prototype"]["ci95"], "test_icfil": m["icfil"]["accuracy"],
        "test_icfil_ci": m["icfil"]["ci95"]}.items()}
    # the adaptation head is the one scored alone; the prototype head is the meta-model's embedding
    model = load_model(Project(root).meta.best)[0]
    test, tasks = metatest.fixed_test_tasks(p, Project(root))
    adapted = metatest.score(p, model, test, tasks, meta_learner=p.meta_learner)
    assert m["accuracy"] == metatest.summary(adapted)["accuracy"]
    proto = prototype_accuracies(model, test, tasks)
    assert on_disk["prototype"] == {**metatest.summary(proto), "form": FORM,
                                    "vs_adaptation": on_disk["prototype"]["vs_adaptation"]}
    per_task = [[float(v) for v in r.split(",")] for r in rows[1:]]
    assert [r[3] for r in per_task] == pytest.approx(proto.tolist(), abs=1e-6)  # the CSV keeps 6 digits
    diff = 100 * torch.tensor([r[3] - r[1] for r in per_task], dtype=torch.float64)
    assert on_disk["prototype"]["vs_adaptation"]["difference"] == pytest.approx(diff.mean().item(), abs=1e-3)
    logged = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(tracker.run_id).data.metrics
    assert logged["test_prototype_accuracy"] == pytest.approx(m["prototype"]["accuracy"])
    assert logged["test_accuracy"] == pytest.approx(m["accuracy"])


def test_compare_scores_every_method_and_head_at_two_shots_and_reuses_models(pool_project: Path, tmp_path: Path
                                                                              ) -> None:
    root = copy_project(pool_project, tmp_path / "root")
    raw = tiny_raw(episode_test=6, episode_train=8, average=True, **{"compare.shots": [1, 2]})
    write_yaml(root, raw)
    p = tiny_params(episode_test=6, episode_train=8, average=True, **{"compare.shots": [1, 2]})
    train.run(p, Project(root), progress=False)  # the main pipeline's 1-shot PURER, reused by the table
    result = compare.run(p, Project(root), progress=False)
    rows = json.loads((root / "results/compare/compare.json").read_text())
    heads = [f"{m}+proto" for m in ("random", "average", "ei", "purer", "oracle")]  # every meta-model's second head
    assert {(r["method"], r["shot"]) for r in rows} == {(m, s) for m in [*p.compare.methods, *heads] for s in (1, 2)}
    assert all(r["accuracy"] is not None and r["ci95"] is not None and r["episodes"] == 6 for r in rows)
    notes = {r["method"]: r["note"] for r in rows if r["shot"] == 1 and "note" in r}
    assert notes["teacher-best"].startswith(("teacher_000, meta-val", "teacher_001, meta-val"))
    assert notes["teachers-ensemble"].startswith("2 teachers, 2 forward passes per image")
    table = (root / "results/compare/compare.md").read_text()
    assert "| purer+icfil |" in table and "| purer+proto |" in table and "| teachers-ensemble |" in table
    assert "5-way 2-shot" in table and "- teacher-best, 2-shot: teacher_00" in table
    assert (root / "results/compare/compare.png").read_bytes()[:4] == b"\x89PNG"
    assert {(d["a"], d["b"]) for d in result["paired"]} >= {("purer", "random"), ("oracle", "purer"),
                                                            ("purer+proto", "purer"), ("purer", "teacher-best")}
    # 1-shot PURER came from models/meta; EI, oracle and 2-shot PURER were trained here
    trained = sorted(p.name for p in (root / "models/compare").iterdir())
    assert trained == ["ei-1shot", "ei-2shot", "oracle-1shot", "oracle-2shot", "purer-2shot"]
    stamps = {f: f.stat().st_mtime_ns for f in (root / "models/compare").rglob("best.safetensors")}
    compare.run(p, Project(root), progress=False)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # nothing retrained


def test_compiled_test_time_adaptation_scores_like_the_eager_one(pool_project: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = tiny_params(episode_test=4, test_inner_update_num=2)
    test, tasks = metatest.fixed_test_tasks(p, Project(pool_project))
    model = init_meta_model(p.replace(average=False), None, test.image_size)
    compiled = p.replace(**{"metatest.compile": True})
    torch.testing.assert_close(metatest.score(compiled, model, test, tasks, meta_learner=p.meta_learner),
                               metatest.score(p, model, test, tasks, meta_learner=p.meta_learner))
    monkeypatch.setenv("PATH", "/nonexistent")  # no C++ compiler: refused before any task runs
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match=r"'metatest.compile' is true but no C\+\+ compiler"):
        metatest.score(compiled, model, test, tasks, meta_learner=p.meta_learner)
