"""Benchmarks of teacher pretraining: one default Glyph-FS teacher, and the augmentation alone.

    pytest tests/benchmarks/test_pretrain_teacher.py --benchmark-only --benchmark-group-by=group

One teacher of the default pool: 5 classes × 100 images at 32 px (80 train, 20 held out),
``pretrain.steps`` 300 at batch 64 (43 epochs), with the default recipe (crops and recolouring)
and with the reference recipe at the same length (no augmentation), so their ratio is the cost
of augmenting; ``purer-mlops_compiled`` adds ``pretrain.compile`` (its compilation timed apart,
in a first teacher). The 13 teachers of the default pool take 13 times the first. Images are random:
the arithmetic does not depend on what they show. ``PURER_BENCH_DEVICE=cuda`` runs on the GPU.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from purer_mlops.config import from_dict
from purer_mlops.data.dataset import ImageSet
from purer_mlops.data.registry import DATASETS
from purer_mlops.teachers.augment import Augmentation
from purer_mlops.teachers.training import plan_pool, train_teacher

DEVICE = os.environ.get("PURER_BENCH_DEVICE", "cpu")


@pytest.fixture(scope="module")
def imageset() -> ImageSet:
    info = DATASETS["glyphs"]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return ImageSet(images=images, labels=torch.arange(5).repeat_interleave(100),
                    classes=[f"class_{c}" for c in range(5)], mean=info.mean, std=info.std, name="glyphs/meta_train")


@pytest.mark.parametrize("variant", ["purer-mlops", "reference", "purer-mlops_compiled"])
def test_one_default_teacher(benchmark, imageset: ImageSet, variant: str, capsys) -> None:
    recipe, compiled = variant.removesuffix("_compiled"), variant.endswith("_compiled")
    params = from_dict({"pretrain": {"recipe": recipe, "min_accuracy": 0.0, "compile": compiled,
                                      "max_steps": 300}})
    spec = plan_pool(params, {"glyphs": 5})[0]
    benchmark.group = "pretrain_teacher"
    benchmark.name = f"pretrain_teacher_{variant}"
    if compiled:  # the first teacher compiles (its full and its last batch): timed apart
        started = time.perf_counter()
        train_teacher(spec, imageset, params, DEVICE)
        with capsys.disabled():
            print(f"\n[pretrain_teacher] first compiled teacher (compiling) {time.perf_counter() - started:.1f} s")
    trained = benchmark.pedantic(lambda: train_teacher(spec, imageset, params, DEVICE), rounds=3,
                                 warmup_rounds=0, iterations=1)
    assert (trained.epochs, trained.steps) == (43, 301)


def test_augment_one_batch(benchmark) -> None:
    info = DATASETS["glyphs"]
    aug = Augmentation.for_dataset("glyphs", from_dict({}), info.mean, info.std)
    x = torch.randn(400, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    padded = aug.prepare(x)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(400, generator=gen)[:64].to(DEVICE)
    benchmark.group = "pretrain_augment"
    out = benchmark(lambda: aug.batch(padded, idx, 32, gen))
    assert out.shape == (64, 3, 32, 32)
