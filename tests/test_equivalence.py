"""The plain loop stays the yardstick: batched (vmap) meta-training computes the same numbers.

For MAML, ANIL and ProtoNet, with a homogeneous pool (conv4 teachers, meta-model initialised
as their average) and a mixed one (conv4 at 32 px and resnet10 at 16 px), two trainers built
from the same seed with ``metatrain.batching`` ``vmap`` and ``loop`` give, in float32 within 1e-4
relative:

- the same inversion terms and bank gradient;
- the same meta loss and meta-model gradient on the same pseudo tasks;
- after one full ``step()`` with the curriculum switch on, the same training-curve row,
  bank and meta-model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_pool, small_glyphs, tiny_params

from purer_mlops.meta import train
from purer_mlops.meta.inversion import TERMS

RTOL = 1e-4
POOLS = {
    "homogeneous": [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9))],
    "mixed": [("conv4", 32, (0, 1, 2, 3, 4)), ("conv4", 32, (5, 6, 7, 8, 9)),
              ("resnet10", 16, (0, 2, 4, 6, 8)), ("resnet10", 16, (1, 3, 5, 7, 9))],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs: Path) -> dict[str, Path]:
    out = {}
    for name, specs in POOLS.items():
        root = tmp_path_factory.mktemp(name)
        small_glyphs(tiny_glyphs, root)
        random_pool(root / "models" / "teachers", specs)
        out[name] = root
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("kind", ["maml", "anil", "protonet"])
def test_batched_step_equals_plain_loop(roots: dict[str, Path], pool: str, kind: str) -> None:
    trainers = {b: train.MetaTrainer(tiny_params(meta_learner=kind, average=pool == "homogeneous",
                                                 **{"metatrain.batching": "vmap" if b else "loop"}), roots[pool])
                for b in (True, False)}
    vm, loop = trainers[True], trainers[False]
    assert vm.batched and vm.inversion.batched and not loop.batched and not loop.inversion.batched
    assert torch.equal(vm.bank.images, loop.bank.images)
    assert all(torch.equal(a, b) for a, b in zip(vm.model.parameters(), loop.model.parameters(), strict=True))
    p = vm.params

    # inversion terms and bank gradient
    inv = {}
    for b, t in trainers.items():
        terms = t.inversion(t.bank.images, (1, -2), None)
        (g,) = torch.autograd.grad(terms["loss"], [t.bank.images])
        inv[b] = ({k: float(v.detach()) for k, v in terms.items()}, g)
    for name in (*TERMS, "loss"):
        assert inv[True][0][name] == pytest.approx(inv[False][0][name], rel=RTOL), name
    assert rel(inv[True][1], inv[False][1]) < RTOL

    # meta loss and meta-model gradient on the same pseudo tasks, in float64: the meta-model is
    # piecewise linear (ReLU, max-pool), so float32 rounding can flip a unit across a kink and
    # move a gradient entry by O(1) (seen: 2e-3 relative on the first conv, in vmap and loop alike)
    gen = torch.Generator().manual_seed(5)
    tasks = train.sample_pseudo_tasks(vm.bank.images.detach(), p.episode_batch, p.way_train,
                                      p.num_sup_train, p.num_qur_train, gen)
    meta = {}
    for b, t in trainers.items():
        for dtype in (torch.float32, torch.float64):
            params = {k: v.detach().to(dtype).requires_grad_() for k, v in t.params_dict().items()}
            xs, ys, xq, yq = tasks
            losses, accs = t.learner.batch_loss(params, xs.to(dtype), ys, xq.to(dtype), yq, p.way_train, batched=b)
            grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True,
                                        materialize_grads=True)
            meta[b, dtype] = (losses.detach(), accs, flat(grads))
    torch.testing.assert_close(meta[True, torch.float32][0], meta[False, torch.float32][0], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(meta[True, torch.float64][0], meta[False, torch.float64][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(meta[True, torch.float32][1], meta[False, torch.float32][1])
    assert rel(meta[True, torch.float64][2], meta[False, torch.float64][2]) < 1e-8, f"{kind}: meta-gradient"
    assert rel(meta[True, torch.float32][2], meta[False, torch.float32][2]) < 1e-2  # float32: kinks aside

    # one full meta-iteration, adversarial
    rows = {}
    for b, t in trainers.items():
        t.curriculum.pending = True
        rows[b] = t.step()
    assert rows[True]["adversarial"] == rows[False]["adversarial"] == 1
    for key, value in rows[False].items():
        assert rows[True][key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
    assert rel(vm.bank.images.detach(), loop.bank.images.detach()) < RTOL
    assert rel(flat(vm.model.parameters()).detach(), flat(loop.model.parameters()).detach()) < RTOL
