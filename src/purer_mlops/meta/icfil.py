"""ICFIL: inversion calibration following the inner loop (test time only).

The paper adds, after the inner loop, a step that narrows the gap between the pseudo tasks
of meta-training and the real task at hand by inversion, and calibrates the linear head.
No public code implements it; this is our formulation (equations in docs/icfil.md):

1. Adapt: θ' = inner loop of θ on the support S = {(x_j, y_j)}.
2. Invert θ': for each class c, ``m`` pseudo images X̂_c start from the class's support
   images plus Gaussian noise and minimise, for ``inversion_steps`` Adam steps,

       L_inv = CE(f_θ'(X̂), ŷ) + Σ_c ||mean φ_θ'(X̂_c) − mean φ_θ'(S_c)||² / D
               + a_tv · TV(X̂) + a_l2 · ||X̂||₂

   (φ = embedding, D its size): task-specific pseudo data the adapted model recognises,
   anchored at the support's class means.
3. Calibrate: MAML/ANIL take ``calibration_steps`` SGD steps on the head (the linear
   classifier) on CE(S) + w · CE(X̂); ProtoNet re-estimates each prototype as the weighted
   mean of support and pseudo embeddings (weight w per pseudo image).
4. Predict the query with the calibrated model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad

from ..config import CalibrationParams, InversionParams
from .inversion import total_variation
from .learners import MetaLearner, ProtoNet, Weights, prototype_logits, prototypes


class ICFIL:
    """Callable ``(params, xs, ys, xq, way) -> query logits (Q, way)`` for one task."""

    def __init__(self, learner: MetaLearner, cfg: CalibrationParams, priors: InversionParams, seed: int):
        self.learner = learner
        self.cfg = cfg
        self.priors = priors
        self.seed = seed

    def invert(self, adapted: Weights, xs: torch.Tensor, ys: torch.Tensor, way: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo images (way·m, 3, S, S) and their labels (way·m,) inverted from the adapted model."""
        m = self.cfg.images_per_class
        learner = self.learner
        with torch.no_grad():
            anchors = torch.stack([learner.embed(adapted, xs)[ys == c].mean(0) for c in range(way)])
            starts = torch.stack([xs[ys == c][torch.arange(m) % int((ys == c).sum())] for c in range(way)])
            x = (starts + 0.5 * torch.randn(starts.shape, generator=gen).to(xs.device)).flatten(0, 1)
        y = torch.arange(way, device=xs.device).repeat_interleave(m)

        def loss(x_hat: torch.Tensor) -> torch.Tensor:
            # Forward support and pseudo images together: the meta-model's BatchNorm uses batch
            # statistics, and a batch that contains real images keeps them realistic.
            z = learner.embed(adapted, torch.cat([xs, x_hat]))[len(xs):]
            logits = F.linear(z, adapted["head.weight"], adapted["head.bias"])
            centre = z.view(way, m, -1).mean(1)
            return (F.cross_entropy(logits, y) + (centre - anchors).pow(2).sum(1).mean() / z.shape[1]
                    + self.priors.tv * total_variation(x_hat) + self.priors.l2 * x_hat.norm())

        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        b1, b2, lr = 0.9, 0.999, self.cfg.inversion_lr
        for t in range(1, self.cfg.inversion_steps + 1):  # Adam, written out so it needs no autograd state
            g = grad(loss)(x)
            m1, m2 = b1 * m1 + (1 - b1) * g, b2 * m2 + (1 - b2) * g * g
            x = x - lr * (m1 / (1 - b1**t)) / ((m2 / (1 - b2**t)).sqrt() + 1e-8)
        return x.detach(), y

    def __call__(self, params: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                 way: int) -> torch.Tensor:
        learner, cfg = self.learner, self.cfg
        gen = torch.Generator().manual_seed(self.seed)
        adapted = learner.adapt(params, xs, ys)
        x_hat, y_hat = self.invert(adapted, xs, ys, way, gen)
        if isinstance(learner, ProtoNet):
            with torch.no_grad():
                zs, zp, zq = (learner.embed(adapted, v) for v in (xs, x_hat, xq))
                w = torch.cat([torch.ones(len(zs)), torch.full((len(zp),), cfg.pseudo_weight)]).to(zs)
                return prototype_logits(zq, prototypes(torch.cat([zs, zp]), torch.cat([ys, y_hat]), way, w))
        with torch.no_grad():
            zs, zp = learner.embed(adapted, xs), learner.embed(adapted, x_hat)
        head = {k: v for k, v in adapted.items() if k.startswith("head.")}

        def calib_loss(h: Weights) -> torch.Tensor:
            ls = F.cross_entropy(F.linear(zs, h["head.weight"], h["head.bias"]), ys)
            lp = F.cross_entropy(F.linear(zp, h["head.weight"], h["head.bias"]), y_hat)
            return ls + cfg.pseudo_weight * lp

        for _ in range(cfg.calibration_steps):
            g = grad(calib_loss)(head)
            head = {k: head[k] - cfg.calibration_lr * g[k] for k in head}
        with torch.no_grad():
            return learner.logits({**adapted, **head}, xq)
