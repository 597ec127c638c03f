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

``oracle=True`` replaces the bank by the real meta-train images (the not-data-free upper
bound) with the same budget. The selected checkpoint is the best on meta-val; meta-test is
never looked at here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import Params
from ..data.dataset import ImageSet, fixed_tasks, load_split, sample_task_indices
from ..data.registry import DATASETS
from ..distributed import SINGLE, Ranks, pick_device
from ..errors import UserError
from ..fileio import write_csv, write_json, write_with
from ..models.backbones import Classifier, build_backbone
from ..models.pool import load_pool
from ..tracking import Tracker
from .curriculum import Curriculum
from .evaluation import mean_ci95, task_accuracies
from .inversion import TERMS, Bank, InversionLoss, Teacher, random_shift
from .learners import MetaLearner

TRAIN_COLUMNS = ("iteration", "meta_loss", "pseudo_accuracy", "inversion_loss", *TERMS, "adversarial")


@dataclass
class Pool:
    """The teachers as the inversion loss needs them, and the bank's class list."""

    teachers: list[Teacher]
    bank_classes: list[tuple[str, int]]  # (dataset, meta_train class id) of each bank row
    archs: list[str]
    image_sizes: list[int]
    state_dicts: list[dict[str, torch.Tensor]] = field(repr=False)


def load_teachers(folder: Path) -> Pool:
    """Load the pool once (the reference reloaded every teacher at every iteration)."""
    entries = load_pool(folder)
    keys = sorted({(r.dataset, cid) for r, _ in entries for cid in r.class_ids})
    row = {k: i for i, k in enumerate(keys)}
    teachers = [Teacher(model=m, classes=torch.tensor([row[(r.dataset, c)] for c in r.class_ids]),
                        arch=r.arch, image_size=r.image_size, mean=tuple(r.mean), std=tuple(r.std))
                for r, m in entries]
    return Pool(teachers, keys, [r.arch for r, _ in entries], [r.image_size for r, _ in entries],
                [m.state_dict() for _, m in entries])


def init_meta_model(params: Params, pool: Pool | None, image_size: int) -> Classifier:
    """Fresh meta-model (seeded), or the teachers' parameter average when ``average`` is set.

    Averaging needs every teacher to share the meta-model's architecture and input size;
    the head is averaged too when the teachers' heads have ``way_train`` outputs.
    """
    torch.manual_seed(params.seed)
    model = build_backbone(params.backbone, params.way_train, image_size, track_running_stats=False)
    if not params.average or pool is None:
        return model
    if set(pool.archs) != {params.backbone} or set(pool.image_sizes) != {image_size}:
        raise UserError(
            f"'average' is true but the pool mixes architectures/sizes {sorted(set(pool.archs))} / "
            f"{sorted(set(pool.image_sizes))}, which cannot be averaged into a {params.backbone} at "
            f"{image_size} px. Set average: false.")
    state = model.state_dict()
    for name in state:
        stack = [sd[name] for sd in pool.state_dicts if sd[name].shape == state[name].shape]
        if len(stack) == len(pool.state_dicts):
            state[name] = torch.stack(stack).float().mean(0)
    model.load_state_dict(state)
    return model


def sample_pseudo_tasks(bank: torch.Tensor, tasks: int, way: int, shot: int, query: int,
                        gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """T pseudo tasks from bank (C, P, 3, S, S): way classes among all C, disjoint images.

    Returns xs (T, way·shot, 3, S, S), ys (T, way·shot), xq (T, way·query, 3, S, S), yq (T, way·query).
    """
    n_cls, per_class = bank.shape[:2]
    cls = torch.stack([torch.randperm(n_cls, generator=gen)[:way] for _ in range(tasks)])
    pick = torch.stack([torch.stack([torch.randperm(per_class, generator=gen)[: shot + query]
                                     for _ in range(way)]) for _ in range(tasks)])
    cls, pick = cls.to(bank.device), pick.to(bank.device)
    imgs = bank[cls.unsqueeze(-1), pick]  # (T, way, shot+query, 3, S, S)
    xs = imgs[:, :, :shot].flatten(1, 2)
    xq = imgs[:, :, shot:].flatten(1, 2)
    ys = torch.arange(way, device=bank.device).repeat_interleave(shot).expand(tasks, -1)
    yq = torch.arange(way, device=bank.device).repeat_interleave(query).expand(tasks, -1)
    return xs, ys, xq, yq


def sample_real_tasks(imageset: ImageSet, tasks: int, way: int, shot: int, query: int,
                      gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Like :func:`sample_pseudo_tasks`, from real images (the oracle)."""
    triples = [sample_task_indices(imageset.by_class, way, shot, query, gen) for _ in range(tasks)]
    sup = torch.stack([t[1] for t in triples]).flatten(1)
    qry = torch.stack([t[2] for t in triples]).flatten(1)
    xs = imageset.normalize(imageset.images[sup].to(device))
    xq = imageset.normalize(imageset.images[qry].to(device))
    ys = torch.arange(way, device=device).repeat_interleave(shot).expand(tasks, -1)
    yq = torch.arange(way, device=device).repeat_interleave(query).expand(tasks, -1)
    return xs, ys, xq, yq


def bank_grid(bank: torch.Tensor, mean, std, classes: int = 10, per_class: int = 8) -> np.ndarray:
    """An RGB uint8 grid (rows = classes, columns = images) of the first bank rows, denormalised."""
    x = bank[:classes, :per_class].detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    c, p, _, s, _ = x.shape
    grid = x.clamp(0, 1).permute(0, 3, 1, 4, 2).reshape(c * s, p * s, 3)
    return (grid.numpy() * 255).round().astype(np.uint8)


# Parameters meta-training does not read (test time, the table, tracking) or reads through the
# pool (whose pool.json is part of the fingerprint): changing them must not discard a checkpoint.
NOT_TRAINING = ("episode_test", "icfil", "calibration.", "metatest.", "compare.", "tracking",
                "experiment_name", "glyphs.", "pretrain.", "pre_backbone", "pool_mode", "APInum",
                "way_pretrain", "pool_datasets", "metatrain.checkpoint_interval", "metatrain.image_interval")


def fingerprint(params: Params, pool_dir: Path, oracle: bool) -> str:
    """Identity of a run: a checkpoint is resumed (or reused) only by the run it belongs to."""
    pool_json = pool_dir / "pool.json"
    training = {k: v for k, v in params.flat().items() if not k.startswith(NOT_TRAINING)}
    blob = json.dumps({"params": training, "oracle": oracle,
                       "pool": pool_json.read_text() if pool_json.is_file() else None}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class MetaTrainer:
    """State and steps of one meta-training run (see the module docstring)."""

    def __init__(self, params: Params, root: Path, *, oracle: bool = False, device: torch.device | None = None,
                 ranks: Ranks = SINGLE):
        self.params = params
        self.ranks = ranks
        self.oracle = oracle
        self.device = device or pick_device(params.device)
        # vmap pays off where kernel launches dominate (CUDA); on a few CPU cores memory-bound
        # passes over the activations dominate, vmap adds layout copies and the loop is faster
        # (docs/performance.md).
        mode = params.metatrain.batching
        self.batched = mode == "vmap" or (mode == "auto" and self.device.type == "cuda")
        info = DATASETS[params.dataset]
        self.mean, self.std, self.image_size = info.mean, info.std, info.image_size
        data = root / "data" / params.dataset
        self.val = load_split(params.dataset, data, "meta_val")
        self.val.check_task_shape(params.way_test, params.num_sup_test, params.num_qur_test,
                                  ("way_test", "num_sup_test", "num_qur_test"))
        self.val_tasks = fixed_tasks(self.val, params.metatrain.val_episodes, params.way_test,
                                     params.num_sup_test, params.num_qur_test, seed=params.seed + 1)
        self.pool_dir = root / "models" / "teachers"
        self.pool = load_teachers(self.pool_dir)
        self.model = init_meta_model(params, self.pool, self.image_size).to(self.device)
        self.learner = MetaLearner(self.model, params.meta_learner, params.inner_update_num,
                                   params.inner_lr, first_order=params.approx)
        self.tester = MetaLearner(self.model, params.meta_learner, params.test_inner_update_num,
                                  params.inner_lr)
        self.gen = torch.Generator().manual_seed(params.seed)
        if oracle:
            self.real = load_split(params.dataset, data, "meta_train")
            self.real.check_task_shape(params.way_train, params.num_sup_train, params.num_qur_train,
                                       ("way_train", "num_sup_train", "num_qur_train"))
            self.bank = None
        else:
            n_cls = len(self.pool.bank_classes)
            if params.way_train > n_cls:
                raise UserError(f"'way_train' is {params.way_train} but the teachers know only {n_cls} "
                                "classes; lower 'way_train'.")
            if params.num_sup_train + params.num_qur_train > params.synthesis_per_class:
                raise UserError(
                    f"'num_sup_train' + 'num_qur_train' = {params.num_sup_train + params.num_qur_train} "
                    f"exceeds 'synthesis_per_class' = {params.synthesis_per_class}; raise "
                    "'synthesis_per_class' (the reference uses shots + queries).")
            self.bank = Bank(n_cls, params.synthesis_per_class, self.image_size, self.gen).to(self.device)
            self.inversion = InversionLoss(
                self.pool.teachers, self.mean, self.std, self.image_size, params.inversion.bn,
                params.inversion.tv, params.inversion.l2, batched=self.batched,
                autocast_bf16=params.inversion.bf16).to(self.device)
            self.bank_opt = torch.optim.Adam(self.bank.parameters(), lr=params.inversion.lr)
            self.good_bank = self.bank.images.detach().clone()
        self.meta_opt = torch.optim.Adam(self.model.parameters(), lr=params.outer_lr)
        self.curriculum = Curriculum(params.adv_start, params.patience, enabled=params.eci and not oracle)
        self.iteration = 0
        self.skipped = 0
        self.history: dict[str, list[float]] = {c: [] for c in TRAIN_COLUMNS}
        self.val_history: dict[str, list[float]] = {"iteration": [], "val_accuracy": []}
        self.best = {"accuracy": -1.0, "iteration": -1}

    # -- one meta-iteration ----------------------------------------------------------------
    def params_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def bank_step(self) -> tuple[dict[str, torch.Tensor], bool]:
        """One Adam step on the bank; returns the inversion terms and whether it was adversarial."""
        p = self.params
        if not torch.isfinite(self.bank.images).all():
            # A non-finite image would poison every later loss: roll back to the last good bank.
            with torch.no_grad():
                self.bank.images.copy_(self.good_bank)
            self.skipped += 1
        shift = random_shift(p.inversion.jitter, self.gen)
        n = len(self.pool.teachers)
        chosen = (torch.randperm(n, generator=self.gen)[: p.candidate_size]
                  if 0 < p.candidate_size < n else torch.arange(n))
        # Every rank draws the same teachers; each scores its share and the gradients are summed.
        mine = chosen[list(self.ranks.share(len(chosen)))]
        terms = self.inversion(self.bank.images, shift, mine)
        loss = terms["loss"]
        adversarial = self.curriculum.take()
        if adversarial:
            xs, ys, xq, yq = sample_pseudo_tasks(self.bank.images, 1, p.way_train, p.num_sup_train,
                                                 p.num_qur_train, self.gen)
            if self.ranks.is_main:  # counted once over all ranks
                outer, _ = self.learner.task_loss(self.params_dict(), xs[0], ys[0], xq[0], yq[0], p.way_train)
                loss = loss - p.adv_scale * outer
        g = (torch.autograd.grad(loss, [self.bank.images])[0] if loss.requires_grad
             else torch.zeros_like(self.bank.images))  # a rank with no teacher this update
        summed = torch.stack([terms[k] for k in (*TERMS, "loss")]).detach()
        finite = (torch.isfinite(loss) & torch.isfinite(g).all()).float().reshape(1)
        self.ranks.sum_(g, summed, finite)
        terms = {k: summed[i] for i, k in enumerate((*TERMS, "loss"))}
        if bool(finite == self.ranks.world):
            self.bank_opt.zero_grad(set_to_none=False)
            self.bank.images.grad = g
            self.bank_opt.step()
            self.good_bank.copy_(self.bank.images.detach())
        else:
            self.skipped += 1
        return {k: v.detach() for k, v in terms.items()}, adversarial

    def meta_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step on θ over ``episode_batch`` tasks; returns (meta loss, mean accuracy)."""
        p = self.params
        if self.oracle:
            tasks = sample_real_tasks(self.real, p.episode_batch, p.way_train, p.num_sup_train,
                                      p.num_qur_train, self.gen, self.device)
        else:
            tasks = sample_pseudo_tasks(self.bank.images.detach(), p.episode_batch, p.way_train,
                                        p.num_sup_train, p.num_qur_train, self.gen)
        params = self.params_dict()
        share = list(self.ranks.share(p.episode_batch))  # this rank's tasks of the meta-batch
        if share:
            losses, accs = self.learner.batch_loss(params, *(t[share] for t in tasks), p.way_train,
                                                   batched=self.batched)
            loss = losses.sum()
            grads = list(torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True))
            stats = torch.stack([loss.detach(), accs.sum().detach()])
        else:
            grads = [torch.zeros_like(v) for v in params.values()]
            stats = torch.zeros(2, device=self.device)
        self.ranks.sum_(*grads, stats)
        if bool(torch.isfinite(stats).all() & torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.meta_opt.zero_grad(set_to_none=False)
            for prm, g in zip(params.values(), grads, strict=True):
                prm.grad = g
            self.meta_opt.step()
        else:
            self.skipped += 1
        return stats[0], stats[1] / p.episode_batch

    def step(self) -> dict[str, float]:
        """One meta-iteration; returns its row of the training curve."""
        terms, adversarial = ({k: torch.zeros(()) for k in (*TERMS, "loss")}, False) if self.oracle \
            else self.bank_step()
        loss, acc = self.meta_step()
        row = {"iteration": self.iteration, "meta_loss": float(loss), "pseudo_accuracy": float(acc),
               "inversion_loss": float(terms["loss"]), **{k: float(terms[k]) for k in TERMS},
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
        accs = task_accuracies(self.tester, self.params_dict(), self.val, self.val_tasks)
        return 100.0 * mean_ci95(accs)[0]

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "iteration": self.iteration, "model": self.model.state_dict(),
            "meta_opt": self.meta_opt.state_dict(), "curriculum": self.curriculum.state_dict(),
            "generator": self.gen.get_state(), "history": self.history, "val_history": self.val_history,
            "best": self.best, "skipped": self.skipped,
        }
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
        if self.bank is not None:
            with torch.no_grad():
                self.bank.images.copy_(state["bank"].to(self.device))
            self.good_bank.copy_(self.bank.images.detach())
            self.bank_opt.load_state_dict(state["bank_opt"])


def model_card(params: Params, trainer: MetaTrainer, iteration: int, accuracy: float) -> dict:
    """What a checkpoint needs to be rebuilt and used (written beside its weights)."""
    return {"backbone": params.backbone, "way": params.way_train, "image_size": trainer.image_size,
            "meta_learner": params.meta_learner, "dataset": params.dataset, "iteration": iteration,
            "val_accuracy": accuracy, "mean": list(trainer.mean), "std": list(trainer.std),
            "oracle": trainer.oracle}


def save_model(model: Classifier, card: dict, stem: Path) -> None:
    """Write ``<stem>.safetensors`` (weights) and ``<stem>.json`` (its model card), atomically."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_with(stem.with_suffix(".safetensors"), lambda tmp: save_file(weights, str(tmp)))
    write_json(stem.with_suffix(".json"), card)


def load_model(stem: Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a meta-model saved by :func:`save_model` (no unpickling: safetensors + JSON)."""
    weights, card_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.is_file() or not card_path.is_file():
        raise UserError(f"meta-model {weights} (and its .json card) not found: run `purer metatrain` "
                        "(or `dvc repro metatrain`) first.")
    try:
        card = json.loads(card_path.read_text())
        model = build_backbone(card["backbone"], card["way"], card["image_size"], track_running_stats=False)
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise UserError(f"meta-model {weights} is unreadable or does not match its card ({err}); "
                        "re-run `purer metatrain`.") from err
    return model.to(device), card


def run(params: Params, root: Path, *, models_dir: Path | None = None, results_dir: Path | None = None,
        oracle: bool = False, progress: bool = True, tracker: Tracker | None = None,
        reuse_complete: bool = False, ranks: Ranks = SINGLE) -> dict:
    """Meta-train, checkpointing ``last.pt`` and the best-on-meta-val ``best.safetensors``.

    A ``last.pt`` left by an interrupted run with the same parameters and pool is resumed;
    any other is ignored and overwritten. With ``reuse_complete`` a finished run with the same
    parameters is not repeated (the comparison table uses it). Under ``torchrun`` every rank
    runs the loop on its share of the work and only rank 0 validates and writes. Returns the
    metrics written to ``metrics.json``.
    """
    tracker = tracker or Tracker()
    models_dir = models_dir or root / "models" / "meta"
    results_dir = results_dir or root / "results" / "metatrain"
    started = time.perf_counter()
    trainer = MetaTrainer(params, root, oracle=oracle, ranks=ranks)
    total = params.meta_iterations
    mt = params.metatrain
    fp = fingerprint(params, trainer.pool_dir, oracle)
    last = models_dir / "last.pt"
    resumed_from = 0
    if last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt checkpoint is not resumable: start over
            state = None
        if state is not None and state.get("fingerprint") == fp:
            if state["iteration"] < total:
                trainer.load_state_dict(state)
                resumed_from = trainer.iteration
            elif reuse_complete and (results_dir / "metrics.json").is_file():
                return json.loads((results_dir / "metrics.json").read_text())

    def save_last(tmp: Path) -> None:
        # Through a file object: torch names the zip's root folder after a *path*'s stem (here the
        # random temp name), which would make two identical runs' last.pt differ in bytes.
        with open(tmp, "wb") as f:
            torch.save({"fingerprint": fp, **trainer.state_dict()}, f)

    def checkpoint() -> None:
        write_with(last, save_last)
        write_csv(results_dir / "train.csv", trainer.history)
        write_csv(results_dir / "val.csv", trainer.val_history)

    def save_images() -> None:
        if trainer.bank is None:
            return
        grid = bank_grid(trainer.bank.images, trainer.mean, trainer.std)
        path = results_dir / "bank" / f"iter_{trainer.iteration:06d}.png"
        write_with(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        write_with(results_dir / "bank.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        tracker.log_image(path, key="bank", step=trainer.iteration)

    def evaluate() -> float:
        acc = trainer.validate()
        trainer.val_history["iteration"].append(trainer.iteration)
        trainer.val_history["val_accuracy"].append(acc)
        tracker.log_metrics({"val_accuracy": acc}, step=trainer.iteration)
        card = model_card(params, trainer, trainer.iteration, acc)
        # Every validated model is kept (small) so metatest can also report the reference
        # code's optimistic protocol (best *test* accuracy over checkpoints), clearly labelled.
        save_model(trainer.model, card, models_dir / "history" / f"iter_{trainer.iteration:06d}")
        if acc > trainer.best["accuracy"]:
            trainer.best = {"accuracy": acc, "iteration": trainer.iteration}
            save_model(trainer.model, card, models_dir / "best")
        return acc

    main = ranks.is_main  # the other ranks only compute their share of each iteration
    if resumed_from == 0 and main:
        shutil.rmtree(models_dir / "history", ignore_errors=True)  # a previous run's checkpoints
        evaluate()
        save_images()
    bar = tqdm(total=total, initial=resumed_from, desc="metatrain", disable=not (progress and main))
    while trainer.iteration < total:
        row = trainer.step()
        bar.update(1)
        if not main:
            continue
        tracker.log_metrics({k: row[k] for k in TRAIN_COLUMNS if k != "iteration"}, step=row["iteration"])
        it = trainer.iteration
        if it % mt.val_interval == 0 or it == total:
            acc = evaluate()
            bar.set_postfix(loss=f"{row['meta_loss']:.3f}", acc=f"{row['pseudo_accuracy']:.2f}",
                            val=f"{acc:.1f}", best=f"{trainer.best['accuracy']:.1f}")
        if it % mt.image_interval == 0 or it == total:
            save_images()
        if it % mt.checkpoint_interval == 0 or it == total:
            checkpoint()
    bar.close()
    if not main:
        return {}
    checkpoint()
    save_model(trainer.model, model_card(params, trainer, trainer.iteration,
                                         trainer.val_history["val_accuracy"][-1]), models_dir / "last")
    vals = trainer.val_history["val_accuracy"]
    metrics = {
        "init_val_accuracy": vals[0], "best_val_accuracy": trainer.best["accuracy"],
        "best_iteration": trainer.best["iteration"], "final_val_accuracy": vals[-1],
        "iterations": trainer.iteration, "adversarial_updates": trainer.curriculum.fired,
        "skipped_updates": trainer.skipped, "resumed_from": resumed_from, "oracle": oracle,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if not all(math.isfinite(v) for v in vals):
        raise UserError("meta-validation accuracy is not finite; the run diverged. Lower outer_lr or inversion.lr.")
    write_json(results_dir / "metrics.json", metrics)
    return metrics
