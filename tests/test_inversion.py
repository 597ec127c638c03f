"""The inversion loss is DeepInversion's, per teacher, with every teacher weighted once.

- The BatchNorm term vanishes when the running statistics are those of the teacher's own
  slice of the bank (and is clearly non-zero otherwise).
- A teacher's loss reaches only the bank rows of its classes.
- The loss over several teachers is the sum of each alone (the reference weighted teacher i
  N − i times).
- ``total_variation`` and ``jitter`` match hand computations.
- A heterogeneous pool (conv4 at 32 and 16 px with another normalisation, resnet10 at 16 px)
  gives the same terms and bank gradient as :class:`InversionLoss` (eager, and with
  ``torch.compile``) and as the plain loop of :mod:`purer_mlops.meta.plain_reference`.
"""

from __future__ import annotations

import pytest
import torch

from purer_mlops.config import InversionParams
from purer_mlops.data.registry import DatasetInfo
from purer_mlops.meta.fused import compiled_folded_conv4
from purer_mlops.meta.inversion import TERMS, InversionLoss, Teacher, jitter
from purer_mlops.meta.plain_reference import PlainInversionLoss
from purer_mlops.models.backbones import batchnorm_layers, build_backbone, capture_bn_inputs
from purer_mlops.models.kernels import total_variation

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def teacher(classes: list[int], arch: str = "conv4", size: int = 16, seed: int = 0,
            mean=MEAN, std=STD, warm: bool = True) -> Teacher:
    """A random teacher; ``warm`` runs a few train-mode passes so its running statistics are not 0/1."""
    torch.manual_seed(seed)
    model = build_backbone(arch, len(classes), size)
    if warm:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, size, size) * 1.5 + 0.3)
    return Teacher(model.eval(), torch.tensor(classes), arch, size, tuple(mean), tuple(std))


def bank(classes: int, per_class: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes, per_class, 3, size, size, generator=g).requires_grad_()


def loss_fn(teachers, size: int = 16, fast: bool = True, a_bn: float = 0.01, compiled: bool = False
            ) -> InversionLoss:
    space = DatasetInfo("bank", image_size=size, mean=MEAN, std=STD, raw=())
    kind = InversionLoss if fast else PlainInversionLoss
    return kind(teachers, space, InversionParams(bn=a_bn, tv=1e-4, l2=1e-5), compiled=compiled)


def values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items()}


def match_running_stats(t: Teacher, x: torch.Tensor) -> None:
    """Set every BN layer's running statistics to the batch statistics of its input on x.

    In train mode each layer normalises with exactly these statistics, so the eval-mode
    forward pass with them sees the same inputs at every layer.
    """
    t.model.train()
    with torch.no_grad(), capture_bn_inputs(t.model) as feats:
        t.model(x)
    for bn, f in zip(batchnorm_layers(t.model), feats, strict=True):
        bn.running_mean.copy_(f.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(f.var(dim=(0, 2, 3), unbiased=False))
    t.model.eval()


@pytest.mark.parametrize("fast", [True, False])
def test_bn_term_is_zero_when_running_stats_are_the_slice_statistics(fast: bool) -> None:
    images = bank(4, 3)
    teachers = [teacher([0, 2], seed=0), teacher([1, 3], seed=1)]
    before = values(loss_fn(teachers, fast=fast)(images, (0, 0)))["bn"]
    assert before > 1.0  # the warm-up statistics are far from the bank's
    for t in teachers:  # each teacher from its own slice, in its label order
        match_running_stats(t, images.detach()[t.classes].flatten(0, 1))
    after = values(loss_fn(teachers, fast=fast)(images, (0, 0)))["bn"]
    assert after < 1e-4 * before, (after, before)
    # statistics of the whole bank are not those of a teacher's slice
    whole = teacher([0, 2], seed=0)
    match_running_stats(whole, images.detach().flatten(0, 1))
    assert values(loss_fn([whole], fast=fast)(images, (0, 0)))["bn"] > 1e-2


@pytest.mark.parametrize("fast", [True, False])
def test_bank_gradient_of_one_teacher_reaches_only_its_classes(fast: bool) -> None:
    images = bank(4, 3)
    inv = loss_fn([teacher([0, 2], seed=0), teacher([1, 3], seed=1)], fast=fast)
    out = inv(images, (1, -2), chosen=torch.tensor([0]))
    (g,) = torch.autograd.grad(out["loss"], [images])
    per_image = g.abs().flatten(2).sum(-1)  # (classes, per_class)
    assert torch.all(per_image[[1, 3]] == 0)
    assert torch.all(per_image[[0, 2]] > 0)


@pytest.mark.parametrize("fast", [True, False])
def test_every_teacher_is_weighted_once(fast: bool) -> None:
    images = bank(6, 2)
    inv = loss_fn([teacher([0, 1], seed=0), teacher([2, 3], seed=1), teacher([4, 5], seed=2)], fast=fast)
    alone = [values(inv(images, (1, 1), chosen=torch.tensor([i]))) for i in range(3)]
    together = values(inv(images, (1, 1), chosen=torch.tensor([0, 1, 2])))
    everyone = values(inv(images, (1, 1)))
    for name in (*TERMS, "loss"):
        expected = sum(a[name] for a in alone)
        assert together[name] == pytest.approx(expected, rel=1e-5), name
        assert everyone[name] == pytest.approx(expected, rel=1e-5), name
    weighted = sum(inv.weights[n] * together[n] for n in TERMS)
    assert together["loss"] == pytest.approx(weighted, rel=1e-6)
    # the teachers differ, so a wrong weighting would show: N − i weights give 3·L0 + 2·L1 + L2
    assert len({round(a["ce"], 4) for a in alone}) == 3


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, -1.0]]).view(1, 1, 2, 3)
    right = [1 - 2, 2 - 4, 0 - 3, 3 + 1]  # x[i, j] - x[i, j+1]
    down = [1 - 0, 2 - 3, 4 + 1]  # x[i, j] - x[i+1, j]
    anti = [0 - 2, 3 - 4]  # x[i+1, j] - x[i, j+1]
    diag = [1 - 3, 2 + 1]  # x[i, j] - x[i+1, j+1]
    expected = sum(sum(d * d for d in ds) ** 0.5 for ds in (right, down, anti, diag))
    assert float(total_variation(x)) == pytest.approx(expected, rel=1e-6)
    assert float(total_variation(torch.full((2, 3, 4, 4), 7.0))) == 0.0


def test_jitter_is_a_roll_of_the_whole_batch() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    dx, dy = 2, -1
    y = jitter(x, dx, dy)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            assert torch.equal(y[..., i, j], x[..., (i - dy) % h, (j - dx) % w])
    assert torch.equal(jitter(x, 0, 0), x)
    assert torch.equal(jitter(y, -dx, -dy), x)


@pytest.mark.parametrize("compiled", [False, True], ids=["fast", "fast_compiled"])
def test_heterogeneous_pool_fast_equals_plain(compiled: bool) -> None:
    other_mean, other_std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)

    def pool() -> list[Teacher]:  # same seeds: same teachers for both runs
        return [
            teacher([0, 1], "conv4", 32, seed=0), teacher([2, 3], "conv4", 32, seed=1),
            teacher([1, 4], "conv4", 16, seed=2, mean=other_mean, std=other_std),  # resized, renormalised
            teacher([3, 5], "resnet10", 16, seed=3), teacher([0, 5], "resnet10", 16, seed=4),
        ]

    images = bank(6, 2, size=32)
    results = {}
    for fast in (True, False):
        inv = loss_fn(pool(), size=32, fast=fast, compiled=compiled and fast)
        if fast:  # the conv4 scorers run compiled exactly when asked
            assert (inv.groups[0].scorers[0].forward is compiled_folded_conv4()) == compiled
        assert len(inv.groups) == 3
        out = inv(images, (2, -1))
        (g,) = torch.autograd.grad(out["loss"], [images])
        results[fast] = (values(out), g)
    (t_b, g_b), (t_l, g_l) = results[True], results[False]
    for name in (*TERMS, "loss"):
        assert t_b[name] == pytest.approx(t_l[name], rel=1e-5), name
    assert t_l["bn"] > 0 and t_l["ce"] > 0
    assert float((g_b - g_l).norm() / g_l.norm()) < 1e-5
    assert torch.all(g_l.abs().flatten(2).sum(-1) > 0)  # every class is some teacher's
