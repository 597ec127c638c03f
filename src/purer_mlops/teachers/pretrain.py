"""Stage ``pretrain``: train the pool of teachers that data-free meta-learning starts from.

The meta_train classes of each dataset of ``params.teacher_datasets`` are cut into label
sets of ``way_pretrain`` classes (:func:`plan_pool`), and one classifier is trained per set
(:func:`train_teacher`), as in the PURER reference: per class 80 % train / 20 % held out,
no augmentation, gradient-norm clipping, Adam for conv4 and SGD for ResNets, the epoch with
the best held-out accuracy kept (a copy of it: the reference kept the live weights, i.e.
the last epoch). Outputs: the pool at ``models/teachers/`` (see :mod:`..models.pool`) and
``results/pretrain/metrics.json``.

Every teacher draws its initialisation and batch order from its own seed, derived from
``params.seed`` and its index in the pool, so its weights do not depend on which other
teachers were trained before it in the same process (teachers can be spread over workers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params
from ..data.dataset import ImageSet, class_view, load_split
from ..distributed import SINGLE, Ranks
from ..errors import UserError
from ..fileio import write_json
from ..models.backbones import build_backbone
from ..models.pool import TeacherRecord, save_pool

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


def teacher_seed(seed: int, index: int) -> int:
    """Seed of teacher ``index`` of a pool built with global ``seed`` (distinct per pair)."""
    return seed * 1_000_003 + index


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


def _optimizer(arch: str, model: nn.Module, params: Params) -> torch.optim.Optimizer:
    p = params.pretrain
    if arch == "conv4":
        return torch.optim.Adam(model.parameters(), lr=p.conv4_lr)
    return torch.optim.SGD(model.parameters(), lr=p.resnet_lr, momentum=p.momentum,
                           weight_decay=p.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (percent) of ``model``, put in eval mode, on x (N, 3, S, S) with labels y (N,)."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(_EVAL_BATCH), y.split(_EVAL_BATCH), strict=True))
    return 100.0 * correct / len(y)


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


def train_teacher(spec: TeacherSpec, imageset: ImageSet, params: Params,
                  device: str | torch.device = "cpu",
                  on_epoch: Callable[[int, float, nn.Module], None] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Train one teacher on its classes of ``imageset`` (the meta_train split of ``spec.dataset``).

    Args:
        on_epoch: called after each epoch with (epoch, held-out accuracy, live model).

    Returns:
        (state dict of the best held-out epoch, as CPU tensors; its held-out accuracy in percent).
    """
    x_tr, y_tr, x_ho, y_ho = teacher_data(spec, imageset, params, device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(spec.seed)
        model = build_backbone(spec.arch, len(spec.class_ids), imageset.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    opt = _optimizer(spec.arch, model, params)
    gen = torch.Generator().manual_seed(spec.seed)
    batch, clip = params.pretrain.batch_size, params.pretrain.grad_clip
    best_acc, best_state = -1.0, None
    for epoch in range(params.pretrain.epochs):
        model.train()
        order = torch.randperm(len(y_tr), generator=gen).to(device)
        for idx in order.split(batch):
            if len(idx) < 2:  # BatchNorm cannot train on one image at 1×1 resolution
                continue
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        acc = accuracy(model, x_ho, y_ho)
        if acc > best_acc:
            # a copy: state_dict() returns views of the live tensors, which later epochs overwrite
            best_acc = acc
            best_state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                          for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, acc, model)
    assert best_state is not None  # epochs >= 1 is validated by the config
    return best_state, best_acc


def _summary(accs: list[float]) -> dict:
    return {"teachers": len(accs), "acc_mean": sum(accs) / len(accs), "acc_min": min(accs),
            "acc_max": max(accs)}


def run(params: Params, root: Path, progress: bool = True,
        device: str | torch.device = "cpu", ranks: Ranks = SINGLE) -> dict:
    """Train the pool into ``root/models/teachers``; write ``root/results/pretrain/metrics.json``.

    Returns the metrics: teacher count and held-out accuracy (percent) mean/min/max, overall,
    ``by_arch`` and ``by_dataset``, and ``wall_seconds`` of the whole stage. Under ``torchrun``
    rank r trains teachers r, r + N, ... (they are independent and seeded by their index, so
    the pool is the one a single process trains); rank 0 gathers and writes them.
    """
    from tqdm import tqdm

    root = Path(root)
    start = time.perf_counter()
    sets = {d: load_split(d, root / "data" / d, "meta_train", progress=progress)
            for d in params.teacher_datasets}
    specs = plan_pool(params, {d: len(s.classes) for d, s in sets.items()})

    def record(spec: TeacherSpec, acc: float) -> TeacherRecord:
        imageset = sets[spec.dataset]
        return TeacherRecord(arch=spec.arch, dataset=spec.dataset, image_size=imageset.image_size,
                             mean=imageset.mean, std=imageset.std,
                             classes=tuple(imageset.classes[c] for c in spec.class_ids),
                             class_ids=spec.class_ids, accuracy=acc)

    def trained(mine: list[TeacherSpec]) -> Iterator[tuple[TeacherSpec, dict[str, torch.Tensor], float]]:
        worst = 100.0
        bar = tqdm(mine, desc="pretrain teachers", unit="teacher", disable=not (progress and ranks.is_main))
        for spec in bar:
            state, acc = train_teacher(spec, sets[spec.dataset], params, device)
            worst = min(worst, acc)
            bar.set_postfix(best_acc=f"{acc:.1f}", pool_min=f"{worst:.1f}")
            yield spec, state, acc

    if ranks.active:
        local = {s.index: (state, acc) for s, state, acc in
                 trained([s for i, s in enumerate(specs) if i % ranks.world == ranks.rank])}
        done = {k: v for part in ranks.gather(local) for k, v in part.items()}
        if not ranks.is_main:
            return {}
        pairs = ((record(s, done[s.index][1]), done[s.index][0]) for s in specs)
    else:
        # one process: save_pool writes each teacher as soon as it is trained (one in memory)
        pairs = ((record(s, acc), state) for s, state, acc in trained(specs))
    records = save_pool(root / "models" / "teachers", pairs)
    metrics = _summary([r.accuracy for r in records])
    for key in ("arch", "dataset"):
        groups: dict[str, list[float]] = {}
        for r in records:
            groups.setdefault(getattr(r, key), []).append(r.accuracy)
        metrics[f"by_{key}"] = {k: _summary(v) for k, v in groups.items()}
    metrics["wall_seconds"] = time.perf_counter() - start
    write_json(root / "results" / "pretrain" / "metrics.json", metrics)
    return metrics
