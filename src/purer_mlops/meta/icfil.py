"""ICFIL: inversion calibration following the inner loop (test time only).

The paper adds, after the inner loop, a step that narrows the gap between the pseudo tasks
of meta-training and the real task at hand by inversion, and calibrates the adapted model
and its head. No public code implements it; this is our formulation (docs/icfil.md):

1. Adapt: θ' = inner loop of θ on the support S.
2. Synthesise pseudo images X̂ for the task's classes (:mod:`.icfil_synthesis`): noisy
   copies of the support moved to be hard for θ', faithful to the class in the embedding of
   θ (before adaptation), diverse, and with the support's BatchNorm statistics.
3. Calibrate: ``calibration_steps`` SGD steps on CE(S) + w · CE(X̂) over the head, the last
   block too, or every weight (``calibrate``); ProtoNet re-estimates each prototype as the
   weighted mean of support and pseudo embeddings.
4. Predict the query with the calibrated model.

The tasks of a batch run together under ``vmap``, or in a loop under the fast forward
(:meth:`ICFIL.batch`); ``ICFIL(...)(weights, xs, ys, xq, way)`` is the same for one task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ..config import CalibrationParams, InversionParams
from ..models.backbones import fast_forward
from ..models.learners import MetaLearner, Weights, prototype_logits
from .icfil_synthesis import Synthesis, class_means, pseudo_labels
from .tasks import TaskBatch


def calibrated_keys(weights: Weights, scope: str) -> list[str]:
    """Names of the weights ``scope`` calibrates: ``head``, ``last`` (head + last block) or ``all``."""
    names = list(weights)
    if scope == "all":
        return names
    head = [k for k in names if k.startswith("head.")]
    if scope == "head":
        return head
    # The last block starts at the last convolution (4-d weight) of the feature extractor.
    convs = [i for i, k in enumerate(names) if k.startswith("features.") and weights[k].dim() == 4]
    return [k for k in names[convs[-1]:] if not k.startswith("head.")] + head if convs else head


class ICFIL:
    """Calibrated query logits after the inner loop, for one task or a batch of tasks.

    Args:
        learner: the meta-learner (its ``adapt`` is the inner loop).
        cfg: the ``calibration`` knobs; priors: ``inversion.tv`` and ``inversion.l2`` are reused.
        seed: seeds the noise that starts the pseudo images (ICFIL is deterministic).
    """

    def __init__(self, learner: MetaLearner, cfg: CalibrationParams, priors: InversionParams, seed: int):
        self.learner = learner
        self.cfg = cfg
        self.synthesis = Synthesis(learner, cfg, priors)
        self.seed = seed

    def noise(self, tasks: int, way: int, like: torch.Tensor) -> torch.Tensor:
        """Seeded starting noise (tasks, way·m, 3, S, S) for support images like (…, 3, S, S)."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (tasks, way * self.cfg.images_per_class, *like.shape[-3:])
        return (self.cfg.init_noise * torch.randn(shape, generator=gen)).to(like)

    def pseudo_targets(self, xs: torch.Tensor, x_hat: torch.Tensor, way: int) -> torch.Tensor:
        """Class probabilities (way·m, way) the calibration fits the pseudo images to: their class.

        (scripts/icfil_teachers.py replaces them with the teachers' soft labels.)
        """
        return F.one_hot(pseudo_labels(way, len(x_hat) // way, xs.device), way).to(xs)

    def calibrate(self, adapted: Weights, xs: torch.Tensor, ys: torch.Tensor, x_hat: torch.Tensor,
                  way: int) -> Weights:
        """θ' after ``calibration_steps`` SGD steps on CE(S) + w·CE(X̂) over the ``calibrate`` scope."""
        cfg, learner, n = self.cfg, self.learner, len(xs)
        target = torch.cat([F.one_hot(ys, way).to(xs), self.pseudo_targets(xs, x_hat, way)])
        weight = torch.cat([torch.ones(n), torch.full((len(x_hat),), cfg.pseudo_weight)]).to(xs) / n
        keys = calibrated_keys(adapted, cfg.calibrate)

        def ce(logits: torch.Tensor) -> torch.Tensor:
            return (-(target * logits.log_softmax(1)).sum(1) * weight).sum()

        if cfg.calibrate == "head":  # the embeddings do not move: compute them once
            z = learner.embed(adapted, torch.cat([xs, x_hat]))

            def loss(inner: Weights) -> torch.Tensor:
                return ce(F.linear(z, inner["head.weight"], inner["head.bias"]))
        else:
            def loss(inner: Weights) -> torch.Tensor:
                return ce(learner.logits({**adapted, **inner}, torch.cat([xs, x_hat])))

        inner = {k: adapted[k] for k in keys}
        for _ in range(cfg.calibration_steps):
            g = grad(loss)(inner)
            inner = {k: inner[k] - cfg.calibration_lr * g[k] for k in inner}
        return {**adapted, **inner}

    def task(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
             noise: torch.Tensor, way: int) -> torch.Tensor:
        """Calibrated query logits (Q, way) of one task; noise (way·m, 3, S, S) starts its pseudo images."""
        learner = self.learner
        adapted = learner.adapt(weights, xs, ys)
        x_hat = self.synthesis.run(weights, adapted, xs, ys, noise, way)
        if learner.metric_based:
            z = learner.embed(adapted, torch.cat([xs, x_hat]))
            shot, m, w = len(xs) // way, len(x_hat) // way, self.cfg.pseudo_weight
            protos = (class_means(z[:len(xs)], way) * shot + class_means(z[len(xs):], way) * w * m) / (shot + w * m)
            return prototype_logits(learner.embed(adapted, xq), protos)
        return learner.logits(self.calibrate(adapted, xs, ys, x_hat, way), xq)

    def batch(self, weights: Weights, tasks: TaskBatch) -> torch.Tensor:
        """Calibrated query logits (T, Q, way) of the T tasks of ``tasks``.

        A looped learner runs them one after another under the fast forward (which ``vmap``
        cannot run; looped it is the faster, as for plain test-time adaptation), any other
        together under ``vmap``.
        """
        weights = {k: v.detach() for k, v in weights.items()}
        noise = self.noise(len(tasks), tasks.way, tasks.xs)

        def one(xs, ys, xq, eps):
            return self.task(weights, xs, ys, xq, eps, tasks.way)

        with torch.no_grad():  # torch.func.grad inside still differentiates; nothing else builds a graph
            if not self.learner.looped:
                return vmap(one, randomness="same")(tasks.xs, tasks.ys, tasks.xq, noise)
            with fast_forward():
                return torch.stack([one(*tasks.task(t)[:3], noise[t]) for t in range(len(tasks))])

    def __call__(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                 way: int) -> torch.Tensor:
        """Calibrated query logits (Q, way) of one task: support xs (S, 3, H, W), ys (S,), query xq."""
        tasks = TaskBatch(xs[None], ys[None], xq[None], ys.new_zeros((1, len(xq))), way)
        return self.batch(weights, tasks)[0]
