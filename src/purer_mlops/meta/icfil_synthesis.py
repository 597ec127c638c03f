"""ICFIL's pseudo data: images synthesised for one real task after its inner loop.

Each of the ``m`` pseudo images of class c starts as a noisy copy of one of the class's
support images and takes ``inversion_steps`` Adam steps on (docs/icfil.md, step 2)

    L_syn(X̂) = a_hard · mean_{c,i} p_θ'(c | x̂_{c,i})                  hardness
             + a_feat · mean_{c,i} ‖ψ(x̂_{c,i}) − μ^ψ_c‖² / D            fidelity
             + a_div  · mean_c mean_{i≠k} cos(ψ(x̂_{c,i}), ψ(x̂_{c,k}))    diversity
             + a_bn   · Σ_l ‖μ_l(X̂) − μ_l(S)‖ + ‖σ²_l(X̂) − σ²_l(S)‖      BatchNorm prior
             + a_tv · TV(X̂) + a_l2 · ‖X̂‖₂                                 image priors

where p_θ' is the adapted model's class probability, ψ the embedding of the meta-model
*before* adaptation (the knowledge that meta-training put in θ, which the inner loop on one
image per class may have bent), μ^ψ_c the class's support mean in it, and μ_l, σ²_l the
per-channel statistics of the input of the l-th BatchNorm layer of the adapted model.

Everything here is a pure function of one task, so :class:`~purer_mlops.meta.icfil.ICFIL`
runs it over the tasks of a batch with ``vmap``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad

from ..config import CalibrationParams, InversionParams
from ..models.backbones import capture_bn_inputs
from ..models.kernels import bn_statistics_term, total_variation
from ..models.learners import MetaLearner, Weights, prototype_logits

TERMS = ("hard", "feature", "diversity", "bn")


def pseudo_labels(way: int, per_class: int, device: torch.device) -> torch.Tensor:
    """Labels (way·per_class,) of the pseudo images: 0 × per_class, 1 × per_class, ..."""
    return torch.arange(way, device=device).repeat_interleave(per_class)


def initial_images(xs: torch.Tensor, way: int, noise: torch.Tensor) -> torch.Tensor:
    """Start (way·m, 3, S, S): image i of class c is support image i mod K of c plus ``noise`` (way·m, 3, S, S)."""
    m = noise.shape[0] // way
    shot = xs.shape[0] // way
    # Support labels are 0..way-1 in class order, `shot` each (tasks.task_labels).
    cls = torch.arange(way, device=xs.device).repeat_interleave(m)
    order = cls * shot + torch.arange(m, device=xs.device).repeat(way) % shot
    return xs[order] + noise


def class_means(z: torch.Tensor, way: int) -> torch.Tensor:
    """Class means (way, D) of embeddings z (way·k, D) laid out in class order, k per class.

    (A reshape, not :func:`~purer_mlops.models.learners.prototypes`: ``one_hot`` cannot run under ``vmap``.)
    """
    return z.view(way, -1, z.shape[1]).mean(1)


def _bn_gap(inputs: list[torch.Tensor], n_support: int) -> torch.Tensor:
    """Σ_l ‖μ_l(pseudo) − μ_l(support)‖ + ‖σ²_l(pseudo) − σ²_l(support)‖ over BatchNorm inputs (B, C, ...)."""
    total = inputs[0].new_zeros(())
    for h in inputs:
        dims = [0, *range(2, h.dim())]
        s, p = h[:n_support], h[n_support:]
        total = bn_statistics_term(total, p.mean(dims), p.var(dims, unbiased=False), s.mean(dims).detach(),
                                   s.var(dims, unbiased=False).detach())
    return total


def _diversity(z: torch.Tensor, way: int) -> torch.Tensor:
    """Mean cosine similarity between distinct pseudo embeddings of one class; z is (way·m, D)."""
    zc = F.normalize(z, dim=1).view(way, -1, z.shape[1])  # (way, m, D)
    m = zc.shape[1]
    if m < 2:
        return z.new_zeros(())
    sim = zc @ zc.transpose(1, 2)  # (way, m, m)
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)).mean() / (m * (m - 1))


def adapted_logits(learner: MetaLearner, adapted: Weights, zs: torch.Tensor, ys: torch.Tensor,
                   z: torch.Tensor, way: int) -> torch.Tensor:
    """Logits (B, way) of embeddings z under the adapted classifier (a metric-based learner: the support prototypes)."""
    if learner.metric_based:
        return prototype_logits(z, class_means(zs, way))
    return F.linear(z, adapted["head.weight"], adapted["head.bias"])


class Synthesis:
    """L_syn of one task and the Adam loop minimising it (see the module docstring)."""

    def __init__(self, learner: MetaLearner, cfg: CalibrationParams, priors: InversionParams):
        self.learner = learner
        self.cfg = cfg
        self.priors = priors

    def terms(self, x_hat: torch.Tensor, base: Weights, adapted: Weights, xs: torch.Tensor,
              ys: torch.Tensor, way: int) -> dict[str, torch.Tensor]:
        """The four task terms of L_syn (0-dim each) for pseudo images x_hat (way·m, 3, S, S)."""
        learner, n = self.learner, len(xs)
        y_hat = pseudo_labels(way, x_hat.shape[0] // way, x_hat.device)
        # Support and pseudo images share one batch: BatchNorm uses batch statistics, and the
        # real images keep them realistic (and give the BatchNorm prior its reference).
        with capture_bn_inputs(learner.model) as bn_inputs:
            z = learner.embed(adapted, torch.cat([xs, x_hat]))
        bn = _bn_gap(bn_inputs, n) if self.cfg.bn_weight else z.new_zeros(())
        probs = adapted_logits(learner, adapted, z[:n], ys, z[n:], way).softmax(1)
        hard = probs.gather(1, y_hat[:, None]).mean()
        same_features = all(adapted[k] is base[k] for k in base if k.startswith("features."))
        ref = z if same_features else learner.embed(base, torch.cat([xs, x_hat]))
        anchors = class_means(ref[:n].detach(), way)  # (way, D)
        feature = (ref[n:] - anchors[y_hat]).pow(2).sum(1).mean() / ref.shape[1]
        return {"hard": hard, "feature": feature, "diversity": _diversity(ref[n:], way), "bn": bn}

    def loss(self, x_hat: torch.Tensor, base: Weights, adapted: Weights, xs: torch.Tensor,
             ys: torch.Tensor, way: int) -> torch.Tensor:
        """L_syn (0-dim): the weighted terms plus the image priors."""
        cfg = self.cfg
        t = self.terms(x_hat, base, adapted, xs, ys, way)
        weights = {"hard": cfg.hard_weight, "feature": cfg.feature_weight,
                   "diversity": cfg.diversity_weight, "bn": cfg.bn_weight}
        total = sum(weights[k] * t[k] for k in TERMS)
        return total + self.priors.tv * total_variation(x_hat) + self.priors.l2 * x_hat.norm()

    def run(self, base: Weights, adapted: Weights, xs: torch.Tensor, ys: torch.Tensor,
            noise: torch.Tensor, way: int) -> torch.Tensor:
        """Pseudo images (way·m, 3, S, S) after ``inversion_steps`` Adam steps from the noisy support."""
        x = initial_images(xs, way, noise)
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        b1, b2, lr = 0.9, 0.999, self.cfg.inversion_lr
        for t in range(1, self.cfg.inversion_steps + 1):  # Adam written out: pure, so vmap can run it
            g = grad(self.loss)(x, base, adapted, xs, ys, way)
            m1, m2 = b1 * m1 + (1 - b1) * g, b2 * m2 + (1 - b2) * g * g
            x = x - lr * (m1 / (1 - b1**t)) / ((m2 / (1 - b2**t)).sqrt() + 1e-8)
        return x.detach()
