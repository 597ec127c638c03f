"""The curriculum switch fires when the method says, and its update is adversarial.

- With a scripted accuracy sequence the switch fires at ``adv_start`` and after every
  ``patience`` stagnant meta-iterations, once each time; disabled it never fires;
  ``adv_start = 0`` fires on the first update; its state survives a round trip.
- The adversarial bank update raises the meta-model's loss on the pseudo task it was
  computed on, compared with the same update without the switch, from the same state.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import random_pool, small_glyphs, tiny_params

from purer_mlops.meta import trainer as trainer_module
from purer_mlops.meta.curriculum import Curriculum
from purer_mlops.meta.trainer import MetaTrainer
from purer_mlops.paths import Project
from purer_mlops.stages.metatrain import build_trainer


def fires(c: Curriculum, accuracies: list[float]) -> list[int]:
    """Iterations whose bank update is adversarial: ``take`` at the start, ``observe`` at the end."""
    out = []
    for t, acc in enumerate(accuracies):
        if c.take():
            out.append(t)
        c.observe(t, acc)
    return out


# adv_start = 3, patience = 2: on at 3; best 0.5 at 3, stagnant at 4 and 5 -> on at 6;
# best 0.3 at 6, 0.6 at 7, stagnant 8, best 0.7 at 9, stagnant 10 and 11 -> on at 12; then improving.
ACCS = [0.9, 0.9, 0.9, 0.5, 0.4, 0.4, 0.3, 0.6, 0.6, 0.7, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5]


def test_switch_fires_at_adv_start_and_after_patience_stagnant_iterations() -> None:
    c = Curriculum(adv_start=3, patience=2)
    assert fires(c, ACCS) == [3, 6, 12]
    assert c.fired == 3


def test_switch_with_patience_one_and_equal_accuracies() -> None:
    # an equal accuracy does not beat the best: it counts as stagnant
    c = Curriculum(adv_start=1, patience=1)
    got = fires(c, [0.0, 0.5, 0.5, 0.6, 0.7, 0.7, 0.1])
    # on at 1; best 0.5 at 1; 0.5 at 2 stagnant -> on at 3; best 0.6 at 3, 0.7 at 4; 0.7 at 5 -> on at 6
    assert got == [1, 3, 6]


def test_disabled_switch_never_fires() -> None:
    c = Curriculum(adv_start=0, patience=1, enabled=False)
    assert fires(c, [0.1] * 10) == [] and c.fired == 0


def test_adv_start_zero_fires_on_the_first_update() -> None:
    c = Curriculum(adv_start=0, patience=3)
    assert fires(c, [0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8]) == [0, 6]


def test_state_dict_round_trip_continues_identically() -> None:
    c = Curriculum(adv_start=3, patience=2)
    first = fires(c, ACCS[:8])
    state = c.state_dict()
    assert state["best"] == 0.6 and state["stale"] == 0 and state["fired"] == 2
    restored = Curriculum(adv_start=0, patience=5)  # other settings: all of them come from the state
    restored.load_state_dict(state)
    assert restored == c

    def rest(cur: Curriculum) -> list[int]:
        out = []
        for t in range(8, len(ACCS)):
            if cur.take():
                out.append(t)
            cur.observe(t, ACCS[t])
        return out

    assert first + rest(restored) == [3, 6, 12]
    assert rest(c) == [12] and restored.fired == c.fired == 3
    fresh = Curriculum(adv_start=3, patience=2)
    fresh.load_state_dict(Curriculum(adv_start=3, patience=2).state_dict())
    assert fresh.best == -math.inf and not fresh.pending


@pytest.fixture(scope="module")
def adv_root(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> Path:
    root = tmp_path_factory.mktemp("adv")
    small_glyphs(tiny_glyphs, root)
    random_pool(root / "models" / "teachers", [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9))])
    return root


def test_adversarial_update_raises_the_pseudo_task_loss(adv_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tiny_params(adv_scale=100.0, **{"inversion.lr": 0.05})
    adv, plain = build_trainer(params, Project(adv_root)), build_trainer(params, Project(adv_root))
    assert torch.equal(adv.bank.images, plain.bank.images)

    # remember the generator state the adversarial task is drawn from, to redraw that task
    states: list[torch.Tensor] = []
    real = trainer_module.sample_pseudo_tasks

    def recording(bank, tasks, way, shot, query, gen):
        states.append(gen.get_state())
        return real(bank, tasks, way, shot, query, gen)

    monkeypatch.setattr(trainer_module, "sample_pseudo_tasks", recording)
    adv.curriculum.pending = True
    assert adv.bank_step()[1] is True
    assert len(states) == 1  # the adversarial task
    assert plain.bank_step()[1] is False
    assert len(states) == 1

    def query_loss(trainer: MetaTrainer) -> float:
        gen = torch.Generator()
        gen.set_state(states[0])
        task = real(trainer.bank.images.detach(), 1, params.way_train, params.num_sup_train,
                    params.num_qur_train, gen).task(0)
        loss, _ = trainer.learner.task_loss(trainer.weights(), *task, params.way_train)
        return float(loss.detach())

    assert not torch.equal(adv.bank.images, plain.bank.images)
    loss_adv, loss_plain = query_loss(adv), query_loss(plain)
    # measured: ~2.7 vs ~1.6 over seeds and bank learning rates; a sign error would give less
    assert loss_adv > 1.2 * loss_plain, (loss_adv, loss_plain)
