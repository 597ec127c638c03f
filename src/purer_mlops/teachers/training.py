"""Training the pool of teachers that data-free meta-learning starts from (stage ``pretrain``,
:mod:`purer_mlops.stages.pretrain`, saves and reports it).

The meta_train classes of each dataset of ``params.teacher_datasets`` are cut into label
sets of ``way_pretrain`` classes (:func:`plan_pool`), and one classifier is trained per set
(:func:`train_teacher`): per class 80 % train / 20 % held out, a budget of optimiser steps
(or a fixed epoch count), gradient-norm clipping, Adam for conv4 and SGD for ResNets, the
initialisation, schedule and augmentation of ``pretrain.recipe`` (:mod:`.recipes`,
:mod:`.augment`), and the epoch with the best held-out accuracy kept (a copy of it: the
reference kept the live weights, i.e. the last epoch); :func:`trained_teachers` trains a
list of them side by side.

Every teacher draws its initialisation, batch order and augmentation from its own seed,
derived from ``params.seed`` and its index in the pool, so its weights do not depend on which
other teachers were trained before it in the same process (teachers can be spread over workers).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compiling import check_compiler
from ..config import Params
from ..data.dataset import ImageSet, class_view
from ..errors import UserError
from ..lanes import lane_count, open_lanes
from ..models.backbones import build_backbone
from .augment import Augmentation
from .recipes import make_optimizer, make_schedule, reference_init

MIX_CYCLE = ("conv4", "resnet10", "resnet18")
_EVAL_BATCH = 512


@dataclass(frozen=True)
class TeacherSpec:
    """What one teacher is trained on.

    Attributes:
        index: position in the pool (``teacher_{index:03d}``).
        arch: architecture name.
        dataset: dataset of its classes.
        class_ids: indices into the sorted meta_train classes of ``dataset``, in label order.
        seed: seed of its held-out split, initialisation and batch order.
    """

    index: int
    arch: str
    dataset: str
    class_ids: tuple[int, ...]
    seed: int


_GLOBAL_RNG = threading.Lock()  # held while a teacher is initialised from torch's global generator


def teacher_seed(seed: int, index: int) -> int:
    """Seed of teacher ``index`` of a pool built with global ``seed`` (distinct per pair)."""
    return seed * 1_000_003 + index


def restart_seed(seed: int, restart: int) -> int:
    """Seed of restart ``restart`` (from 1) of the teacher seeded ``seed`` (below 2**63 for any valid seed)."""
    return seed * 256 + restart


def block_label_sets(num_classes: int, way: int) -> list[tuple[int, ...]]:
    """Consecutive blocks of ``way`` classes covering 0..num_classes-1 (PURER).

    When ``way`` does not divide ``num_classes``, the last block is the final ``way``
    classes and overlaps the one before it (64 / 5: 13 blocks, the last is 59..63), so
    every teacher is ``way``-way and every class is covered.
    """
    starts = list(range(0, num_classes - way + 1, way))
    if num_classes % way:
        starts.append(num_classes - way)
    return [tuple(range(s, s + way)) for s in starts]


def random_label_sets(num_classes: int, way: int, count: int,
                      generator: torch.Generator) -> list[tuple[int, ...]]:
    """``count`` random sorted sets of ``way`` distinct classes; sets may overlap (PURER-Plus)."""
    return [tuple(sorted(torch.randperm(num_classes, generator=generator)[:way].tolist()))
            for _ in range(count)]


def plan_pool(params: Params, class_counts: dict[str, int]) -> list[TeacherSpec]:
    """The teachers of the pool, in order, given the meta_train class count of each dataset.

    ``blocks``: consecutive blocks of every dataset, one after the other. ``random``:
    ``APInum`` teachers split as evenly as possible across the datasets (the first
    ``APInum mod D`` datasets get one more), label sets drawn from a generator seeded
    with ``params.seed``. ``pre_backbone: mix`` cycles conv4, resnet10, resnet18 over
    the teacher index.
    """
    way = params.way_pretrain
    datasets = params.teacher_datasets
    gen = torch.Generator().manual_seed(params.seed)
    sets: list[tuple[str, tuple[int, ...]]] = []
    for d, dataset in enumerate(datasets):
        n = class_counts[dataset]
        if n < way:
            raise UserError(f"'way_pretrain' is {way} but the meta_train split of {dataset} has "
                            f"only {n} classes; lower 'way_pretrain'.")
        if params.pool_mode == "blocks":
            label_sets = block_label_sets(n, way)
        else:
            count = params.APInum // len(datasets) + (d < params.APInum % len(datasets))
            label_sets = random_label_sets(n, way, count, gen)
        sets += [(dataset, ids) for ids in label_sets]

    def arch(i: int) -> str:
        mix = params.pre_backbone == "mix"
        return MIX_CYCLE[i % len(MIX_CYCLE)] if mix else params.pre_backbone

    return [TeacherSpec(index=i, arch=arch(i), dataset=dataset, class_ids=ids,
                        seed=teacher_seed(params.seed, i))
            for i, (dataset, ids) in enumerate(sets)]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) of ``model``, put in eval mode, on x (N, 3, S, S), y (N,)."""
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(_EVAL_BATCH), y.split(_EVAL_BATCH), strict=True):
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return 100.0 * correct / len(y), loss / len(y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (percent) of ``model``, put in eval mode, on x (N, 3, S, S) with labels y (N,)."""
    return evaluate(model, x, y)[0]


def teacher_data(spec: TeacherSpec, imageset: ImageSet, params: Params,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """Normalised float images and relative labels of one teacher's classes, split once.

    Returns (x_train (n, 3, S, S), y_train (n,), x_held (m, 3, S, S), y_held (m,)).
    """
    holdout = params.pretrain.holdout
    tr_i, tr_y, ho_i, ho_y = class_view(imageset, spec.class_ids, holdout, spec.seed)

    def images(ix: torch.Tensor) -> torch.Tensor:
        # normalised once here rather than per batch; channels_last: ~30 % faster convs on CPU
        x = imageset.normalize(imageset.images[ix].to(device))
        return x.contiguous(memory_format=torch.channels_last)

    return images(tr_i), tr_y.to(device), images(ho_i), ho_y.to(device)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps of one pass over ``n_train`` images: a last batch of one image is skipped."""
    return max(1, n_train // batch_size + (n_train % batch_size >= 2))


def epochs_for(params: Params, n_train: int) -> int:
    """Epochs of a teacher with ``n_train`` training images: ``pretrain.epochs`` when set, else
    enough whole epochs for ``pretrain.steps`` optimiser steps (fewer images, more epochs)."""
    p = params.pretrain
    return p.epochs or math.ceil(p.steps / steps_per_epoch(n_train, p.batch_size))


@dataclass
class TrainedTeacher:
    """The outcome of :func:`train_teacher`.

    Attributes:
        state: state dict of the evaluation best on the held-out images, as CPU tensors.
        accuracy: its held-out accuracy, percent.
        best_epoch: the epoch of that evaluation, counted from 1 over the kept attempt.
        epochs: epochs trained by the kept attempt.
        steps: optimiser steps taken by the kept attempt.
        restarts: attempts dropped because their first segment stayed near chance.
    """

    state: dict[str, torch.Tensor]
    accuracy: float
    best_epoch: int
    epochs: int
    steps: int
    restarts: int = 0


def _new_model(spec: TeacherSpec, image_size: int, recipe: str, seed: int) -> nn.Module:
    # seeded init without touching the caller's RNG; the lock keeps a lane training another
    # teacher from drawing from the global generator meanwhile
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(spec.arch, len(spec.class_ids), image_size)
        if recipe == "reference":
            reference_init(model)
    return model


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    # a copy: state_dict() returns views of the live tensors, which later epochs overwrite
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items()}


def training_forward(model: nn.Module, params: Params) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward for training steps: under ``torch.compile`` with ``pretrain.compile``
    (one graph serves every teacher of an architecture), the module itself otherwise."""
    if not params.pretrain.compile:
        return model
    check_compiler(next(model.parameters()).device, "pretrain.compile")
    return torch.compile(model)


OnEpoch = Callable[[int, float, nn.Module], None]


class _Attempt:
    """One initialisation of a teacher and its training so far: the live model, optimiser and batch
    order, the step and epoch counts, every held-out evaluation (step, accuracy) and the best one."""

    def __init__(self, spec: TeacherSpec, data: tuple[torch.Tensor, ...], imageset: ImageSet, params: Params,
                 seed: int, device: str | torch.device) -> None:
        p = params.pretrain
        self.data, self.params, self.size = data, params, imageset.image_size
        self.model = _new_model(spec, self.size, p.recipe, seed).to(device, memory_format=torch.channels_last)
        self.forward = training_forward(self.model, params)
        self.opt = make_optimizer(spec.arch, self.model, params)
        self.augment = (Augmentation.for_dataset(spec.dataset, params, imageset.mean, imageset.std, imageset.recolour)
                        if p.recipe == "purer-mlops" else None)
        self.source = self.augment.prepare(data[0]) if self.augment else data[0]
        self.gen = torch.Generator().manual_seed(seed)
        self.steps = self.epochs = 0
        self.curve: list[tuple[int, float]] = []
        self.best: tuple[tuple[float, float], int, dict[str, torch.Tensor]] | None = None

    def evaluate(self, epoch: int, on_epoch: OnEpoch | None) -> None:
        """Score the live model, in epoch ``epoch`` (from 1), on the held-out images; keep a copy
        when it beats the best so far (higher accuracy; among equals, lower held-out loss)."""
        acc, held_loss = evaluate(self.model, self.data[2], self.data[3])
        self.curve.append((self.steps, acc))
        if self.best is None or (acc, -held_loss) > self.best[0]:
            self.best = ((acc, -held_loss), epoch, _cpu_copy(self.model))
        if on_epoch is not None:
            on_epoch(epoch - 1, acc, self.model)

    def segment(self, epochs: int, on_epoch: OnEpoch | None) -> None:
        """Train ``epochs`` epochs under a fresh schedule (the cosine restarts from the base rate),
        evaluating after every epoch, or every ``pretrain.eval_every`` steps and at the end."""
        p = self.params.pretrain
        x_tr, y_tr = self.data[0], self.data[1]
        schedule = make_schedule(p.recipe, self.opt, steps_per_epoch(len(y_tr), p.batch_size), epochs)
        for _ in range(epochs):
            self.model.train()
            for idx in torch.randperm(len(y_tr), generator=self.gen).to(x_tr.device).split(p.batch_size):
                if len(idx) < 2:  # BatchNorm cannot train on one image at 1×1 resolution
                    continue
                x = self.augment.batch(self.source, idx, self.size, self.gen) if self.augment else x_tr[idx]
                loss = F.cross_entropy(self.forward(x), y_tr[idx])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip)
                self.opt.step()
                schedule.step()
                self.steps += 1
                if p.eval_every and self.steps % p.eval_every == 0:
                    self.evaluate(self.epochs + 1, None)
                    self.model.train()
            self.epochs += 1
            if not p.eval_every:
                self.evaluate(self.epochs, on_epoch)
        if p.eval_every and (not self.curve or self.curve[-1][0] != self.steps):
            self.evaluate(self.epochs, None)

    def still_rising(self, patience: int, segment: int, min_delta: float) -> bool:
        """Whether the held-out accuracy rose by more than ``min_delta`` points above every earlier
        evaluation within the last ``patience`` steps (at most half of a ``segment``), short of
        100 %: the curve has not reached a plateau."""
        since = self.steps - min(patience, segment // 2)
        recent = [acc for step, acc in self.curve if step > since]
        earlier = [acc for step, acc in self.curve if step <= since]
        if not recent or not earlier or max(recent) >= 100.0:  # a perfect teacher has nothing left to gain
            return False
        return max(recent) > max(earlier) + min_delta


def near_chance(accuracy: float, classes: int, factor: float) -> bool:
    """Whether ``accuracy`` (percent) is below ``factor`` times chance (100 / ``classes``)."""
    return accuracy < factor * 100.0 / classes


def train_teacher(spec: TeacherSpec, imageset: ImageSet, params: Params,
                  device: str | torch.device = "cpu", on_epoch: OnEpoch | None = None) -> TrainedTeacher:
    """Train one teacher on its classes of ``imageset`` (the meta_train split of ``spec.dataset``).

    With ``pretrain.epochs`` set: exactly that many epochs. Otherwise a budget that follows the
    held-out curve: a first segment of ``pretrain.steps`` steps (whole epochs, one cosine); an
    attempt whose best held-out accuracy is then below ``pretrain.restart_below`` × chance starts
    again from a new initialisation and batch order (at most ``pretrain.restarts`` times); then
    further segments of the same length, each a new cosine from the live weights, while the
    accuracy still rose in the last ``pretrain.patience`` steps and the next segment fits in
    ``pretrain.max_steps``. The kept weights are the best evaluation's (ties: lower held-out loss).

    Args:
        on_epoch: called after each epoch's evaluation with (epoch from 0, held-out accuracy, live model),
            when evaluations follow epochs (``pretrain.eval_every`` 0).
    """
    p = params.pretrain
    data = teacher_data(spec, imageset, params, device)
    epochs = epochs_for(params, len(data[1]))
    restarts = 0
    run = _Attempt(spec, data, imageset, params, spec.seed, device)
    run.segment(epochs, on_epoch)
    while (not p.epochs and restarts < p.restarts
           and near_chance(run.best[0][0], len(spec.class_ids), p.restart_below)):
        restarts += 1
        run = _Attempt(spec, data, imageset, params, restart_seed(spec.seed, restarts), device)
        run.segment(epochs, on_epoch)
    segment = run.steps  # steps of one segment
    while (not p.epochs and run.steps + segment <= p.max_steps
           and run.still_rising(p.patience, segment, p.min_delta)):
        run.segment(epochs, on_epoch)
    (acc, _), best_epoch, state = run.best
    return TrainedTeacher(state=state, accuracy=acc, best_epoch=best_epoch, epochs=run.epochs, steps=run.steps,
                          restarts=restarts)


def trained_teachers(specs: list[TeacherSpec], sets: dict[str, ImageSet], params: Params, device: str | torch.device,
                     progress: bool) -> Iterator[tuple[TeacherSpec, TrainedTeacher]]:
    """Train ``specs`` in order, as many side by side as there are lanes (each teacher is
    independent and seeded by its index), with a progress bar of the pool's worst accuracy so far."""
    from tqdm import tqdm

    worst = 100.0
    count = lane_count(params.lanes, torch.device(device), params.pretrain.compile)
    with open_lanes(count) as lanes, tqdm(total=len(specs), desc="pretrain teachers", unit="teacher",
                                          disable=not progress) as bar:
        for start in range(0, len(specs), lanes.count):
            batch = specs[start:start + lanes.count]

            def train(lane: int, share: range, batch: list[TeacherSpec] = batch) -> list[TrainedTeacher]:
                return [train_teacher(batch[i], sets[batch[i].dataset], params, device) for i in share]

            for spec, result in zip(batch, [t for part in lanes.map(train, len(batch)) for t in part], strict=True):
                worst = min(worst, result.accuracy)
                bar.update(1)
                bar.set_postfix(best_acc=f"{result.accuracy:.1f}", pool_min=f"{worst:.1f}")
                yield spec, result
