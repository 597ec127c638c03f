"""Every knob of the pipeline, declared once (default, type, range, help, stages that read it).

The seed's command-line option names (``dataset``, ``num_sup_train``, ``adv_scale``, ...)
are top-level keys, so ``dvc exp run -S adv_scale=0.5`` reads like the seed's flags.
Knobs the seed never exposed live in sections (``glyphs``, ``pretrain``, ``inversion``,
``metatrain``, ``metatest``, ``calibration``, ``compare``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..data.registry import DATASETS, FOLDER
from ..models.backbones import ARCHITECTURES
from ..models.learners import LEARNERS
from .knobs import (
    DATA,
    FILELIST,
    MAX_SEED,
    METATEST,
    METATRAIN,
    POOL,
    PREPARE,
    PRETRAIN,
    RUNTIME,
    TESTING,
    TRAINING,
    knob,
    section,
)

BACKBONES = tuple(ARCHITECTURES)
META_LEARNERS = tuple(LEARNERS)
METHODS = ("random", "average", "ei", "purer", "purer+icfil", "oracle", "teacher-best", "teacher-mean",
           "teachers-ensemble")
TRAIN, TEST = (METATRAIN,), (METATRAIN, METATEST)  # meta-val tasks are shaped like meta-test ones


@dataclass(frozen=True)
class GlyphsParams:
    """Glyph-FS generation (stage ``prepare``)."""

    images_per_class: int = knob(100, "Glyph-FS images rendered per character class (600 gives CIFAR-FS's size)",
                                 PREPARE, ge=1)
    seed: int = knob(0, "Glyph-FS generator seed: same seed, same bytes", PREPARE, ge=0, le=MAX_SEED)


@dataclass(frozen=True)
class FolderParams:
    """The user's own dataset ``folder`` (``data/raw/folder/`` in the seed's layout; README "Datasets")."""

    image_size: int = knob(32, "side in pixels the images of dataset `folder` are resized to", FILELIST, ge=8)
    mean: list = knob([], "RGB normalisation mean of dataset `folder`, in [0, 1]; empty: computed from its "
                      "meta-train images (recorded in data/folder/split/normalisation.json)", FILELIST)
    std: list = knob([], "RGB normalisation std of dataset `folder`; empty: computed like `mean`", FILELIST)


@dataclass(frozen=True)
class AugmentParams:
    """What teacher pretraining may change in an image without changing its class (recipe `purer-mlops`)."""

    flip: str = knob("auto", "mirror images left to right: `on` where a mirror image keeps its class (photos), "
                     "`off` where it does not (characters); `auto`: the dataset's (on for the photo datasets, off "
                     "for glyphs and folder)", PRETRAIN, choices=("auto", "on", "off"))
    recolour: str = knob("auto", "permute the RGB channels and invert: `on` where colour carries no class "
                         "information; `auto`: the dataset's (on for glyphs; folder: measured by filelist)", PRETRAIN,
                         choices=("auto", "on", "off"))
    crop_pad: int = knob(-1, "pixels of padding before a random crop back to the image size (0: no crops); -1: "
                         "the dataset's (about 1/8 of the side)", PRETRAIN, ge=-1)


@dataclass(frozen=True)
class PretrainParams:
    """Teacher pretraining (stage ``pretrain``); docs/teachers.md compares the two recipes."""

    recipe: str = knob("purer-mlops", "`purer-mlops`: augmentation suited to the dataset + cosine schedule; "
                       "`reference`: the authors' initialisation and step schedule, no augmentation", PRETRAIN,
                       choices=("purer-mlops", "reference"))
    steps: int = knob(300, "optimiser steps of one segment of a teacher's training when `epochs` is 0 (whole "
                      "epochs, one cosine schedule; small datasets get more epochs)", PRETRAIN, ge=1)
    max_steps: int = knob(1500, "cap on a teacher's optimiser steps: further segments of `steps` are trained while "
                          "the held-out accuracy still rises and the next one fits under this cap", PRETRAIN, ge=1)
    patience: int = knob(100, "steps at the end of a segment within which the held-out accuracy must have risen "
                         "(beyond `min_delta`) for another segment to follow; else the curve is on a plateau",
                         PRETRAIN, ge=1)
    min_delta: float = knob(0.0, "rise of held-out accuracy (percentage points) that counts as progress", PRETRAIN,
                            ge=0.0)
    eval_every: int = knob(0, "optimiser steps between held-out evaluations (0: after every epoch)", PRETRAIN, ge=0)
    restarts: int = knob(2, "new initialisations (and batch orders) tried for a teacher whose first segment ends "
                         "near chance (see `restart_below`)", PRETRAIN, ge=0)
    restart_below: float = knob(2.0, "a first segment whose best held-out accuracy is below this multiple of chance "
                                "(100 / `way_pretrain` %) is started again", PRETRAIN, ge=0.0)
    epochs: int = knob(0, "0: as many epochs as `steps` needs; else exactly this many (reference: 60); the "
                       "epoch best on the held-out images is kept", PRETRAIN, ge=0)
    batch_size: int = knob(64, "teacher training batch size (reference: 128)", PRETRAIN, ge=1)
    holdout: float = knob(0.2, "per-class fraction of a teacher's images held out to pick its best epoch",
                          PRETRAIN, gt=0.0, le=0.5)
    conv4_lr: float = knob(0.01, "Adam learning rate of conv4 teachers", PRETRAIN, gt=0.0)
    resnet_lr: float = knob(0.01, "SGD learning rate of ResNet teachers", PRETRAIN, gt=0.0)
    momentum: float = knob(0.9, "SGD momentum of ResNet teachers", PRETRAIN, ge=0.0, le=1.0)
    weight_decay: float = knob(5e-4, "weight decay of teacher training", PRETRAIN, ge=0.0)
    grad_clip: float = knob(50.0, "gradient-norm clip of teacher training", PRETRAIN, gt=0.0)
    compile: bool = knob(False, "`torch.compile` the teachers' training forward and backward (compiled at "
                         "the first step and for the last, smaller batch of an epoch)", PRETRAIN)
    min_accuracy: float = knob(50.0, "held-out accuracy (percent) every teacher must reach, else the stage "
                               "fails with the per-teacher table (chance is 100 / `way_pretrain`)", PRETRAIN,
                               ge=0.0, le=100.0)


@dataclass(frozen=True)
class InversionParams:
    """The learnable bank and the inversion loss (DeepInversion priors)."""

    lr: float = knob(0.25, "Adam learning rate of the bank (PURER 0.25, PURER-Plus `Glr` 0.01)", *TEST, gt=0.0)
    bn: float = knob(0.01, "weight of the BatchNorm-statistics term of the inversion loss", *TEST, ge=0.0)
    tv: float = knob(1e-4, "weight of the total-variation term", *TEST, ge=0.0)
    l2: float = knob(1e-5, "weight of the l2 term", *TEST, ge=0.0)
    jitter: int = knob(2, "random roll of the bank, in pixels, each direction", *TEST, ge=0)
    bf16: bool = knob(False, "bf16 autocast for the teachers' forward pass (CPU and CUDA; fp32 when false)", *TEST)


@dataclass(frozen=True)
class MetatrainParams:
    """Meta-training bookkeeping (stage ``metatrain``)."""

    val_interval: int = knob(250, "meta-iterations between meta-val evaluations (best model chosen on meta-val)",
                             *TRAIN, ge=1)
    val_episodes: int = knob(100, "meta-val tasks per evaluation (fixed, seeded)", *TRAIN, ge=1)
    checkpoint_interval: int = knob(50, "meta-iterations between `models/meta/last.pt` checkpoints (resume)",
                                    *TRAIN, ge=1, bookkeeping=True)
    image_interval: int = knob(250, "meta-iterations between bank image grids", *TRAIN, ge=1, bookkeeping=True)
    compile: bool = knob(False, "`torch.compile` the conv4 teachers' scoring in the bank update and each step "
                         "of meta-val's test-time adaptation (compiled at first use, seconds to a "
                         "minute)", *TRAIN)


@dataclass(frozen=True)
class DistillParams:
    """Data-free embedding distillation during meta-training (docs/distillation.md)."""

    weight: float = knob(0.0, "weight of the distillation loss added to the meta loss (0: the paper's PURER, "
                         "bit for bit)", *TRAIN, ge=0.0)
    feature: float = knob(1.0, "weight of the feature-regression term: cosine between each teacher's embedding "
                          "and a learned linear projection of the meta-model's", *TRAIN, ge=0.0)
    relation: float = knob(0.0, "weight of the relational term: the meta-model's cosine-similarity matrix over "
                           "the batch against the teachers' mean one", *TRAIN, ge=0.0)
    soft: float = knob(0.0, "weight of the soft-label term: KL from the teachers' mean nearest-prototype "
                       "probabilities over the batch's classes to the meta-model's", *TRAIN, ge=0.0)
    temperature: float = knob(0.1, "temperature of the soft-label term's cosine softmax", *TRAIN, gt=0.0)
    classes: int = knob(16, "bank classes per distillation batch", *TRAIN, ge=2)
    per_class: int = knob(4, "bank images per class of a distillation batch (at most `synthesis_per_class`)",
                          *TRAIN, ge=1)
    teachers: int = knob(0, "teachers whose embeddings a distillation batch uses, drawn at random each "
                         "meta-iteration (0: all); fewer is cheaper", *TRAIN, ge=0)
    bn_group: int = knob(0, "images per batch of the meta-model's batch-statistics BatchNorm in the distillation "
                         "forward, one per class (5: like a 5-way 1-shot support at test time; 0: the whole "
                         "batch)", *TRAIN, ge=0)
    shift: float = knob(2.0, "random shift of each distilled view, in pixels each way (sub-pixel, bilinear)",
                        *TRAIN, ge=0.0)
    noise: float = knob(0.1, "std of the Gaussian noise added to each distilled view", *TRAIN, ge=0.0)
    mix: float = knob(0.0, "largest share of another bank image mixed into a view (0: no mixing)", *TRAIN,
                      ge=0.0, le=0.5)
    projection_lr: float = knob(0.001, "Adam learning rate of the per-teacher projections of the feature term",
                                *TRAIN, gt=0.0)
    start: str = knob("pool", "the meta-model's start: `pool` (as `average` says: the teachers' average or a "
                      "fresh initialisation) or `best_teacher` (the teacher whose embedding is the best "
                      "nearest-prototype classifier on the meta-val tasks)", *TRAIN, choices=("pool", "best_teacher"))


@dataclass(frozen=True)
class MetatestParams:
    """Meta-testing (stage ``metatest``)."""

    seed: int = knob(2023, "seed of the fixed meta-test tasks, shared by every method", METATEST, ge=0,
                     le=MAX_SEED)
    reference_protocol: bool = knob(False, "also report the reference code's best TEST accuracy over all "
                                    "validated checkpoints (optimistic; one meta-test per checkpoint)", METATEST)
    compile: bool = knob(False, "`torch.compile` each step of test-time adaptation (MAML, ANIL; compiled at "
                         "first use, seconds to a minute)", METATEST)


@dataclass(frozen=True)
class CalibrationParams:
    """ICFIL knobs (used when ``icfil`` is on); see docs/icfil.md. Defaults: chosen on the default
    PURER model's meta-val (``scripts/icfil_search.py``, configuration F0 of docs/icfil.md: noisy
    support copies, head calibration); the term weights are those of the full formulation (G3),
    which ``inversion_steps`` > 0 switches on."""

    images_per_class: int = knob(2, "ICFIL pseudo images synthesised per class of the task", METATEST, ge=1)
    init_noise: float = knob(0.5, "std of the Gaussian noise added to the support images that start the pseudo "
                             "images", METATEST, ge=0.0)
    inversion_steps: int = knob(0, "ICFIL Adam steps synthesising the pseudo images (0: noisy support copies)",
                                METATEST, ge=0)
    inversion_lr: float = knob(0.1, "ICFIL inversion learning rate", METATEST, gt=0.0)
    hard_weight: float = knob(1.0, "weight of the hardness term: the adapted model's probability of the pseudo "
                              "image's class (> 0 pushes pseudo images to be hard; < 0 to be confirmed)", METATEST)
    feature_weight: float = knob(1.0, "weight of the fidelity term: distance of each pseudo image to its class's "
                                 "support mean in the embedding of the meta-model before adaptation", METATEST,
                                 ge=0.0)
    diversity_weight: float = knob(0.5, "weight of the diversity term: mean cosine similarity between pseudo "
                                   "images of one class", METATEST, ge=0.0)
    bn_weight: float = knob(0.1, "weight of the BatchNorm prior: distance of the pseudo images' per-layer "
                            "statistics to the real support's", METATEST, ge=0.0)
    calibrate: str = knob("head", "what the calibration trains: `head`, `last` (head and the last block from its "
                          "last convolution on) or `all` (every weight)", METATEST,
                          choices=("head", "last", "all"))
    calibration_steps: int = knob(10, "ICFIL calibration SGD steps on support + pseudo data", METATEST, ge=0)
    calibration_lr: float = knob(0.1, "ICFIL calibration learning rate", METATEST, gt=0.0)
    pseudo_weight: float = knob(1.0, "weight of the pseudo data in the calibration loss", METATEST, ge=0.0)


@dataclass(frozen=True)
class CompareParams:
    """The comparison table (compare/dvc.yaml, which reads the whole params.yaml)."""

    methods: list = knob(list(METHODS), "rows of the comparison table: subset of " + ", ".join(METHODS))
    shots: list = knob([1, 5], "support shots of the comparison table's columns")


@dataclass(frozen=True)
class Params:
    """Every knob of the pipeline. See ``params.yaml`` for the documented defaults."""

    # data
    dataset: str = knob("glyphs", "dataset the meta-model is tested on (and, unless `pool_datasets` says "
                        "otherwise, the teachers are trained on): `glyphs` is generated; the others are laid "
                        "out from `data/raw/`; `folder` is your own images, declared in section `folder`",
                        PREPARE, FILELIST, PRETRAIN, METATRAIN, METATEST,
                        choices=tuple(DATASETS), group=DATA)
    seed: int = knob(0, "global seed of teacher pretraining and meta-training", PRETRAIN, METATRAIN, ge=0,
                     le=MAX_SEED, group=DATA)
    # teacher pool
    pre_backbone: str = knob("conv4", "teacher architecture; `mix` cycles conv4, resnet10, resnet18 over the pool",
                             PRETRAIN, choices=(*BACKBONES, "mix"), group=POOL)
    pool_mode: str = knob("blocks", "`blocks`: teachers own consecutive blocks of `way_pretrain` meta-train "
                          "classes (PURER); `random`: `APInum` teachers on random class subsets (PURER-Plus)",
                          PRETRAIN, choices=("blocks", "random"), group=POOL)
    APInum: int = knob(100, "teachers of a `random` pool (PURER-Plus)", PRETRAIN, ge=1, group=POOL)
    way_pretrain: int = knob(5, "classes per teacher", PRETRAIN, ge=2, group=POOL)
    pool_datasets: list = knob([], "datasets the teachers are trained on (multi-heterogeneous scenario); "
                               "empty: `[dataset]`", PRETRAIN, group=POOL)
    # meta-model and meta-training
    backbone: str = knob("conv4", "meta-model architecture", *TRAIN, choices=BACKBONES, group=TRAINING)
    meta_learner: str = knob("maml", "meta-learning algorithm: a name in `LEARNERS` (models/learners.py), such as "
                             "`maml`, `anil`, `protonet`", *TRAIN,
                             choices=META_LEARNERS, group=TRAINING)
    way_train: int = knob(5, "classes per meta-training task (N-way)", *TRAIN, ge=2, group=TRAINING)
    num_sup_train: int = knob(1, "support images per class of a meta-training task (K-shot)", *TRAIN, ge=1,
                              group=TRAINING)
    num_qur_train: int = knob(5, "query images per class of a meta-training task", *TRAIN, ge=1, group=TRAINING)
    episode_train: int = knob(6000, "meta-training tasks in total; meta-iterations = `episode_train / "
                              "episode_batch`", *TRAIN, ge=1, group=TRAINING)
    episode_batch: int = knob(4, "tasks per meta-iteration", *TRAIN, ge=1, group=TRAINING)
    inner_update_num: int = knob(1, "inner-loop gradient steps during meta-training", *TRAIN, ge=0, group=TRAINING)
    inner_lr: float = knob(0.05, "inner-loop learning rate (the reference 0.01)", *TEST, gt=0.0, group=TRAINING)
    outer_lr: float = knob(0.001, "outer-loop (meta-model) Adam learning rate", *TRAIN, gt=0.0, group=TRAINING)
    approx: bool = knob(False, "first-order MAML (no second derivatives)", *TRAIN, group=TRAINING)
    synthesis_per_class: int = knob(6, "learnable bank images per class (shots + queries of the pseudo tasks)",
                                    *TRAIN, ge=2, group=TRAINING)
    adv_scale: float = knob(10.0, "weight of the adversarial (curriculum) term of the bank update", *TRAIN,
                            ge=0.0, group=TRAINING)
    adv_start: int = knob(100, "meta-iteration at which the curriculum switch may first turn on", *TRAIN, ge=0,
                          group=TRAINING)
    patience: int = knob(6, "meta-iterations without progress before the switch turns on again", *TRAIN, ge=1,
                         group=TRAINING)
    eci: bool = knob(True, "curriculum switch on (ECI); `false` gives the EI ablation", *TRAIN, group=TRAINING)
    average: bool = knob(True, "start the meta-model from the teachers' parameter average (needs teachers of "
                         "the meta-model's architecture and resolution)", *TRAIN, group=TRAINING)
    candidate_size: int = knob(0, "teachers sampled per bank update (0: all; PURER-Plus uses 13)", *TRAIN, ge=0,
                               group=TRAINING)
    # meta-testing
    way_test: int = knob(5, "classes per meta-test (and meta-val) task", *TEST, ge=2, group=TESTING)
    num_sup_test: int = knob(1, "support images per class of a meta-test task", *TEST, ge=1, group=TESTING)
    num_qur_test: int = knob(15, "query images per class of a meta-test task", *TEST, ge=1, group=TESTING)
    episode_test: int = knob(600, "meta-test tasks (fixed by `metatest.seed`)", METATEST, ge=1, group=TESTING)
    test_inner_update_num: int = knob(10, "inner-loop steps when adapting to a meta-val / meta-test task", *TEST,
                                      ge=0, group=TESTING)
    icfil: bool = knob(False, "inversion calibration following the inner loop (test time)", METATEST,
                       group=TESTING)
    # where to compute, tracking
    device: str = knob("auto", "where to compute: `auto` (CUDA when present, else CPU), `cpu`, `cuda`",
                       PRETRAIN, *TEST, choices=("auto", "cpu", "cuda"), group=RUNTIME)
    lanes: int = knob(0, "CPU threads split into lanes that compute side by side the teachers of pretraining "
                      "and of a bank update, and the tasks of a meta-batch, meta-val and meta-test "
                      "(docs/performance.md): `0` (auto) gives 2 on a CPU with 2 threads or more; CUDA, "
                      "`*.compile` and ICFIL keep 1", PRETRAIN, *TEST, ge=0, group=RUNTIME)
    tracking: bool = knob(True, "log params, metrics and artifacts to MLflow", *TEST, group=RUNTIME,
                          bookkeeping=True)
    experiment_name: str = knob("purer", "MLflow experiment name", *TEST, group=RUNTIME, bookkeeping=True)
    tracking_system_metrics: bool = knob(False, "also log CPU, memory (and GPU) use as MLflow system metrics, "
                                         "sampled every 10 s", *TEST, group=RUNTIME, bookkeeping=True)
    # sections
    glyphs: GlyphsParams = section(GlyphsParams, DATA)
    folder: FolderParams = section(FolderParams, DATA)
    pretrain: PretrainParams = section(PretrainParams, POOL)
    augment: AugmentParams = section(AugmentParams, POOL)
    inversion: InversionParams = section(InversionParams, TRAINING)
    metatrain: MetatrainParams = section(MetatrainParams, TRAINING)
    distill: DistillParams = section(DistillParams, TRAINING)
    metatest: MetatestParams = section(MetatestParams, TESTING)
    calibration: CalibrationParams = section(CalibrationParams, TESTING)
    compare: CompareParams = section(CompareParams, TESTING)

    @property
    def teacher_datasets(self) -> list[str]:
        """Datasets the teacher pool is built from."""
        return list(self.pool_datasets) or [self.dataset]

    def image_size(self, dataset: str) -> int:
        """Side in pixels of the images of ``dataset`` (``folder``: as declared in ``folder.image_size``)."""
        return self.folder.image_size if dataset == FOLDER else DATASETS[dataset].image_size

    @property
    def meta_iterations(self) -> int:
        """Meta-iterations: the reference counts tasks, one iteration is ``episode_batch`` tasks."""
        return max(1, self.episode_train // self.episode_batch)

    def flat(self) -> dict[str, Any]:
        """All parameters with dotted names for sections (``inversion.lr``), for logging."""
        out: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, dict):
                out.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                out[name] = value
        return out

    def replace(self, **changes: Any) -> Params:
        """A copy with some top-level or dotted (``section.key``) values changed, validated."""
        from .loading import with_changes

        return with_changes(self, changes)
