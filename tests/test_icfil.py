"""ICFIL on a tiny conv4 and random 16-px tasks.

- the tasks of a batch run together (vmap) and give each task's own result; a looped learner's
  loop under the fast forward gives the same logits as the vmap of a learner that is not looped;
- with no calibration step ICFIL is plain test-time adaptation; exact copies of the support
  weighted 0 make it extra head steps on the support; noisy copies weighted 1 change it;
- each synthesis term does what docs/icfil.md says: the hardness term lowers (its negative
  raises) the adapted model's probability of the pseudo images' class, the diversity term
  lowers their within-class similarity, the BatchNorm prior brings their statistics to the
  support's;
- the calibration scopes name the right weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import HEAD_LEARNERS, LEARNER_NAMES

from purer_mlops.config import Params
from purer_mlops.meta.icfil import ICFIL, calibrated_keys
from purer_mlops.meta.icfil_synthesis import Synthesis, initial_images
from purer_mlops.meta.tasks import TaskBatch, task_labels
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.learners import build_learner

WAY, SHOT, QUERY, SIZE = 3, 2, 2, 16


def tasks(n: int, seed: int = 0) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, WAY * SHOT, 3, SIZE, SIZE, generator=gen)
    xq = torch.randn(n, WAY * QUERY, 3, SIZE, SIZE, generator=gen)
    return TaskBatch(xs, task_labels(n, WAY, SHOT, "cpu"), xq, task_labels(n, WAY, QUERY, "cpu"), WAY)


def setup(kind: str = "maml", **calibration):
    torch.manual_seed(0)
    model = build_backbone("conv4", WAY, SIZE, track_running_stats=False)
    learner = build_learner(kind, model, 2, 0.1)
    cfg = dataclasses.replace(Params().calibration, **{"inversion_steps": 2, "images_per_class": 2, **calibration})
    weights = {k: v.detach() for k, v in model.named_parameters()}
    return learner, ICFIL(learner, cfg, Params().inversion, seed=1), weights


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_a_batch_of_tasks_gives_each_task_its_own_result(kind: str) -> None:
    _, icfil, w = setup(kind, hard_weight=1.0, diversity_weight=0.5, bn_weight=0.1, calibrate="last")
    batch = tasks(3)
    together = icfil.batch(w, batch)
    assert together.shape == (3, WAY * QUERY, WAY) and torch.isfinite(together).all()
    # The single-task entry point starts task 0 from the batch's first noise draw.
    alone = icfil(w, *batch.task(0)[:3], WAY)
    assert torch.allclose(together[0], alone, atol=1e-4)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_looped_learner_equals_vmap(kind: str) -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", WAY, SIZE, track_running_stats=False).double()
    cfg = dataclasses.replace(Params().calibration, inversion_steps=2, images_per_class=2, calibrate="last")
    weights = {k: v.detach() for k, v in model.named_parameters()}
    batch = tasks(3).to(torch.float64)
    icfils = {looped: ICFIL(build_learner(kind, model, 2, 0.1, looped=looped), cfg, Params().inversion, seed=1)
              for looped in (False, True)}
    out = {looped: icfil.batch(weights, batch) for looped, icfil in icfils.items()}
    torch.testing.assert_close(out[True], out[False], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out[True][0], out[True][1])


@pytest.mark.parametrize("kind", HEAD_LEARNERS)
def test_without_calibration_steps_icfil_is_plain_adaptation(kind: str) -> None:
    learner, icfil, w = setup(kind, calibration_steps=0)
    xs, ys, xq, _ = tasks(1).task(0)
    with torch.no_grad():
        plain = learner.query_logits(w, xs, ys, xq, WAY)
    assert torch.allclose(icfil(w, xs, ys, xq, WAY), plain, atol=1e-5)


def test_exact_support_copies_weighted_zero_are_extra_head_steps_on_the_support() -> None:
    """Copies of the support leave BatchNorm's batch statistics as they are: only CE(S) acts."""
    learner, icfil, w = setup(init_noise=0.0, inversion_steps=0, pseudo_weight=0.0, calibrate="head",
                              calibration_steps=3, calibration_lr=0.5)
    xs, ys, xq, _ = tasks(1).task(0)
    adapted = learner.adapt(w, xs, ys)
    z = learner.embed(adapted, xs).detach()
    weight, bias = adapted["head.weight"].detach(), adapted["head.bias"].detach()
    for _ in range(3):
        weight, bias = weight.requires_grad_(), bias.requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(z, weight, bias), ys), [weight, bias])
        weight, bias = (weight - 0.5 * gw).detach(), (bias - 0.5 * gb).detach()
    head = {"head.weight": weight, "head.bias": bias}
    expected = learner.logits({**adapted, **head}, xq).detach()
    assert torch.allclose(icfil(w, xs, ys, xq, WAY), expected, atol=1e-5)
    _, weighted, _ = setup(init_noise=0.5, inversion_steps=0, pseudo_weight=1.0, calibrate="head",
                           calibration_steps=3, calibration_lr=0.5)
    assert not torch.allclose(weighted(w, xs, ys, xq, WAY), expected, atol=1e-3)


def synthesis_terms(weight: str, value: float, steps: int = 10) -> tuple[dict, dict]:
    """The four terms before and after ``steps`` inversion steps minimising only ``weight``·term."""
    learner = build_learner("maml", build_backbone("conv4", WAY, SIZE, track_running_stats=False), 2, 0.1)
    zero = {"hard_weight": 0.0, "feature_weight": 0.0, "diversity_weight": 0.0, "bn_weight": 0.0}
    cfg = dataclasses.replace(Params().calibration, images_per_class=3, inversion_steps=steps,
                              inversion_lr=0.05, **{**zero, weight: value})
    priors = dataclasses.replace(Params().inversion, tv=0.0, l2=0.0)
    synth = Synthesis(learner, cfg, priors)
    w = {k: v.detach() for k, v in learner.model.named_parameters()}
    xs, ys, _, _ = tasks(1, seed=3).task(0)
    adapted = learner.adapt(w, xs, ys)
    noise = 0.5 * torch.randn(WAY * 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    start = initial_images(xs, WAY, noise)
    end = synth.run(w, adapted, xs, ys, noise, WAY)
    return synth.terms(start, w, adapted, xs, ys, WAY), synth.terms(end, w, adapted, xs, ys, WAY)


@pytest.mark.parametrize(("weight", "value", "term", "direction"), [
    ("hard_weight", 1.0, "hard", -1), ("hard_weight", -1.0, "hard", 1), ("diversity_weight", 1.0, "diversity", -1),
    ("bn_weight", 1.0, "bn", -1), ("feature_weight", 1.0, "feature", -1)])
def test_each_synthesis_term_moves_the_pseudo_images_its_way(weight: str, value: float, term: str,
                                                             direction: int) -> None:
    before, after = synthesis_terms(weight, value)
    assert direction * (after[term] - before[term]) > 0, (term, before[term], after[term])


def test_pseudo_images_start_from_their_class_support_images() -> None:
    xs, ys, _, _ = tasks(1).task(0)
    start = initial_images(xs, WAY, torch.zeros(WAY * 3, 3, SIZE, SIZE))
    # image i of class c is support image i mod SHOT of class c
    assert torch.equal(start[0], xs[0]) and torch.equal(start[1], xs[1]) and torch.equal(start[2], xs[0])
    assert torch.equal(start[3], xs[2]) and torch.equal(start[8], xs[4])


def test_calibration_scopes_name_the_right_weights() -> None:
    w = dict(build_backbone("conv4", WAY, SIZE, track_running_stats=False).named_parameters())
    assert calibrated_keys(w, "head") == ["head.weight", "head.bias"]
    assert calibrated_keys(w, "all") == list(w)
    last = calibrated_keys(w, "last")
    assert last[0] == "features.body.12.weight" and "features.body.13.weight" in last
    assert "features.body.8.weight" not in last and last[-2:] == ["head.weight", "head.bias"]
