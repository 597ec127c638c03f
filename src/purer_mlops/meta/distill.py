"""Data-free embedding distillation: the meta-model's embedding learns the teachers' embeddings.

Each teacher's penultimate embedding, used as a nearest-prototype classifier, is a far better
few-shot learner than PURER's meta-model (docs/distillation.md): the transferable knowledge is
in the teachers' features, which PURER passes on only through pseudo tasks. Here, at every
meta-iteration, a batch of the bank's pseudo images (``classes`` bank classes × ``per_class``
images, each seen through a random view: sub-pixel shift, Gaussian noise, mixing with another
image of the batch) goes through the teachers (frozen, eval mode; all, or ``teachers`` of them
drawn at random, the cheaper) and through the meta-model's ``features`` (B, D), and

    L_distill = feature · L_feat + relation · L_rel + soft · L_soft

is added, times ``weight``, to the meta loss of the meta update (its gradient to θ only):

- L_feat (regression): mean over teachers i of mean_b (1 − cos(P_i z_b, t_ib)), with P_i a
  learnable linear projection (D_i, D) per teacher (identity at the start when D_i = D): the
  student must hold, linearly, every teacher's embedding at once.
- L_rel (relational): mean over off-diagonal pairs of (cos(z_a, z_b) − mean_i cos(t_ia, t_ib))²:
  the student's batch similarity matrix matches the teachers' mean one (no projection needed).
- L_soft (soft labels): the batch's classes are prototypes (mean normalised embedding per class);
  the teachers' mean softmax(cos(t_i, prototypes_i) / temperature) is the target of the
  student's own, by KL divergence (× temperature²): the nearest-prototype decisions the
  teachers' ensemble makes on the pseudo images.

The distiller draws from its own generator, so PURER's stream of random numbers (bank jitter,
tasks, curriculum) is the same with or without it, and a ``weight`` of 0 builds no distiller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config.params import DistillParams
from ..errors import UserError
from ..models.backbones import fast_forward
from .inversion import Teacher

SEED_OFFSET = 7919  # the distiller's generator: seed + this, apart from the trainer's stream
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) -> embeddings (B, D)


def cosine_regression(z: torch.Tensor, targets: list[torch.Tensor], projections: list[torch.Tensor]) -> torch.Tensor:
    """L_feat (0-dim): mean over teachers of mean_b (1 − cos(P_i z_b, t_ib)).

    Args:
        z: student embeddings (B, D); targets: per teacher (B, D_i); projections: per teacher (D_i, D).
    """
    terms = [1 - F.cosine_similarity(z @ p.T, t, dim=1).mean() for t, p in zip(targets, projections, strict=True)]
    return torch.stack(terms).mean()


def similarity(z: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix (B, B) of embeddings z (B, D)."""
    u = F.normalize(z, dim=1)
    return u @ u.T


def relation_loss(z: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """L_rel (0-dim): mean squared difference, off the diagonal, between the student's similarity
    matrix and the teachers' mean one. z (B, D); targets: per teacher (B, D_i)."""
    goal = torch.stack([similarity(t) for t in targets]).mean(0)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return (similarity(z) - goal)[off].pow(2).mean()


def prototype_log_probs(z: torch.Tensor, labels: torch.Tensor, classes: int, temperature: float) -> torch.Tensor:
    """log softmax over the batch's class prototypes of cos(z, prototype) / temperature: (B, classes).

    z (B, D); labels (B,) in 0..classes-1; prototypes are the mean normalised embedding of a class.
    """
    u = F.normalize(z, dim=1)
    onehot = F.one_hot(labels, classes).to(z.dtype)
    protos = F.normalize(onehot.T @ u, dim=1)
    return (u @ protos.T / temperature).log_softmax(1)


def soft_label_loss(z: torch.Tensor, targets: list[torch.Tensor], labels: torch.Tensor, classes: int,
                    temperature: float) -> torch.Tensor:
    """L_soft (0-dim): KL(teachers' mean prototype probabilities ‖ the student's) × temperature².

    z (B, D); targets: per teacher (B, D_i); labels (B,) the bank class of each image, 0..classes-1.
    """
    goal = torch.stack([prototype_log_probs(t, labels, classes, temperature).exp() for t in targets]).mean(0)
    log_q = prototype_log_probs(z, labels, classes, temperature)
    return F.kl_div(log_q, goal, reduction="batchmean") * temperature ** 2


def augment(x: torch.Tensor, cfg: DistillParams, gen: torch.Generator) -> torch.Tensor:
    """A random view of each image of x (B, 3, S, S): a shift of up to ``shift`` pixels each way
    (bilinear, border padding), a mix λx + (1 − λ)x' with another image of the batch (λ ~ U(1 − mix,
    1)), Gaussian noise of std ``noise``. No flips: a mirrored glyph is another glyph."""
    b, _, s, _ = x.shape
    if cfg.shift > 0:
        t = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.shift * 2 / s  # pixels -> [-1, 1] grid units
        theta = torch.cat([torch.eye(2).expand(b, 2, 2), t.unsqueeze(2)], 2).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.mix > 0:
        lam = (1 - cfg.mix * torch.rand(b, 1, 1, 1, generator=gen)).to(x)
        x = lam * x + (1 - lam) * x[torch.randperm(b, generator=gen).to(x.device)]
    if cfg.noise > 0:
        x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(x)
    return x


class Distiller:
    """The distillation term of the meta update: its batch, the teachers' targets, its gradient.

    Args:
        cfg: the ``distill`` knobs.
        teachers: the pool (frozen here); they must read the bank's size and normalisation.
        bank_space: (image size, mean, std) of the bank.
        dim: the meta-model's embedding size D.
        seed: the run's seed (the distiller's generator is seeded from it).
    """

    def __init__(self, cfg: DistillParams, teachers: list[Teacher], bank_space: tuple, dim: int, seed: int):
        wrong = [i for i, t in enumerate(teachers) if (t.image_size, tuple(t.mean), tuple(t.std)) != bank_space]
        if wrong:
            raise UserError(f"distill.weight > 0 needs teachers that read the bank's size and normalisation "
                            f"{bank_space}; teachers {wrong} do not. Set distill.weight: 0.")
        self.cfg = cfg
        self.teachers = [t.model.eval().requires_grad_(False) for t in teachers]
        self.gen = torch.Generator().manual_seed(seed + SEED_OFFSET)
        dims = [t.model.features(torch.zeros(2, 3, bank_space[0], bank_space[0])).shape[1] for t in teachers]
        self.projections = nn.ParameterList([nn.Parameter(torch.eye(d, dim) if d == dim else
                                                          torch.randn(d, dim, generator=self.gen) / dim ** 0.5)
                                             for d in dims])
        self.opt = torch.optim.Adam(self.projections.parameters(), lr=cfg.projection_lr)
        self.last: dict[str, float] = {}

    def to(self, device: torch.device) -> Distiller:
        self.projections.to(device)
        return self

    def batch(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented views (B, 3, S, S) of ``classes`` × ``per_class`` bank images (C, P, 3, S, S),
        and their class in the batch (B,), B = classes · per_class."""
        c, p = bank.shape[:2]
        k, m = min(self.cfg.classes, c), min(self.cfg.per_class, p)
        rows = torch.randperm(c, generator=self.gen)[:k]
        cols = torch.stack([torch.randperm(p, generator=self.gen)[:m] for _ in range(k)])
        x = bank[rows.unsqueeze(1).to(bank.device), cols.to(bank.device)].reshape(k * m, *bank.shape[2:])
        return augment(x.detach(), self.cfg, self.gen), torch.arange(k, device=bank.device).repeat_interleave(m)

    def chosen(self) -> list[int]:
        """The teachers of this batch: all, or ``teachers`` of them at random."""
        n, k = len(self.teachers), self.cfg.teachers
        return torch.randperm(n, generator=self.gen)[:k].sort().values.tolist() if 0 < k < n else list(range(n))

    def targets(self, x: torch.Tensor, chosen: list[int]) -> list[torch.Tensor]:
        """The ``chosen`` teachers' embeddings (B, D_i) of x (B, 3, S, S), eval mode, no graph."""
        with torch.no_grad():
            return [self.teachers[i].features(x) for i in chosen]

    def loss(self, z: torch.Tensor, targets: list[torch.Tensor], labels: torch.Tensor,
             chosen: list[int]) -> torch.Tensor:
        """The weighted sum (0-dim) of the terms whose weight is positive; records each in ``last``.
        ``targets`` are the embeddings of the ``chosen`` teachers (their projections are used)."""
        cfg, parts = self.cfg, {}
        if cfg.feature > 0:
            projections = [self.projections[i] for i in chosen]
            parts["feature"] = (cfg.feature, cosine_regression(z, targets, projections))
        if cfg.relation > 0:
            parts["relation"] = (cfg.relation, relation_loss(z, targets))
        if cfg.soft > 0:
            parts["soft"] = (cfg.soft, soft_label_loss(z, targets, labels, int(labels.max()) + 1, cfg.temperature))
        self.last = {k: float(v.detach()) for k, (_, v) in parts.items()}
        return sum((w * v for w, v in parts.values()), z.new_zeros(()))

    def embed(self, embed: Embed, x: torch.Tensor, classes: int) -> torch.Tensor:
        """The student's embeddings (B, D) of the batch x (B, 3, S, S) (``classes`` classes, class-major).

        With ``bn_group`` > 0 the meta-model's batch-statistics BatchNorm sees groups of that many
        images, one per class as far as possible (a 1-shot support is such a group), as at test time.
        """
        g = self.cfg.bn_group
        if g <= 0 or g >= len(x):
            return embed(x)
        order = torch.arange(len(x), device=x.device).view(classes, -1).T.flatten()  # class-minor
        z = torch.cat([embed(x[chunk]) for chunk in order.split(g)])
        return z[torch.argsort(order)]

    def gradients(self, embed: Embed, params: list[torch.Tensor], bank: torch.Tensor) -> list[torch.Tensor]:
        """``weight`` × the gradient of the loss w.r.t. ``params`` (the meta-model's weights, each
        tensor as it is); steps the projections on their own gradient."""
        x, labels = self.batch(bank)
        chosen = self.chosen()
        with fast_forward():
            z = self.embed(embed, x, int(labels[-1]) + 1)
        loss = self.loss(z, self.targets(x, chosen), labels, chosen)
        proj = [self.projections[i] for i in chosen] if self.cfg.feature > 0 else []
        grads = torch.autograd.grad(loss, params + proj, allow_unused=True, materialize_grads=True)
        if proj:
            self.opt.zero_grad(set_to_none=False)
            for p, g in zip(proj, grads[len(params):], strict=True):
                p.grad = g
            self.opt.step()
        return [self.cfg.weight * g for g in grads[:len(params)]]

    def state_dict(self) -> dict:
        return {"projections": self.projections.state_dict(), "opt": self.opt.state_dict(),
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.projections.load_state_dict(state["projections"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["generator"])
