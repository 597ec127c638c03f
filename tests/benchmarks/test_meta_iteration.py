"""Benchmarks of one PURER meta-iteration (bank update with the adversarial term + meta update).

Each setting times the ``plain`` path (the per-teacher, per-task yardstick of
:mod:`purer_mlops.meta.plain_reference`) and the ``fast`` one (production's) in the same run, in
one benchmark group, so their ratio is read off the same table:

    pytest tests/benchmarks -o addopts="" --benchmark-only --benchmark-group-by=group -k 5w5s

After each ``fast`` benchmark one line is printed: the iteration's FLOPs (convolutions and
matrix products, by ``torch.utils.flop_counter``), the GFLOP/s the fast path achieves, a dense
fp32 matrix product's GFLOP/s measured in the same run (the distance to the machine's peak)
and the plain/fast ratio of the medians. ``PURER_BENCH_DEVICE=cuda`` runs them on the GPU
(CUDA is synchronised after each round). ``fast_compiled`` is ``fast`` with
``metatrain.compile`` (the conv4 teachers' scoring under ``torch.compile``); its compilation
is timed apart, in its first iteration. ``fast_lanes`` is ``fast`` on the lanes ``lanes: 0``
picks (two when the process has two threads or more: the teachers and the tasks shared out);
the process runs ``PURER_BENCH_THREADS`` intra-op threads (default 1, so ``fast_lanes`` is
``fast``; ``PURER_BENCH_THREADS=2`` compares two threads with two lanes of one).

Teachers are freshly initialised conv4s whose BatchNorm running statistics come from a few
forward passes: the arithmetic of an iteration does not depend on what they learned.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from purer_mlops.config import from_dict
from purer_mlops.data.filelist import write_filelists
from purer_mlops.data.registry import DATASETS, SPLITS
from purer_mlops.lanes import lane_count, open_lanes
from purer_mlops.meta.plain_reference import plain_trainer
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.pool_storage import TeacherRecord, save_pool
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

DEVICE = os.environ.get("PURER_BENCH_DEVICE", "cpu")
# intra-op threads of the process (tests/conftest.py sets one); fast_lanes splits them in two
THREADS = int(os.environ.get("PURER_BENCH_THREADS", "1"))
MEDIANS: dict[tuple[str, str], float] = {}  # (setting, path) -> median seconds, for the ratio line
FLOPS: dict[str, int] = {}  # setting -> FLOPs of one iteration (the counter cannot see into compiled code)

SETTINGS = {
    # the seed's cifar_55_conv4 script: 13 conv4 teachers, 64 classes, 20 images per class
    "5w5s": dict(teachers=13, random_pool=False, num_sup_train=5, synthesis_per_class=20, inner=1, candidate=0),
    # cifar_51_conv4: 16 images per class, 1 shot
    "5w1s": dict(teachers=13, random_pool=False, num_sup_train=1, synthesis_per_class=16, inner=1, candidate=0),
    # PURER-Plus: 100 teachers on random 5-class subsets, 13 per bank update, 5 inner steps
    "plus": dict(teachers=100, random_pool=True, num_sup_train=1, synthesis_per_class=16, inner=5, candidate=13),
    # the default `dvc repro` (params.yaml): 6 bank images per class, 1 shot
    "default": dict(teachers=13, random_pool=False, num_sup_train=1, synthesis_per_class=6, inner=1, candidate=0),
}


def _fake_dataset(root: Path) -> None:
    """A tiny Glyph-FS-shaped tree (meta_val is what the trainer loads)."""
    rng = np.random.default_rng(0)
    for split in SPLITS:
        for c in range(5):
            folder = root / "data" / "glyphs" / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(20):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    write_filelists(root / "data" / "glyphs")


def _pool(root: Path, n: int, random_pool: bool) -> None:
    info = DATASETS["glyphs"]
    gen = torch.Generator().manual_seed(0)
    teachers = []
    for i in range(n):
        # blocks: 12 blocks of 5, the 13th the last 5 classes (as the pretrain stage cuts them)
        ids = torch.randperm(64, generator=gen)[:5] if random_pool else torch.arange(5) + min(5 * i, 59)
        torch.manual_seed(i)
        model = build_backbone("conv4", 5, 32).train()
        with torch.no_grad():
            model(torch.randn(64, 3, 32, 32))
        rec = TeacherRecord("conv4", "glyphs", 32, info.mean, info.std, tuple(f"c{j}" for j in ids.tolist()),
                            tuple(ids.tolist()))
        teachers.append((rec, model.eval()))
    save_pool(root / "models" / "teachers", teachers)


@pytest.fixture(autouse=True, scope="module")
def bench_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(SETTINGS))
def setting(request, tmp_path_factory):
    name = request.param
    s = SETTINGS[name]
    root = tmp_path_factory.mktemp(name)
    _fake_dataset(root)
    _pool(root, s["teachers"], s["random_pool"])
    return name, root, s


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a dense fp32 n×n matrix product on the benchmark device (best of ``repeats``)."""
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync()
        t = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def iteration_flops(step) -> int:
    """FLOPs (convolutions, matrix products; forward and backward) of one call of ``step``."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["plain", "fast", "fast_lanes", "fast_bf16", "fast_compiled"])
def test_meta_iteration(benchmark, setting, mode, capsys):
    name, root, s = setting
    params = from_dict({
        "num_sup_train": s["num_sup_train"], "synthesis_per_class": s["synthesis_per_class"],
        "inner_update_num": s["inner"], "candidate_size": s["candidate"], "tracking": False,
        "device": DEVICE, "inversion": {"bf16": mode.endswith("_bf16")},
        "metatrain": {"val_episodes": 1, "compile": mode.endswith("_compiled")},
    })
    lanes = lane_count(0, torch.device(DEVICE)) if mode.endswith("_lanes") else 1
    with open_lanes(lanes) as opened:
        trainer = build_trainer(params, Project(root), lanes=opened)
        if mode == "plain":
            trainer = plain_trainer(trainer)
        flops, median, compile_note = time_iterations(benchmark, name, mode, trainer)
    if mode != "plain":  # the matmul on all the process's threads, out of the lanes
        peak = matmul_gflops()
        plain = MEDIANS.get((name, "plain"))
        ratio = f", plain/{mode} {plain / median:.2f}x" if plain else ""
        with capsys.disabled():
            print(f"\n[{name}] {flops / 1e9:.1f} GFLOP per iteration; {mode} {flops / median / 1e9:.1f} GFLOP/s "
                  f"({median:.3f} s); dense fp32 matmul {peak:.1f} GFLOP/s{ratio}{compile_note}")


def time_iterations(benchmark, name: str, mode: str, trainer) -> tuple[int, float, str]:
    """Time ``trainer``'s adversarial meta-iterations; returns (FLOPs, median seconds, compilation note)."""
    benchmark.group = f"meta_iteration_{name}"
    benchmark.name = f"meta_iteration_{name}_{mode}"

    def adversarial() -> None:
        trainer.curriculum.pending = True  # every timed iteration carries the adversarial term

    def iteration() -> None:
        trainer.step()  # reads its losses back (.item()), so CUDA work is finished when it returns

    adversarial()
    compile_note = ""
    if mode.endswith("_compiled"):  # the warm-up round compiles: timed apart
        started = time.perf_counter()
        iteration()
        compile_note = f"; first iteration (compiling) {time.perf_counter() - started:.1f} s"
        adversarial()
    flops = FLOPS.setdefault(name, iteration_flops(iteration))  # also the warm-up round
    benchmark.pedantic(iteration, setup=adversarial, rounds=5, iterations=1)
    assert trainer.history["adversarial"][-1] == 1
    assert np.isfinite(trainer.history["meta_loss"][-1])
    median = benchmark.stats.stats.median
    MEDIANS[name, mode] = median
    benchmark.extra_info.update(gflop=flops / 1e9, gflops=flops / median / 1e9)
    return flops, median, compile_note
