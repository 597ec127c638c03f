"""Embedding distillation (meta/distill.py) and the best-teacher start (meta/start.py).

- The three terms' gradients, in float64, match finite differences (``gradcheck``), and each
  term is zero where it should be (the student is the teacher).
- ``distill.weight: 0`` is the paper's PURER bit for bit, whatever the other distill knobs say.
- With a positive weight the term reaches the meta-model's embedding for MAML, ANIL and
  ProtoNet, and lowers the distillation loss.
- ``distill.start: best_teacher`` loads the teacher that scores best on the meta-val tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import copy_project, tiny_params

from purer_mlops.meta.distill import (
    augment,
    cosine_regression,
    relation_loss,
    similarity,
    soft_label_loss,
)
from purer_mlops.meta.start import teacher_scores
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer


def _z(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_terms_gradients_match_finite_differences_in_float64() -> None:
    z = _z(8, 6, seed=0).requires_grad_()
    targets = [_z(8, 5, seed=1), _z(8, 6, seed=2)]
    projections = [_z(5, 6, seed=3).requires_grad_(), _z(6, 6, seed=4).requires_grad_()]
    labels = torch.arange(4).repeat_interleave(2)
    assert torch.autograd.gradcheck(lambda a, p, q: cosine_regression(a, targets, [p, q]), (z, *projections))
    assert torch.autograd.gradcheck(lambda a: relation_loss(a, targets), (z,))
    assert torch.autograd.gradcheck(lambda a: soft_label_loss(a, targets, labels, 4, 0.5), (z,))


def test_terms_vanish_when_the_student_is_the_teacher_and_not_otherwise() -> None:
    t = _z(8, 6, seed=5)
    labels = torch.arange(4).repeat_interleave(2)
    eye = torch.eye(6, dtype=torch.float64)
    assert cosine_regression(t, [t], [eye]) == pytest.approx(0.0, abs=1e-12)
    assert relation_loss(t, [t, t]) == pytest.approx(0.0, abs=1e-12)
    assert soft_label_loss(t, [t], labels, 4, 0.1) == pytest.approx(0.0, abs=1e-10)
    other = _z(8, 6, seed=6)
    # by hand: the mean of 1 - cos over the batch; the off-diagonal mean square of the difference
    cos = (other * t).sum(1) / (other.norm(dim=1) * t.norm(dim=1))
    assert float(cosine_regression(other, [t], [eye])) == pytest.approx(float((1 - cos).mean()), rel=1e-12)
    diff = similarity(other) - similarity(t)
    assert float(relation_loss(other, [t])) == pytest.approx(float(diff.pow(2).sum() / (8 * 7)), rel=1e-12)
    assert soft_label_loss(other, [t], labels, 4, 0.1) > 1e-3


def test_augment_keeps_shape_and_changes_the_views() -> None:
    params = tiny_params(**{"distill.mix": 0.3})
    x = _z(6, 3, 32, 32, seed=7).float()
    y = augment(x, params.distill, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(x, y)
    plain = tiny_params(**{"distill.shift": 0.0, "distill.noise": 0.0})
    assert torch.equal(augment(x, plain.distill, torch.Generator()), x)


def _steps(params, root: Path, n: int = 3):
    trainer = build_trainer(params, Project(root))
    for _ in range(n):
        trainer.step()
    return trainer


def test_weight_zero_is_purer_bit_for_bit(pool_project: Path, tmp_path: Path) -> None:
    root = copy_project(pool_project, tmp_path / "p")
    base = _steps(tiny_params(), root)
    knobs = {"distill.weight": 0.0, "distill.feature": 3.0, "distill.relation": 1.0, "distill.soft": 1.0,
             "distill.mix": 0.4, "distill.classes": 4}
    off = _steps(tiny_params(**knobs), root)
    assert off.distiller is None
    for (k, a), b in zip(base.model.state_dict().items(), off.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(base.bank.images, off.bank.images)
    assert base.history == off.history
    on = _steps(tiny_params(**{**knobs, "distill.weight": 1.0, "distill.teachers": 1}), root)
    assert not torch.equal(base.model.features.body[0].weight, on.model.features.body[0].weight)


@pytest.mark.parametrize("learner", ["maml", "anil", "protonet"])
def test_distillation_reaches_the_embedding_and_lowers_its_loss(pool_project: Path, tmp_path: Path,
                                                               learner: str) -> None:
    root = copy_project(pool_project, tmp_path / "p")
    knobs = {"meta_learner": learner, "distill.weight": 20.0, "distill.relation": 1.0, "distill.soft": 1.0,
             "distill.shift": 0.0, "distill.noise": 0.0, "episode_train": 40}
    trainer = build_trainer(tiny_params(**knobs), Project(root))
    d = trainer.distiller
    x, labels = d.batch(trainer.bank.images.detach())
    everyone = list(range(len(d.teachers)))

    def loss() -> float:
        with torch.no_grad():
            return float(d.loss(trainer.model.features(x), d.targets(x, everyone), labels, everyone))

    before, weights = loss(), {k: v.detach().clone() for k, v in trainer.weights().items()}
    rows = [trainer.step() for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(r["meta_loss"])) for r in rows)
    assert set(d.last) == {"feature", "relation", "soft"}
    assert loss() < 0.9 * before
    assert not torch.equal(weights["features.body.0.weight"], trainer.weights()["features.body.0.weight"])


def test_best_teacher_start_loads_the_teacher_best_on_meta_val(pool_project: Path, tmp_path: Path) -> None:
    root = copy_project(pool_project, tmp_path / "p")
    trainer = build_trainer(tiny_params(**{"distill.start": "best_teacher"}), Project(root))
    best, scores = trainer.start_teacher
    assert len(scores) == len(trainer.pool.teachers) and scores[best] == max(scores)
    teacher = trainer.pool.state_dicts[best]
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, teacher[key].float())
    # the same scores again, from the model as it is now (it holds the chosen teacher)
    again = teacher_scores(trainer.model, trainer.pool, trainer.val, trainer.val_tasks)
    assert again == pytest.approx(scores)


def test_bn_groups_embed_each_group_with_its_own_statistics(pool_project: Path, tmp_path: Path) -> None:
    root = copy_project(pool_project, tmp_path / "p")
    trainer = build_trainer(tiny_params(**{"distill.weight": 1.0, "distill.bn_group": 2, "distill.classes": 4,
                                           "distill.per_class": 2}), Project(root))
    d, features = trainer.distiller, trainer.model.features
    x, labels = d.batch(trainer.bank.images.detach())  # classes 0,0,1,1,2,2,3,3
    with torch.no_grad():
        z = d.embed(features, x, 4)
        expected = torch.cat([features(x[[0, 2]]), features(x[[4, 6]]), features(x[[1, 3]]), features(x[[5, 7]])])
    torch.testing.assert_close(z, expected[[0, 4, 1, 5, 2, 6, 3, 7]])
    assert not torch.allclose(z, features(x).detach())
