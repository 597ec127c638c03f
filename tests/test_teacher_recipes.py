"""How one teacher is trained: augmentation on tensors, the step budget, the two recipes."""

from __future__ import annotations

import math

import pytest
import torch
from test_pretrain import make_dataset, params

from purer_mlops.data.dataset import load_split
from purer_mlops.data.registry import DATASETS
from purer_mlops.errors import UserError
from purer_mlops.models.backbones import ARCHITECTURES, build_backbone
from purer_mlops.teachers.augment import Augmentation
from purer_mlops.teachers.recipes import RESNETS, lr_factor, make_optimizer, make_schedule, reference_init
from purer_mlops.teachers.training import epochs_for, near_chance, plan_pool, steps_per_epoch, train_teacher

SIZE = 8


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Normalised-looking images (n, 3, SIZE, SIZE) in channels_last, as training uses them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=torch.channels_last)


def windows(padded: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every SIZE×SIZE window of one padded image (3, SIZE + 2·pad, SIZE + 2·pad)."""
    return [padded[:, r:r + SIZE, c:c + SIZE] for r in range(2 * pad + 1) for c in range(2 * pad + 1)]


def test_datasets_declare_their_augmentation() -> None:
    assert not DATASETS["glyphs"].flip and DATASETS["glyphs"].recolour  # mirrored glyphs are other characters
    for name in ("cifar100", "miniimagenet", "cub", "flower"):
        assert DATASETS[name].flip and not DATASETS[name].recolour  # colour tells birds and flowers apart
        assert 0 < DATASETS[name].crop_pad < DATASETS[name].image_size // 4


def test_crops_are_windows_of_the_padded_image_and_glyphs_are_never_mirrored() -> None:
    aug = Augmentation(pad=2, flip=False, recolour=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = images()
    padded = aug.prepare(x)
    assert padded.shape == (6, 3, SIZE + 4, SIZE + 4)
    idx = torch.tensor([4, 0, 4, 2, 5, 1, 3, 3])
    out = aug.batch(padded, idx, SIZE, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, SIZE, SIZE) and out.is_contiguous(memory_format=torch.channels_last)
    offsets = set()
    for o, i in zip(out, idx.tolist(), strict=True):
        hits = [k for k, w in enumerate(windows(padded[i], 2)) if torch.equal(o, w)]
        assert hits, "a crop is not a window of its own padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # the offsets are random, not one fixed shift


def test_flips_mirror_about_half_of_the_crops_where_the_dataset_allows_it() -> None:
    aug = Augmentation(pad=0, flip=True, recolour=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = images(64)
    out = aug.batch(x, torch.arange(64), SIZE, torch.Generator().manual_seed(0))
    same = [torch.equal(o, s) for o, s in zip(out, x, strict=True)]
    mirrored = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)]
    assert all(a or b for a, b in zip(same, mirrored, strict=True))
    assert 16 < sum(mirrored) < 48


def test_recolouring_permutes_channels_and_inverts_in_pixel_units() -> None:
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.2, 0.1)
    aug = Augmentation(pad=0, flip=False, recolour=True, mean=mean, std=std)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    pixels = torch.rand(64, 3, SIZE, SIZE)
    out = aug.batch(((pixels - m) / s).contiguous(memory_format=torch.channels_last), torch.arange(64), SIZE,
                    torch.Generator().manual_seed(0))
    back = out * s + m
    kinds = set()
    for b, p in zip(back, pixels, strict=True):
        match = [(tuple(order), inv) for order in torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0],
                                                                [2, 0, 1], [2, 1, 0]]).tolist()
                 for inv in (False, True)
                 if torch.allclose(b, (1 - p[order]) if inv else p[order], atol=1e-5)]
        assert match, "a recoloured image is not a channel permutation (and inversion) of its source"
        kinds.add(match[0])
    assert len(kinds) >= 8  # all sorts of permutations, inverted and not


def test_augmentation_is_seeded() -> None:
    info = DATASETS["glyphs"]
    aug = Augmentation.for_dataset("glyphs", params(), info.mean, info.std)
    padded = aug.prepare(images(16))
    idx = torch.arange(16)

    def draw(seed: int) -> torch.Tensor:
        return aug.batch(padded, idx, SIZE, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_the_step_budget_gives_small_datasets_more_epochs() -> None:
    assert steps_per_epoch(120, 64) == 2 and steps_per_epoch(129, 64) == 2 and steps_per_epoch(130, 64) == 3
    p = params(pretrain={"epochs": 0, "steps": 400, "batch_size": 64})
    assert epochs_for(p, 120) == 200 and epochs_for(p, 400) == math.ceil(400 / 7)
    assert epochs_for(p, 4000) == 7  # never fewer steps than the budget: whole epochs, rounded up
    assert epochs_for(p.replace(**{"pretrain.epochs": 3}), 120) == 3  # explicit epochs win


def test_train_teacher_follows_the_step_budget(tmp_path) -> None:
    make_dataset(tmp_path, "glyphs", classes=5, per_class=10)
    imageset = load_split("glyphs", tmp_path / "data" / "glyphs", "meta_train")
    # a cap of one segment: exactly the step budget, as before the budget followed the curve
    p = params(pretrain={"epochs": 0, "steps": 7, "max_steps": 7, "restarts": 0, "batch_size": 16})
    spec = plan_pool(p, {"glyphs": 5})[0]
    trained = train_teacher(spec, imageset, p)  # 40 training images: 3 steps an epoch
    assert (trained.epochs, trained.steps, trained.restarts) == (3, 9, 0) and 1 <= trained.best_epoch <= 3
    reference = train_teacher(spec, imageset, p.replace(**{"pretrain.recipe": "reference"}))
    assert (reference.epochs, reference.steps) == (3, 9)
    assert not torch.equal(reference.state["head.weight"], trained.state["head.weight"])


def test_the_budget_adds_segments_while_the_curve_rises_and_stops_at_the_cap(tmp_path) -> None:
    make_dataset(tmp_path, "glyphs", classes=5, per_class=20)
    imageset = load_split("glyphs", tmp_path / "data" / "glyphs", "meta_train")
    base = {"epochs": 0, "steps": 10, "restarts": 0, "batch_size": 16, "patience": 5}
    spec = plan_pool(params(pretrain=base), {"glyphs": 5})[0]  # 80 training images: 5 steps an epoch
    seen: list[float] = []
    trained = train_teacher(spec, imageset, params(pretrain={**base, "max_steps": 40}),
                            on_epoch=lambda epoch, acc, model: seen.append(acc))
    # whole segments of 2 epochs, never past the cap; another one while the last epoch (patience:
    # 5 steps) beat every earlier one
    assert trained.steps in (10, 20, 30, 40) and trained.epochs == len(seen) == trained.steps // 5
    assert all(100 > seen[k] > max(seen[:k]) for k in range(1, len(seen) - 1, 2))
    assert trained.steps == 40 or not 100 > seen[-1] > max(seen[:-1])
    assert trained.accuracy == max(seen)
    capped = train_teacher(spec, imageset, params(pretrain={**base, "max_steps": 19}))
    assert capped.steps == 10  # a second segment would pass the cap


def test_a_teacher_near_chance_is_started_again_from_a_new_initialisation(tmp_path) -> None:
    make_dataset(tmp_path, "glyphs", classes=5, per_class=20, learnable=0)  # noise: nothing to learn
    imageset = load_split("glyphs", tmp_path / "data" / "glyphs", "meta_train")
    base = {"epochs": 0, "steps": 5, "max_steps": 5, "batch_size": 16, "restart_below": 5.0}
    spec = plan_pool(params(pretrain=base), {"glyphs": 5})[0]
    again = train_teacher(spec, imageset, params(pretrain={**base, "restarts": 2}))
    once = train_teacher(spec, imageset, params(pretrain={**base, "restarts": 0}))
    assert (again.restarts, once.restarts) == (2, 0) and again.steps == once.steps == 5
    assert not torch.equal(again.state["head.weight"], once.state["head.weight"])
    fixed = train_teacher(spec, imageset, params(pretrain={**base, "epochs": 1, "restarts": 2}))
    assert fixed.restarts == 0  # a fixed epoch count is never restarted
    assert near_chance(29.0, 5, 1.5) and not near_chance(30.0, 5, 1.5)


def test_cosine_schedule_decays_from_the_base_rate_to_zero_over_the_run() -> None:
    factors = [lr_factor("purer-mlops", s, 5, 10) for s in range(50)]
    assert factors[0] == 1.0 and factors[25] == pytest.approx(0.5) and 0 < factors[-1] < 0.001
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))


def test_reference_schedule_is_the_authors_multistep_one() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    schedule = make_schedule("reference", opt, 3, 60)
    lrs = []
    for _epoch in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            opt.step()
            schedule.step()
    # 0.01 for epochs 0-29, then × 0.2 at epochs 30, 40 and 50
    assert lrs[29] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.002)
    assert lrs[39] == pytest.approx(0.002) and lrs[40] == pytest.approx(4e-4) and lrs[59] == pytest.approx(8e-5)


def test_reference_init_draws_conv_weights_with_fan_out_variance() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet10", 5, 32)
    for m in model.modules():  # scramble BatchNorm so the reset is visible
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight)
            torch.nn.init.uniform_(m.bias)
    reference_init(model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        tolerance = 0.1 if conv.weight.numel() > 5000 else 0.4  # few weights: a noisier std
        assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=tolerance)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_backbone_has_a_teacher_optimiser(arch: str) -> None:
    model = build_backbone(arch, 5, 32)
    expected = torch.optim.SGD if arch in RESNETS else torch.optim.Adam
    assert isinstance(make_optimizer(arch, model, params()), expected)


def test_an_architecture_without_an_optimiser_is_refused() -> None:
    model = build_backbone("conv4", 5, 32)
    with pytest.raises(UserError, match="no teacher optimiser for architecture 'vit'.*teachers/recipes.py"):
        make_optimizer("vit", model, params())
