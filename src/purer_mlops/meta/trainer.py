"""ECI meta-training (PURER): the bank update, the meta update and the curriculum switch.

One meta-iteration t:

1. **Bank update.** L_bank = Σ_i L_inv(i) over the teachers used this iteration (all, or a
   random ``candidate_size`` of them), minus ``adv_scale`` · L_outer(θ; T̂) when the
   curriculum switch is on, T̂ being a pseudo task drawn from the *live* bank so that the
   gradient reaches the images through the inner loop. One Adam step on the bank.
2. **Meta update.** ``episode_batch`` pseudo tasks from the detached bank (``way_train``
   classes drawn among *all* bank classes, disjoint support and query); the sum of their
   query losses after the inner loop; one Adam step on θ.
3. **Curriculum.** The batch's mean pseudo-query accuracy feeds :class:`Curriculum`.

With ``real`` images (the oracle) the bank is replaced by the real meta-train images (the
not-data-free upper bound) with the same budget. The selected checkpoint is the best on
meta-val; meta-test is never looked at here.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..compiling import check_compiler
from ..config import Params
from ..data.dataset import ImageSet, fixed_tasks
from ..data.registry import DATASETS
from ..distributed import SINGLE, Ranks
from ..errors import UserError
from ..lanes import ONE, Lanes
from ..models.learners import Weights, build_learner
from .curriculum import Curriculum
from .distill import Distiller
from .evaluation import mean_ci95, task_accuracies
from .inversion import TERMS, Bank, InversionLoss, random_shift
from .pool import Pool, init_meta_model
from .start import best_teacher_start
from .tasks import TaskBatch, sample_pseudo_tasks, sample_real_tasks

TRAIN_COLUMNS = ("iteration", "meta_loss", "pseudo_accuracy", "inversion_loss", *TERMS, "adversarial")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: whether every element of t is finite.

    It reads t once: its sum is non-finite when an element is (NaN and ±inf propagate); only a
    sum overflowing float32 (|Σ| > 3e38, far beyond images and their gradients) would count as
    non-finite too.
    """
    return torch.isfinite(t.sum())


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam, the fused kernel (one pass per tensor; 7x faster on the bank than the loop of ops)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the lanes' parts, in lane order (one lane: its part, untouched)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def check_bank_tasks(params: Params, bank_classes: int) -> None:
    """Refuse pseudo tasks the bank cannot supply, naming the parameter to change."""
    if params.way_train > bank_classes:
        raise UserError(f"'way_train' is {params.way_train} but the teachers know only {bank_classes} "
                        "classes; lower 'way_train'.")
    if params.num_sup_train + params.num_qur_train > params.synthesis_per_class:
        raise UserError(
            f"'num_sup_train' + 'num_qur_train' = {params.num_sup_train + params.num_qur_train} "
            f"exceeds 'synthesis_per_class' = {params.synthesis_per_class}; raise "
            "'synthesis_per_class' (the reference uses shots + queries).")


class MetaTrainer:
    """State and steps of one meta-training run (see the module docstring).

    Args:
        params: the validated parameters.
        pool: the teachers (also the meta-model's start when ``average`` is set).
        val: meta_val, checked for the ``way_test``-way ``num_sup_test``-shot tasks it must supply.
        device: where to compute.
        real: meta_train images for the oracle (None: data-free, from the bank).
        ranks: this process's share of the work under ``torchrun``.
        lanes: the threads that split this process's share (:mod:`.lanes`).
    """

    def __init__(self, params: Params, pool: Pool, val: ImageSet, device: torch.device, *,
                 real: ImageSet | None = None, ranks: Ranks = SINGLE, lanes: Lanes = ONE):
        self.params, self.pool, self.val, self.real, self.ranks, self.lanes = params, pool, val, real, ranks, lanes
        self.device = device
        if params.metatrain.compile:
            check_compiler(device, "metatrain.compile")
        # the meta-dataset's facts as its images were loaded (a `folder` dataset's recorded size and normalisation)
        self.info = dataclasses.replace(DATASETS[params.dataset], image_size=val.image_size, mean=val.mean,
                                        std=val.std)
        self.val_tasks = fixed_tasks(val, params.metatrain.val_episodes, params.way_test,
                                     params.num_sup_test, params.num_qur_test, seed=params.seed + 1)
        self.model = init_meta_model(params, pool, self.info.image_size)
        self.start_teacher = None  # with distill.start: best_teacher, (its index, every teacher's meta-val score)
        if params.distill.start == "best_teacher":
            self.start_teacher = best_teacher_start(self.model, pool, params.backbone, val, self.val_tasks,
                                                    lanes=lanes)
        self.model = self.model.to(device)
        self.learner = build_learner(params.meta_learner, self.model, params.inner_update_num,
                                     params.inner_lr, first_order=params.approx, looped=True)
        self.tester = build_learner(params.meta_learner, self.model, params.test_inner_update_num,
                                    params.inner_lr, looped=True, compiled=params.metatrain.compile)
        self.learners = self.learner.replicas(lanes.count)  # one per lane
        self.gen = torch.Generator().manual_seed(params.seed)
        self.bank = None if real is not None else self._make_bank()
        self.distiller = None  # weight 0: the paper's PURER, untouched
        if self.bank is not None and params.distill.weight > 0:
            space = (self.info.image_size, tuple(self.info.mean), tuple(self.info.std))
            self.distiller = Distiller(params.distill, pool.teachers, space, self.model.features.out_dim,
                                       params.seed).to(device)
        self.meta_opt = adam(self.model.parameters(), params.outer_lr)
        self.curriculum = Curriculum(params.adv_start, params.patience, enabled=params.eci and real is None)
        self.iteration = 0
        self.skipped = 0
        self.skipped_in_a_row = 0  # not saved: a divergence check, restarted on resume
        self.history: dict[str, list[float]] = {c: [] for c in TRAIN_COLUMNS}
        self.val_history: dict[str, list[float]] = {"iteration": [], "val_accuracy": []}
        self.best = {"accuracy": -1.0, "iteration": -1}

    def _make_bank(self) -> Bank:
        p = self.params
        check_bank_tasks(p, len(self.pool.bank_classes))
        bank = Bank(len(self.pool.bank_classes), p.synthesis_per_class, self.info.image_size, self.gen)
        self.inversion = InversionLoss(self.pool.teachers, self.info, p.inversion,
                                       compiled=p.metatrain.compile).to(self.device)
        bank = bank.to(self.device)
        self.bank_opt = adam(bank.parameters(), p.inversion.lr)
        self.good_bank = bank.images.detach().clone()
        return bank

    @property
    def oracle(self) -> bool:
        return self.real is not None

    def weights(self) -> Weights:
        """The meta-model's parameters by name (the tensors the outer optimiser updates)."""
        return dict(self.model.named_parameters())

    # -- one meta-iteration ----------------------------------------------------------------
    def _chosen_teachers(self) -> torch.Tensor:
        """Indices of this rank's teachers for this bank update (every rank draws the same set)."""
        n, size = len(self.pool.teachers), self.params.candidate_size
        chosen = torch.randperm(n, generator=self.gen)[:size] if 0 < size < n else torch.arange(n)
        return chosen[list(self.ranks.share(len(chosen)))]

    def _adversarial_task(self) -> TaskBatch:
        """A pseudo task from the *live* bank, so that the outer loss's gradient reaches the images."""
        p = self.params
        return sample_pseudo_tasks(self.bank.images, 1, p.way_train, p.num_sup_train, p.num_qur_train, self.gen)

    def _bank_share(self, lane: int, teachers: torch.Tensor, shift: tuple[int, int],
                    adversarial: TaskBatch | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One lane's part of the bank update: the gradient (C, P, 3, S, S) of its teachers'
        inversion loss (lane 0 also: −adv_scale · L_outer, counted once over ranks), their
        unweighted terms and weighted loss (len(TERMS) + 1,), and the loss with that term (0-dim)."""
        terms = self.inversion(self.bank.images, shift, teachers)
        loss = terms["loss"]
        if adversarial is not None and lane == 0 and self.ranks.is_main:
            outer, _ = self.learners[0].task_loss(self.weights(), *adversarial.task(0), self.params.way_train)
            loss = loss - self.params.adv_scale * outer
        g = (torch.autograd.grad(loss, [self.bank.images])[0] if loss.requires_grad
             else torch.zeros_like(self.bank.images))  # a rank or lane with no teacher this update
        return g, torch.stack([terms[k] for k in (*TERMS, "loss")]).detach(), loss.detach()

    def bank_step(self) -> tuple[dict[str, torch.Tensor], bool]:
        """One Adam step on the bank; returns the inversion terms and whether it was adversarial."""
        if not all_finite(self.bank.images.detach()):
            # A non-finite image would poison every later loss: roll back to the last good bank.
            with torch.no_grad():
                self.bank.images.copy_(self.good_bank)
            self.skipped += 1
        # every draw before the lanes start, in the order of one lane
        shift = random_shift(self.params.inversion.jitter, self.gen)
        chosen = self._chosen_teachers()
        adversarial = self.curriculum.take()
        task = self._adversarial_task() if adversarial else None
        parts = self.lanes.map(lambda lane, share: self._bank_share(
            lane, chosen[share.start:share.stop], shift, task), len(chosen))
        g, summed, loss = (joined([p[i] for p in parts]) for i in range(3))
        finite = (torch.isfinite(loss) & all_finite(g)).float().reshape(1)
        self.ranks.sum_(g, summed, finite)
        if self._apply(finite, self.bank_opt, [self.bank.images], [g]):
            self.good_bank.copy_(self.bank.images.detach())
        return {k: summed[i] for i, k in enumerate((*TERMS, "loss"))}, adversarial

    def _apply(self, finite: torch.Tensor, opt: torch.optim.Optimizer, params: list, grads: list) -> bool:
        """One step of ``opt`` with ``grads`` when every rank found them finite; else count a skip."""
        if bool(finite == self.ranks.world):
            opt.zero_grad(set_to_none=False)
            for prm, g in zip(params, grads, strict=True):
                prm.grad = g
            opt.step()
            return True
        self.skipped += 1
        return False

    def _meta_tasks(self) -> TaskBatch:
        p = self.params
        if self.real is not None:
            return sample_real_tasks(self.real, p.episode_batch, p.way_train, p.num_sup_train,
                                     p.num_qur_train, self.gen, self.device)
        return sample_pseudo_tasks(self.bank.images.detach(), p.episode_batch, p.way_train,
                                   p.num_sup_train, p.num_qur_train, self.gen)

    def _meta_share(self, lane: int, tasks: TaskBatch, weights: Weights) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One lane's part of the meta update: the gradient of its tasks' summed query losses
        (one tensor per weight) and (summed loss, summed accuracy) (2,)."""
        if len(tasks) == 0:
            return [torch.zeros_like(v) for v in weights.values()], torch.zeros(2, device=self.device)
        losses, accs = self.learners[lane].batch_loss(weights, tasks, batched=False)
        loss = losses.sum()
        grads = list(torch.autograd.grad(loss, list(weights.values()), allow_unused=True, materialize_grads=True))
        return grads, torch.stack([loss.detach(), accs.sum().detach()])

    def meta_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step on θ over ``episode_batch`` tasks; returns (meta loss, mean accuracy)."""
        tasks = self._meta_tasks()
        weights = self.weights()
        share = list(self.ranks.share(len(tasks)))  # this rank's tasks of the meta-batch
        parts = self.lanes.map(lambda lane, mine: self._meta_share(
            lane, tasks.select(share[mine.start:mine.stop]), weights), len(share))
        grads = [joined(per_weight) for per_weight in zip(*(p[0] for p in parts), strict=True)]
        if self.distiller is not None:  # the teachers' embeddings, on views of the bank (meta/distill.py)
            extra = self.distiller.gradients(lambda x: self.learner.embed(weights, x), list(weights.values()),
                                             self.bank.images.detach())
            grads = [g + d for g, d in zip(grads, extra, strict=True)]
        stats = joined([p[1] for p in parts])
        self.ranks.sum_(*grads, stats)
        finite = (torch.isfinite(stats).all() & torch.stack([torch.isfinite(g).all() for g in grads]).all())
        self._apply(finite.float() * self.ranks.world, self.meta_opt, list(weights.values()), grads)
        return stats[0], stats[1] / len(tasks)

    def step(self) -> dict[str, float]:
        """One meta-iteration; returns its row of the training curve."""
        skipped = self.skipped
        terms, adversarial = ({k: torch.zeros((), device=self.device) for k in (*TERMS, "loss")}, False) \
            if self.oracle else self.bank_step()
        loss, acc = self.meta_step()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if self.skipped > skipped else 0
        # one host read for the whole row (one device sync on CUDA)
        figures = torch.stack([loss, acc, terms["loss"], *(terms[k] for k in TERMS)]).tolist()
        row = {"iteration": self.iteration, **dict(zip(("meta_loss", "pseudo_accuracy", "inversion_loss", *TERMS),
                                                       figures, strict=True)),
               "adversarial": int(adversarial)}
        for k, v in row.items():  # a skipped update left the state as it was: report its last figure
            if not math.isfinite(v):
                row[k] = self.history[k][-1] if self.history[k] else 0.0
        self.curriculum.observe(self.iteration, row["pseudo_accuracy"])
        for k in TRAIN_COLUMNS:
            self.history[k].append(row[k])
        self.iteration += 1
        return row

    def validate(self) -> float:
        """Mean meta-val accuracy (percent) on the fixed validation tasks."""
        accs = task_accuracies(self.tester, self.weights(), self.val, self.val_tasks, lanes=self.lanes)
        return 100.0 * mean_ci95(accs)[0]

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "iteration": self.iteration, "model": self.model.state_dict(),
            "meta_opt": self.meta_opt.state_dict(), "curriculum": self.curriculum.state_dict(),
            "generator": self.gen.get_state(), "history": self.history, "val_history": self.val_history,
            "best": self.best, "skipped": self.skipped,
        }
        if self.distiller is not None:
            state["distill"] = self.distiller.state_dict()
        if self.bank is not None:
            state.update(bank=self.bank.images.detach().cpu(), bank_opt=self.bank_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.model.load_state_dict(state["model"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.gen.set_state(state["generator"])
        self.history, self.val_history = state["history"], state["val_history"]
        self.best, self.skipped = state["best"], state["skipped"]
        if self.distiller is not None:
            self.distiller.load_state_dict(state["distill"])
        if self.bank is not None:
            with torch.no_grad():
                self.bank.images.copy_(state["bank"].to(self.device))
            self.good_bank.copy_(self.bank.images.detach())
            self.bank_opt.load_state_dict(state["bank_opt"])
