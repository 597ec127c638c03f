"""Nearest-prototype heads and the teacher baselines (purer_mlops.meta.heads, .baselines).

- the cosine head is SCALE·cosine to the normalised class means, checked against a by-hand loop;
- the euclidean head of a meta-model is exactly its ProtoNet learner's prediction;
- on classes a random conv4 separates, ``teacher-best`` picks the one intact teacher of a pool
  whose others embed every image to zero (chance on meta-val), ``teacher-mean`` is the per-task
  mean of the teachers scored one by one by hand, the ensemble of one teacher is that teacher,
  and every row pairs task by task;
- a teacher of another image space is refused with a message that names it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from purer_mlops.data.dataset import ImageSet, fixed_tasks
from purer_mlops.data.registry import DATASETS
from purer_mlops.errors import UserError
from purer_mlops.meta.baselines import TEACHER_METHODS, score_teachers, space_blocker, teacher_accuracies
from purer_mlops.meta.heads import SCALE, frozen_embed, head_logits, per_task_embed, task_probs
from purer_mlops.meta.tasks import stack_tasks
from purer_mlops.models.backbones import build_backbone, fast_forward
from purer_mlops.models.learners import build_learner
from purer_mlops.models.pool_storage import TeacherRecord

WAY = 5
INFO = DATASETS["glyphs"]


def colour_set(name: str, seed: int, per_class: int = 8, size: int = 32) -> ImageSet:
    """``WAY`` classes of one random colour each, plus pixel noise: easy for any conv4 embedding."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (WAY, 1, 3, 1, 1), generator=gen)
    noise = torch.randint(-25, 26, (WAY, per_class, 3, size, size), generator=gen)
    images = (colours + noise).clamp(0, 255).to(torch.uint8).flatten(0, 1)
    labels = torch.arange(WAY).repeat_interleave(per_class)
    return ImageSet(images, labels, [f"{name}_{c}" for c in range(WAY)], INFO.mean, INFO.std, f"colours/{name}")


def teacher(i: int, intact: bool, size: int = 32) -> tuple[TeacherRecord, torch.nn.Module]:
    """A random conv4 teacher; not ``intact``: its last BatchNorm zeroed, so every embedding is 0."""
    torch.manual_seed(i)
    model = build_backbone("conv4", WAY, size).eval()
    if not intact:
        bn = model.features.body[-4]  # the last block's BatchNorm (conv, bn, relu, pool, ..., flatten)
        torch.nn.init.zeros_(bn.weight)
        torch.nn.init.zeros_(bn.bias)
    record = TeacherRecord("conv4", "glyphs", size, INFO.mean, INFO.std, tuple(f"c{c}" for c in range(WAY)),
                           tuple(range(WAY)), name=f"teacher_{i:03d}")
    return record, model


def by_hand(model: torch.nn.Module, imageset: ImageSet, tasks) -> torch.Tensor:
    """Per-task accuracy (T,) of the cosine head, task by task, class by class."""
    out = []
    with torch.no_grad():
        for t in range(len(tasks)):
            xs, ys, xq, yq = stack_tasks(imageset, tasks[t:t + 1], torch.device("cpu")).task(0)
            zs, zq = F.normalize(model.features(xs), dim=1), F.normalize(model.features(xq), dim=1)
            protos = torch.stack([zs[ys == c].mean(0) for c in range(WAY)])
            cos = torch.stack([F.cosine_similarity(zq, p.expand_as(zq), dim=1) for p in protos], dim=1)
            out.append((cos.argmax(1) == yq).float().mean())
    return torch.stack(out)


def test_cosine_head_is_scaled_cosine_to_normalised_class_means() -> None:
    gen = torch.Generator().manual_seed(0)
    zs, zq = torch.randn(10, 16, generator=gen, dtype=torch.float64), torch.randn(7, 16, generator=gen,
                                                                                    dtype=torch.float64)
    ys = torch.arange(WAY).repeat_interleave(2)
    protos = torch.stack([F.normalize(zs[ys == c], dim=1).mean(0) for c in range(WAY)])
    cos = torch.stack([F.cosine_similarity(zq, p.expand_as(zq), dim=1) for p in protos], dim=1)
    logits = head_logits(zs, ys, zq, WAY, "cosine")
    torch.testing.assert_close(logits.softmax(1), (SCALE * cos).softmax(1))
    with pytest.raises(ValueError, match="unknown head form 'dot'"):
        head_logits(zs, ys, zq, WAY, "dot")


def test_euclidean_head_of_a_meta_model_is_its_protonet() -> None:
    torch.manual_seed(0)
    model = build_backbone("conv4", WAY, 32, track_running_stats=False)
    imageset = colour_set("test", seed=1)
    batch = stack_tasks(imageset, fixed_tasks(imageset, 3, WAY, 2, 3, seed=0), torch.device("cpu"))
    learner = build_learner("protonet", model, 0, 0.01)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad(), fast_forward():  # the head embeds with the fast forward
        protonet = torch.stack([learner.query_logits(weights, *batch.task(t)[:3], WAY) for t in range(3)])
        head = task_probs(per_task_embed(model), batch.xs, batch.ys, batch.xq, WAY, "euclidean")
    torch.testing.assert_close(head, protonet.softmax(-1))


@pytest.mark.parametrize("shot", [1, 5])
def test_teacher_rows_pick_the_best_teacher_average_by_hand_and_pair(shot: int) -> None:
    val, test = colour_set("val", seed=1), colour_set("test", seed=2)
    val_tasks, test_tasks = (fixed_tasks(s, 6, WAY, shot, 3, seed=0) for s in (val, test))
    pool = [teacher(0, intact=False), teacher(1, intact=True), teacher(2, intact=False)]
    scores = score_teachers(pool, val, val_tasks, test, test_tasks, form="cosine")
    assert torch.equal(scores.val[0], torch.full((6,), 0.2))  # zero embeddings: all ties → class 0
    assert scores.best == 1 and scores.val[1].mean() > 0.6
    assert scores.note("teacher-best").startswith("teacher_001, meta-val ")
    assert "3 forward passes per image" in scores.note("teachers-ensemble")
    hand = torch.stack([by_hand(m, test, test_tasks) for _, m in pool])  # (3, T)
    torch.testing.assert_close(scores.test, hand)
    rows = {m: scores.accuracies(m) for m in TEACHER_METHODS}
    assert all(r.shape == (6,) for r in rows.values())
    assert torch.equal(rows["teacher-best"], hand[1])  # task by task: the rows pair
    torch.testing.assert_close(rows["teacher-mean"], hand.mean(0))
    each, ensemble = teacher_accuracies(pool[1:2], test, test_tasks, "cosine")  # an ensemble of one teacher
    assert torch.equal(ensemble, each[0]) and torch.equal(each[0], hand[1])


def test_a_teacher_of_another_image_space_is_refused_by_name() -> None:
    test = colour_set("test", seed=2)
    tasks = fixed_tasks(test, 2, WAY, 1, 3, seed=0)
    pool = [teacher(0, intact=True), teacher(1, intact=True, size=40)]
    assert space_blocker([r for r, _ in pool[:1]], test) is None
    with pytest.raises(UserError, match=r"teacher_001 expects 40 px images .* but colours/test has 32 px"):
        teacher_accuracies(pool, test, tasks)
    other = TeacherRecord("conv4", "glyphs", 32, (0.4, 0.4, 0.4), INFO.std, ("c",), (0,), name="teacher_009")
    assert "teacher_009 expects 32 px images normalised with mean [0.4, 0.4, 0.4]" in space_blocker([other], test)


def test_frozen_embed_embeds_each_task_like_the_teacher_alone() -> None:
    _, model = teacher(1, intact=True)
    x = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(frozen_embed(model)(x)[2], model.features(x[2]))
