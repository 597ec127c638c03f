"""`purer adapt`: a user's task from image folders, labelled by the teachers' ensemble (the
default) or the meta-model adapted to it.

- by default, on a meta_test task: the probabilities and accuracy of the comparison table's
  ``teachers-ensemble`` row (meta/baselines' computation); ICFIL or a missing pool with the
  ensemble: one line, exit 2;
- with the meta-model, on a meta_test task of 5 classes, 1 and 5 shots, 15 queries per class, laid out as folders,
  the command gives exactly the predictions and the accuracy of the metatest code path;
- with ICFIL, the predictions of metatest's ICFIL on that task;
- a flat query folder in small batches: every image gets one row, probabilities sum to 1, and
  a progress bar counts the images on stderr;
- each bad input (empty class folder, one class, more classes than the head, unreadable
  image, grey mixed with colour, an image over the pixel bound or a decompression bomb (a small
  PNG that says 20000 x 20000), a card that does not match the weights, a card without the
  test-time settings, a card field of the wrong type or out of bounds, weights holding NaN) stops
  with one line, exit 2, and no predictions file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUERY, adapt_params, adapt_raw, check_one_error_line, lay_out_task, run_purer, write_yaml
from PIL import Image

from purer_mlops.meta import scoring as metatest
from purer_mlops.meta.baselines import teacher_accuracies
from purer_mlops.meta.checkpoint import load_model
from purer_mlops.meta.heads import accuracies, frozen_embed, frozen_head_probs, head_probs
from purer_mlops.meta.icfil import ICFIL
from purer_mlops.meta.tasks import stack_tasks
from purer_mlops.models.learners import build_learner
from purer_mlops.models.pool_storage import load_pool
from purer_mlops.paths import Project


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("shot", [1, 5])
def test_adapt_gives_the_metatest_predictions_and_accuracy(adapt_project: Path, tmp_path: Path, shot: int) -> None:
    params = adapt_params(num_sup_test=shot, episode_test=1)
    test, tasks = metatest.fixed_test_tasks(params, Project(adapt_project), shot)
    support, query = lay_out_task(test, tasks[0], tmp_path)

    out = run_purer(adapt_project, "adapt", str(support), str(query), "--model", "meta-model", "--out",
                    str(tmp_path / "p.csv"), "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    rows = read_rows(tmp_path / "p.csv")

    model, _ = load_model(Project(adapt_project).meta.best)
    # the metatest code path, one task
    expected_acc = metatest.score(params, model, test, tasks, meta_learner=params.meta_learner)
    learner = build_learner("maml", model, params.test_inner_update_num, params.inner_lr)
    xs, ys, xq, yq = stack_tasks(test, tasks, torch.device("cpu")).task(0)
    with torch.no_grad():
        probs = learner.query_logits({k: v.detach() for k, v in model.named_parameters()}, xs, ys, xq, 5).softmax(1)
    names = sorted(p.name for p in support.iterdir())
    assert len(rows) == 5 * QUERY and summary["queries"] == 5 * QUERY and summary["support"] == 5 * shot
    assert [r["predicted"] for r in rows] == [names[i] for i in probs.argmax(1).tolist()]
    assert [r["label"] for r in rows] == [names[i] for i in yq.tolist()]
    got = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    assert torch.allclose(got, probs, atol=2e-6)
    assert summary["accuracy"] == pytest.approx(100.0 * expected_acc.item(), abs=1e-4)  # float32 there


def test_adapt_with_icfil_gives_the_metatest_icfil_predictions(adapt_project: Path, tmp_path: Path) -> None:
    params = adapt_params(episode_test=1, **{"calibration.inversion_steps": 2})
    write_yaml(tmp_path, adapt_raw(**{"calibration.inversion_steps": 2}))
    test, tasks = metatest.fixed_test_tasks(params, Project(adapt_project))
    support, query = lay_out_task(test, tasks[0], tmp_path / "task")
    out = run_purer(adapt_project, "adapt", str(support), str(query), "--model", "meta-model", "--icfil", "--params",
                    str(tmp_path / "params.yaml"), "--out", str(tmp_path / "p.csv"), "--quiet")
    assert out.returncode == 0, out.stderr
    model, _ = load_model(Project(adapt_project).meta.best)
    learner = build_learner("maml", model, params.test_inner_update_num, params.inner_lr)
    icfil = ICFIL(learner, params.calibration, params.inversion, params.metatest.seed)
    xs, ys, xq, _ = stack_tasks(test, tasks, torch.device("cpu")).task(0)
    probs = icfil({k: v.detach() for k, v in model.named_parameters()}, xs, ys, xq, 5).softmax(1).detach()
    names = sorted(p.name for p in support.iterdir())
    rows = read_rows(tmp_path / "p.csv")
    got = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    assert json.loads(out.stdout)["icfil"] is True
    assert torch.allclose(got, probs, atol=2e-6)


def test_adapt_serves_the_teachers_ensemble_of_the_comparison_table_by_default(adapt_project: Path,
                                                                               tmp_path: Path) -> None:
    params = adapt_params(episode_test=1)
    test, tasks = metatest.fixed_test_tasks(params, Project(adapt_project))
    support, query = lay_out_task(test, tasks[0], tmp_path / "task")
    out = run_purer(adapt_project, "adapt", str(support), str(query), "--out", str(tmp_path / "p.csv"), "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    pool = load_pool(Project(adapt_project).teachers)
    # the teachers-ensemble row's computation (meta/baselines): its heads' probabilities, their mean
    probs, _ = head_probs([frozen_embed(m.eval()) for _, m in pool], test, tasks)  # (N, 1, Q, way)
    _, accuracy = teacher_accuracies(pool, test, tasks)
    names = sorted(p.name for p in support.iterdir())
    got = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in read_rows(tmp_path / "p.csv")])
    assert summary["model"] == "teachers-ensemble" and summary["teachers"] == len(pool) == 2
    assert torch.allclose(got, probs.mean(0)[0], atol=2e-6)
    assert not torch.allclose(got, probs[0, 0], atol=1e-3)  # not one teacher's head
    assert summary["accuracy"] == pytest.approx(100.0 * accuracy.item(), abs=1e-4)


def test_the_teacher_rows_embedding_each_image_once_equal_the_served_ensemble_task_by_task(
        adapt_project: Path) -> None:
    test, tasks = metatest.fixed_test_tasks(adapt_params(episode_test=6), Project(adapt_project))
    pool = load_pool(Project(adapt_project).teachers)
    each, row = teacher_accuracies(pool, test, tasks)  # the table's rows and the registry's meta-val score
    per_task, yq = head_probs([frozen_embed(m.eval()) for _, m in pool], test, tasks)  # as `purer adapt` embeds
    assert torch.equal(each, accuracies(per_task, yq)) and torch.equal(row, accuracies(per_task.mean(0), yq))
    probs, _ = frozen_head_probs([m for _, m in pool], test, tasks, chunk=7)  # chunks that cut tasks apart
    torch.testing.assert_close(probs, per_task, atol=2e-6, rtol=0)
    assert len(set(row.tolist())) > 1  # tasks that differ: not a constant


def test_the_ensemble_refuses_icfil_and_a_missing_pool_in_one_line_and_takes_a_pool_folder(
        adapt_project: Path, tmp_path: Path) -> None:
    support, query = good_task(tmp_path)
    icfil = run_purer(adapt_project, "adapt", str(support), str(query), "--icfil", "--quiet")
    check_one_error_line(icfil, "ICFIL", "--model meta-model")
    missing = run_purer(tmp_path, "adapt", str(support), str(query))  # no models/teachers here
    check_one_error_line(missing, "models/teachers", "pool.json", "--model <folder>")
    pool = run_purer(tmp_path, "adapt", str(support), str(query), "--model", str(adapt_project / "models" / "teachers"),
                     "--out", str(tmp_path / "p.csv"), "--quiet")  # a pool named by its folder
    assert pool.returncode == 0 and json.loads(pool.stdout)["model"] == "teachers-ensemble", pool.stderr
    assert not (adapt_project / "predictions.csv").exists()


def test_the_ensemble_refuses_a_pool_of_two_normalisations_in_one_line(adapt_project: Path, tmp_path: Path) -> None:
    support, query = good_task(tmp_path)
    pool = tmp_path / "pool"
    shutil.copytree(adapt_project / "models" / "teachers", pool)
    doc = json.loads((pool / "pool.json").read_text())
    doc["teachers"][0]["mean"] = [0.4, 0.4, 0.4]  # one teacher normalised otherwise: one task cannot feed both
    (pool / "pool.json").write_text(json.dumps(doc))
    out = run_purer(tmp_path, "adapt", str(support), str(query), "--model", str(pool), "--out", str(tmp_path / "p.csv"))
    check_one_error_line(out, "2 different image sizes or normalisations", "--model meta-model")
    assert not (tmp_path / "p.csv").exists()


def test_a_flat_query_in_small_batches_gets_one_row_per_image(adapt_project: Path, tmp_path: Path) -> None:
    params = adapt_params(episode_test=1)
    test, tasks = metatest.fixed_test_tasks(params, Project(adapt_project))
    support, query = lay_out_task(test, tasks[0], tmp_path / "task")
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in query.rglob("*.png"):
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    (flat / "notes.txt").write_text("not an image: skipped")
    out = run_purer(adapt_project, "adapt", str(support), str(flat), "--batch-size", "8", "--out",
                    str(tmp_path / "p.csv"))
    assert out.returncode == 0, out.stderr
    assert "queries" in out.stderr and "img/s" in out.stderr  # the progress bar (no --quiet)
    rows = read_rows(tmp_path / "p.csv")
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in flat.glob("*.png"))
    assert "accuracy" not in json.loads(out.stdout) and "label" not in rows[0]
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    assert probs.shape == (5 * QUERY, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def image(path: Path, mode: str = "RGB", size: int = 20, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).convert(mode).save(path)
    return path


def good_task(folder: Path, classes: int = 3) -> tuple[Path, Path]:
    for c in range(classes):
        image(folder / "support" / f"c{c}" / "a.png", value=40 + 60 * c)  # one image per class, each its own
        image(folder / "query" / f"q{c}.jpg", size=40)
    return folder / "support", folder / "query"


def break_card(card: Path, change: dict) -> None:
    data = json.loads(card.read_text())
    data.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del data[key]
    card.write_text(json.dumps(data))


BAD = {
    "empty class folder": (lambda s, q, m: (s / "c3").mkdir(), ["c3", "holds no image"]),
    "single class": (lambda s, q, m: [shutil.rmtree(s / c) for c in ("c1", "c2")], ["1 class folder", "at least 2"]),
    "more ways than the head": (lambda s, q, m: [image(s / f"x{i}" / "a.png") for i in range(3)],
                                ["6 classes", "head has 5 outputs"]),
    "unreadable image": (lambda s, q, m: (q / "q1.jpg").write_bytes(b"not a jpeg"), ["q1.jpg", "cannot be read"]),
    "grey mixed with colour": (lambda s, q, m: image(q / "q1.jpg", mode="L"), ["grey", "colour", "q1.jpg"]),
    "over the pixel bound": (lambda s, q, m: Image.new("1", (8000, 8000)).save(q / "big.png"),
                             ["big.png", "8000x8000", "megapixels", "downscale"]),
    "a decompression bomb": (lambda s, q, m: Image.new("1", (20000, 20000)).save(s / "c0" / "bomb.png"),
                             ["bomb.png", "million pixels", "downscale"]),
    "card not matching the weights": (lambda s, q, m: break_card(m / "best.json", {"backbone": "resnet10"}),
                                      ["resnet10", "weights are conv4"]),
    "card without test-time settings": (lambda s, q, m: break_card(m / "best.json", {"adaptation": None}),
                                        ["no test-time adaptation", "purer metatrain"]),
    "one image in two support classes": (lambda s, q, m: shutil.copy(s / "c0" / "a.png", s / "c1" / "b.png"),
                                         ["same image", "c0 (c0/a.png)", "c1 (c1/b.png)", "one class only"]),
    "card image size 100000": (lambda s, q, m: break_card(m / "best.json", {"image_size": 100000}),
                               ["best.json", "'image_size' is 100000", "from 4 to 512"]),
    "card std of zeros": (lambda s, q, m: break_card(m / "best.json", {"std": [0, 0, 0]}),
                          ["best.json", "'std'", "above 0.0"]),
    "card inner_lr NaN": (lambda s, q, m: break_card(m / "best.json", {"adaptation": {
        **json.loads((m / "best.json").read_text())["adaptation"], "inner_lr": float("nan")}}),
        ["'adaptation.inner_lr' is nan", "finite"]),
    "card way as text": (lambda s, q, m: break_card(m / "best.json", {"way": "five"}), ["'way' is 'five'"]),
    "card unknown meta-learner": (lambda s, q, m: break_card(m / "best.json", {"meta_learner": "reptile"}),
                                  ["'meta_learner' is 'reptile'", "maml"]),
    "weights overwritten with NaN": (lambda s, q, m: nan_weights(m / "best.safetensors"),
                                     ["best.safetensors", "does not match the SHA-256", "dvc checkout"]),
    "NaN weights, a card without its hash": (
        lambda s, q, m: (nan_weights(m / "best.safetensors"), break_card(m / "best.json", {"sha256": None})),
        ["best.safetensors", "NaN or Inf", "dvc checkout"]),
    "card hash edited": (lambda s, q, m: break_card(m / "best.json", {"sha256": "0" * 63}), ["'sha256'", "64 hex"]),
}


def nan_weights(path: Path) -> None:
    """The weights file of the same size and header with every float NaN (a corrupt cache object)."""
    from safetensors.torch import load_file, save_file

    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(adapt_project: Path, tmp_path: Path, case: str) -> None:
    support, query = good_task(tmp_path)
    models = tmp_path / "models"
    shutil.copytree(Project(adapt_project).meta.folder, models, ignore=shutil.ignore_patterns("history", "last*"))
    spoil, words = BAD[case]
    spoil(support, query, models)
    out_file = tmp_path / "p.csv"
    proc = run_purer(adapt_project, "adapt", str(support), str(query), "--model", str(models / "best"), "--out",
                     str(out_file), "--quiet")
    check_one_error_line(proc, *words)
    assert not out_file.exists()
