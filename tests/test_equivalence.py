"""The plain path stays the yardstick: the production path computes the same mathematics.

For MAML, ANIL and ProtoNet, with a homogeneous pool (conv4 teachers, folded on the fast path;
meta-model initialised as their average) and a mixed one (conv4 at 32 px and resnet10 at
16 px, run as a module), two trainers built from the same seed, one as production builds it
(``fast``) and one turned into the yardstick (``plain``: :mod:`purer_mlops.meta.plain_reference`),
are compared **in float64**, where every equality that holds in mathematics holds to rounding
(≤ 1e-8 relative):

- the inversion terms and the bank gradient;
- the meta loss and the meta-model gradient on the same pseudo tasks;
- the adversarial term and its bank gradient (through the inner loop);
- one full ``step()`` with the curriculum switch on and off (then both Adam updates): the
  training-curve row, the bank and the meta-model.

Why not float32: the teachers and the meta-model are piecewise linear (ReLU, max-pool), so a
rounding difference between two kernel orders can flip a unit across a kink and move a
gradient entry by O(1), and Adam's normalisation turns any such entry into a full step.
Which units flip depends on the convolution kernels the CPU's oneDNN picks, so a float32
tolerance that holds on one CPU family fails on another. In float32 only the *values* of the
losses are compared (continuous functions of the inputs, not amplified): within 1e-4
relative, against rounding of order 1e-6 for sums of ~1e4 float32 products (folding the
BatchNorm into the convolution and the one-pass variance add rounding of the same order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LEARNER_NAMES, random_pool, small_glyphs, tiny_params

from purer_mlops.meta.inversion import TERMS
from purer_mlops.meta.plain_reference import PlainInversionLoss, plain_trainer
from purer_mlops.meta.tasks import sample_pseudo_tasks
from purer_mlops.meta.trainer import MetaTrainer
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

FP32_RTOL = 1e-4
FP64_RTOL = 1e-8
POOLS = {
    "homogeneous": [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9))],
    "mixed": [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9)),
              ("resnet10", 16, (0, 2, 4, 6, 8)), ("resnet10", 16, (1, 3, 5, 7, 9))],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> dict[str, Path]:
    out = {}
    for name, specs in POOLS.items():
        root = tmp_path_factory.mktemp(name)
        small_glyphs(tiny_glyphs, root)
        random_pool(root / "models" / "teachers", specs)
        out[name] = root
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def as_float64(trainer: MetaTrainer) -> MetaTrainer:
    """The same trainer computing in float64 (parameters converted in place, optimisers unchanged)."""
    trainer.model.double()
    trainer.bank.double()
    trainer.good_bank = trainer.good_bank.double()
    trainer.inversion.to(trainer.device, torch.float64)
    return trainer


def trainers(root: Path, kind: str, pool: str, dtype: torch.dtype) -> dict[str, MetaTrainer]:
    params = tiny_params(meta_learner=kind, average=pool == "homogeneous")
    out = {"fast": build_trainer(params, Project(root)), "plain": plain_trainer(build_trainer(params, Project(root)))}
    assert out["fast"].learner.looped and not out["plain"].learner.looped
    assert isinstance(out["plain"].inversion, PlainInversionLoss) and not isinstance(out["fast"].inversion,
                                                                                     PlainInversionLoss)
    return {name: as_float64(t) if dtype == torch.float64 else t for name, t in out.items()}


def inversion(t: MetaTrainer) -> tuple[dict[str, float], torch.Tensor]:
    terms = t.inversion(t.bank.images, (1, -2), None)
    (g,) = torch.autograd.grad(terms["loss"], [t.bank.images])
    return {k: float(v.detach()) for k, v in terms.items()}, g


def meta_gradient(t: MetaTrainer, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    p = t.params
    tasks = sample_pseudo_tasks(t.bank.images.detach(), p.episode_batch, p.way_train, p.num_sup_train,
                                p.num_qur_train, torch.Generator().manual_seed(seed))
    weights = t.weights()
    losses, _ = t.learner.batch_loss(weights, tasks, batched=False)
    grads = torch.autograd.grad(losses.sum(), list(weights.values()), allow_unused=True, materialize_grads=True)
    return losses.detach(), flat(grads)


def adversarial(t: MetaTrainer) -> tuple[float, torch.Tensor]:
    """The adversarial term −adv_scale·L_outer on a pseudo task of the live bank, and its bank gradient."""
    outer, _ = t.learner.task_loss(t.weights(), *t._adversarial_task().task(0), t.params.way_train)
    loss = -t.params.adv_scale * outer
    (g,) = torch.autograd.grad(loss, [t.bank.images])
    return float(loss.detach()), g


@pytest.mark.parametrize("adv", [True, False], ids=["adversarial", "no-adversarial"])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_fast_step_equals_plain_in_float64(roots: dict[str, Path], pool: str, kind: str, adv: bool) -> None:
    ts = trainers(roots[pool], kind, pool, torch.float64)
    new, old = ts["fast"], ts["plain"]
    assert new.bank.images.dtype == torch.float64 and next(new.model.parameters()).dtype == torch.float64
    assert torch.equal(new.bank.images, old.bank.images)

    (terms_new, g_new), (terms_old, g_old) = inversion(new), inversion(old)
    for name in (*TERMS, "loss"):
        assert terms_new[name] == pytest.approx(terms_old[name], rel=FP64_RTOL, abs=1e-12), name
    assert rel(g_new, g_old) < FP64_RTOL, "bank gradient"

    (loss_new, mg_new), (loss_old, mg_old) = meta_gradient(new), meta_gradient(old)
    torch.testing.assert_close(loss_new, loss_old, rtol=FP64_RTOL, atol=0)
    assert rel(mg_new, mg_old) < FP64_RTOL, "meta-gradient"

    if adv:  # the adversarial term alone: its gradient reaches the bank through the inner loop
        (a_new, ga_new), (a_old, ga_old) = adversarial(new), adversarial(old)
        assert a_new == pytest.approx(a_old, rel=FP64_RTOL)
        assert rel(ga_new, ga_old) < FP64_RTOL, "adversarial bank gradient"

    rows = {}
    for name, t in ts.items():  # one full meta-iteration: both Adam updates included
        t.curriculum.pending = adv
        rows[name] = t.step()
    assert rows["fast"]["adversarial"] == rows["plain"]["adversarial"] == int(adv)
    for key, value in rows["plain"].items():
        assert rows["fast"][key] == pytest.approx(value, rel=FP64_RTOL, abs=1e-12), key
    assert rel(new.bank.images.detach(), old.bank.images.detach()) < FP64_RTOL, "bank after the step"
    assert rel(flat(new.model.parameters()), flat(old.model.parameters())) < FP64_RTOL, "model after the step"


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_fast_losses_equal_plain_in_float32(roots: dict[str, Path], pool: str, kind: str) -> None:
    ts = trainers(roots[pool], kind, pool, torch.float32)
    (terms_new, _), (terms_old, _) = inversion(ts["fast"]), inversion(ts["plain"])
    for name in (*TERMS, "loss"):
        assert terms_new[name] == pytest.approx(terms_old[name], rel=FP32_RTOL), name
    loss_new, _ = meta_gradient(ts["fast"])
    loss_old, _ = meta_gradient(ts["plain"])
    torch.testing.assert_close(loss_new, loss_old, rtol=FP32_RTOL, atol=1e-6)
    a_new, a_old = adversarial(ts["fast"])[0], adversarial(ts["plain"])[0]
    assert a_new == pytest.approx(a_old, rel=FP32_RTOL)
