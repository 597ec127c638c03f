"""Meta-training end to end on a tiny CPU project with a real (pretrained) teacher pool.

- ``run()`` writes the selected meta-model, ``last.pt``, the metrics, one training-curve row
  per meta-iteration and the bank image grid.
- A run killed mid-way (SIGKILL, as a crash would) and resumed ends with a meta-model and a
  bank identical to an uninterrupted run with the same seed.
- A checkpoint written under other parameters (another fingerprint) is not resumed.
- ``average: true`` with a mixed-architecture pool is a user error; with a homogeneous pool
  the meta-model starts as the teachers' average.

The helpers :func:`small_glyphs`, :func:`random_pool` and :func:`tiny_params` are shared
with ``test_curriculum.py`` and ``test_equivalence.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_project, random_pool, tiny_params, tiny_raw, tool_env, write_yaml

from purer_mlops.config import from_dict
from purer_mlops.errors import UserError
from purer_mlops.meta.checkpoint import fingerprint, load_model
from purer_mlops.meta.pool import init_meta_model, load_teachers
from purer_mlops.paths import Project
from purer_mlops.stages import metatrain as train
from purer_mlops.stages.metatrain import build_trainer

ENV = tool_env()


# --------------------------------------------------------------------------- tests


def test_run_writes_model_checkpoint_metrics_curve_and_bank(pool_project: Path, tmp_path: Path) -> None:
    root = copy_project(pool_project, tmp_path / "p")
    params = tiny_params()
    metrics = train.run(params, Project(root), progress=False)
    meta, res = root / "models" / "meta", root / "results" / "metatrain"
    for path in (meta / "best.safetensors", meta / "best.json", meta / "last.pt", res / "metrics.json",
                 res / "bank.png"):
        assert path.is_file(), path
    assert list((res / "bank").glob("iter_*.png"))
    saved = yaml.safe_load((res / "details.json").read_text())  # JSON is YAML
    assert saved == metrics
    headline = yaml.safe_load((res / "metrics.json").read_text())  # what `dvc exp show` shows
    assert headline == {"val_best": round(metrics["best_val_accuracy"], 2),
                        "val_final": round(metrics["final_val_accuracy"], 2)}
    for key in ("init_val_accuracy", "best_val_accuracy", "best_iteration", "iterations", "adversarial_updates"):
        assert key in metrics, key
    assert metrics["iterations"] == params.meta_iterations == 6
    assert metrics["resumed_from"] == 0
    vals = [line.split(",") for line in (res / "val.csv").read_text().strip().splitlines()[1:]]
    best_row = max(vals, key=lambda r: float(r[1]))  # the first of equals, as the run keeps it
    assert metrics["best_val_accuracy"] == pytest.approx(float(best_row[1]), abs=1e-4)
    assert metrics["best_iteration"] == int(best_row[0])
    lines = (res / "train.csv").read_text().strip().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), r.split(","), strict=True)) for r in lines[1:]]
    assert header[0] == "iteration" and len(rows) == 6
    assert [int(r["iteration"]) for r in rows] == list(range(6))
    adversarial = [int(r["adversarial"]) for r in rows]
    assert adversarial[2] == 1 and adversarial[:2] == [0, 0]  # adv_start = 2
    assert sum(adversarial) == metrics["adversarial_updates"]
    state = torch.load(meta / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 6 and state["bank"].shape == (10, 3, 3, 32, 32)
    model, card = load_model(meta / "best")
    assert card["iteration"] == metrics["best_iteration"] and card["backbone"] == "conv4"


def _last_iteration(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])
    except Exception:  # not there yet
        return None


def test_killed_run_resumes_to_the_same_model_and_bank(pool_project: Path, tmp_path: Path) -> None:
    raw = tiny_raw(episode_train=32, **{"metatrain.checkpoint_interval": 2, "metatrain.val_interval": 8,
                                        "metatrain.image_interval": 16})
    total = from_dict(raw).meta_iterations  # 16
    roots = {}
    for name in ("killed", "whole"):
        roots[name] = copy_project(pool_project, tmp_path / name)
        write_yaml(roots[name], raw)
    cmd = [sys.executable, "-m", "purer_mlops", "metatrain", "--quiet", "--root"]

    def start(root: Path) -> subprocess.Popen:
        return subprocess.Popen([*cmd, str(root)], cwd=root, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    whole = start(roots["whole"])  # the uninterrupted run, alongside
    victim = start(roots["killed"])
    last = roots["killed"] / "models" / "meta" / "last.pt"
    killed_at, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        it = _last_iteration(last) if last.is_file() else None
        if it is not None and it < total:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            killed_at = it
            break
        time.sleep(0.05)
    if killed_at is None:
        whole.kill()
        pytest.fail(f"the run ended (rc={victim.poll()}) before a mid-run checkpoint could be killed; "
                    f"raise episode_train. stderr: {victim.stderr.read()[-2000:] if victim.stderr else ''}")
    assert victim.returncode == -signal.SIGKILL
    left = _last_iteration(last)
    assert left is not None and killed_at <= left < total  # killed mid-run, checkpoint intact

    resumed = subprocess.run([*cmd, str(roots["killed"])], cwd=roots["killed"], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]

    metrics = yaml.safe_load((roots["killed"] / "results" / "metatrain" / "details.json").read_text())
    assert metrics["resumed_from"] == left and metrics["iterations"] == total
    a, b = (torch.load(roots[n] / "models" / "meta" / "last.pt", map_location="cpu", weights_only=True)
            for n in ("killed", "whole"))
    assert a["iteration"] == b["iteration"] == total
    assert torch.equal(a["bank"], b["bank"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"] and a["curriculum"] == b["curriculum"]


def test_checkpoint_with_another_fingerprint_is_not_resumed(pool_project: Path, tmp_path: Path) -> None:
    old = tiny_params()
    root = copy_project(pool_project, tmp_path / "p")
    trainer = build_trainer(old, Project(root))
    for _ in range(2):
        trainer.step()
    state = {"fingerprint": fingerprint(old, Project(root).teachers, False), **trainer.state_dict()}
    last = root / "models" / "meta" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(state, last)
    saved = last.read_bytes()

    other = old.replace(adv_scale=old.adv_scale + 1.0)
    assert train.run(other, Project(root), progress=False)["resumed_from"] == 0
    # control: the same checkpoint under its own parameters is resumed
    last.write_bytes(saved)
    assert train.run(old, Project(root), progress=False)["resumed_from"] == 2


def test_average_needs_a_homogeneous_pool(tmp_path: Path) -> None:
    params = tiny_params(average=True)
    mixed = tmp_path / "mixed"
    random_pool(mixed, [("conv4", 32, (0, 1, 2, 3, 4)), ("resnet10", 16, (5, 6, 7, 8, 9))])
    with pytest.raises(UserError, match="average"):
        init_meta_model(params, load_teachers(mixed), 32)
    # a homogeneous pool averages
    same = tmp_path / "same"
    random_pool(same, [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9))])
    pool = load_teachers(same)
    model = init_meta_model(params, pool, 32)
    state = model.state_dict()
    for key in ("head.weight", "features.body.1.weight", "features.body.0.weight"):
        expected = (pool.state_dicts[0][key] + pool.state_dicts[1][key]) / 2
        torch.testing.assert_close(state[key], expected)


def test_fingerprint_ignores_what_training_does_not_read(pool_project: Path) -> None:
    pool = pool_project / "models" / "teachers"
    base = fingerprint(tiny_params(), pool, False)
    test_time_only = tiny_params(**{"compare.shots": [1], "episode_test": 3, "icfil": True})
    assert fingerprint(test_time_only, pool, False) == base
    assert fingerprint(tiny_params(adv_scale=0.5), pool, False) != base
    assert fingerprint(tiny_params(), pool, True) != base
