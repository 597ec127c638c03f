"""Lanes: the work of one process split over threads computes what one lane computes.

Two lanes only change the order of the sums that join their shares (teachers of the bank
update, tasks of the meta-batch), so a step is compared with one lane's in float64, where
that order is invisible (≤ 1e-8 relative; see tests/test_equivalence.py for why not float32),
and meta-val / meta-test accuracies task by task.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import LEARNER_NAMES, random_pool, small_glyphs, tiny_params
from test_equivalence import FP64_RTOL, as_float64, flat, rel

from purer_mlops.lanes import ONE, lane_count, open_lanes
from purer_mlops.meta import scoring as metatest
from purer_mlops.meta.pool import init_meta_model
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer

MIXED = [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9)), ("resnet10", 16, (0, 2, 4, 6, 8))]


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> Path:
    root = tmp_path_factory.mktemp("lanes")
    small_glyphs(tiny_glyphs, root)
    random_pool(root / "models" / "teachers", MIXED)
    return root


def test_shares_cover_every_item_once_in_order() -> None:
    with open_lanes(3) as lanes:
        for n in (0, 1, 2, 7, 13):
            shares = lanes.shares(n)
            assert len(shares) == 3
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_map_runs_the_lanes_on_threads_of_their_own_and_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with open_lanes(2) as lanes:
        assert torch.get_num_threads() == lanes.threads == max(1, before // 2)
        seen = lanes.map(lambda lane, share: (lane, list(share), threading.get_ident(), torch.get_num_threads()), 5)
    assert [s[:2] for s in seen] == [(0, [0, 1, 2]), (1, [3, 4])]
    assert seen[0][2] == threading.get_ident() != seen[1][2]  # lane 0 is the caller
    assert {s[3] for s in seen} == {lanes.threads}
    assert torch.get_num_threads() == before


def test_a_failing_lane_raises_after_every_lane_has_stopped() -> None:
    finished = []

    def work(lane: int, share: range) -> int:
        if lane == 0:
            raise ValueError("lane 0 failed")
        threading.Event().wait(0.2)
        finished.append(lane)
        return lane

    with open_lanes(2) as lanes, pytest.raises(ValueError, match="lane 0 failed"):
        lanes.map(work, 2)
    assert finished == [1]


def test_lane_count_follows_the_knob_the_device_and_the_threads() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lane_count(0, cpu) == 2
        torch.set_num_threads(1)
        assert lane_count(0, cpu) == 1
    finally:
        torch.set_num_threads(before)
    assert lane_count(3, cpu) == 3 and lane_count(1, cpu) == 1
    assert lane_count(0, cuda) == lane_count(2, cuda) == 1
    assert lane_count(2, cpu, one_lane=True) == 1


@pytest.mark.parametrize("adv", [True, False], ids=["adversarial", "no-adversarial"])
@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_two_lanes_step_equals_one_lane_in_float64(mixed_root: Path, kind: str, adv: bool) -> None:
    params = tiny_params(meta_learner=kind, average=False)
    one = as_float64(build_trainer(params, Project(mixed_root)))
    with open_lanes(2) as lanes:
        two = as_float64(build_trainer(params, Project(mixed_root), lanes=lanes))
        assert torch.equal(one.bank.images, two.bank.images)
        rows = {}
        for name, t in (("one", one), ("two", two)):
            t.curriculum.pending = adv
            rows[name] = t.step()
    assert rows["one"]["adversarial"] == rows["two"]["adversarial"] == int(adv)
    for key, value in rows["one"].items():
        tol = 1e-6 if key == "pseudo_accuracy" else 1e-12  # accuracies are float32 (a mean of 0/1)
        assert rows["two"][key] == pytest.approx(value, rel=FP64_RTOL, abs=tol), key
    assert rel(two.bank.images.detach(), one.bank.images.detach()) < FP64_RTOL, "bank after the step"
    assert rel(flat(two.model.parameters()), flat(one.model.parameters())) < FP64_RTOL, "model after the step"
    assert torch.equal(one.gen.get_state(), two.gen.get_state())  # the same draws, in the same order


def test_two_lane_runs_are_bit_identical(mixed_root: Path) -> None:
    # float32, adversarial updates included: the lanes draw nothing and share no state
    params = tiny_params(average=False, adv_start=1, patience=1)
    runs = []
    for _ in range(2):
        with open_lanes(2) as lanes:
            t = build_trainer(params, Project(mixed_root), lanes=lanes)
            rows = [t.step() for _ in range(4)]
        assert sum(r["adversarial"] for r in rows) >= 1
        runs.append((rows, t.bank.images.detach().clone(), flat(t.model.parameters())))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_lanes_validate_and_score_task_by_task_like_one(mixed_root: Path) -> None:
    # Each task is adapted on its own, so at the same thread count per lane the accuracies are equal bit for bit.
    params = tiny_params(episode_test=7, test_inner_update_num=2, average=False, lanes=1)
    with threads(2), open_lanes(2) as lanes:
        two = build_trainer(params, Project(mixed_root), lanes=lanes)
        one = build_trainer(params, Project(mixed_root))  # on the caller's thread, as many threads as a lane
        assert one.lanes is ONE and torch.get_num_threads() == lanes.threads == 1
        assert two.validate() == one.validate()
    test, tasks = metatest.fixed_test_tasks(params, Project(mixed_root))
    model = init_meta_model(params, None, test.image_size)
    with threads(2):
        split = metatest.score(params.replace(lanes=2), model, test, tasks, meta_learner=params.meta_learner)
    with threads(1):
        whole = metatest.score(params, model, test, tasks, meta_learner=params.meta_learner)
    assert split.shape == (7,)
    assert torch.equal(split, whole)
