"""The meta-learners compute what they claim.

- MAML's second-order meta-gradient (through the inner loop) matches central finite
  differences in float64; first-order MAML is a different gradient (∇ of the query loss at
  the adapted parameters).
- ANIL's inner loop adapts only the head; the backbone tensors are passed through untouched.
- ProtoNet's logits are minus squared Euclidean distances to the class means of the support
  embeddings.
- The fast forward's native batch norm has a correct double backward (``gradgradcheck``)
  and computes what the elementary-op one does; its max-pool gives nn.MaxPool2d's values and
  gradients.
- ``batch_loss`` gives the same losses, accuracies and gradients batched (vmap) and looped.
- Test-time adaptation gives the same losses on channels-last images and weights as on NCHW,
  and ``task_accuracies`` runs a looped learner's convolutions channels-last on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INNER_LOOP_LEARNERS, LEARNER_NAMES

from purer_mlops.data.dataset import ImageSet
from purer_mlops.meta.evaluation import channels_last, task_accuracies
from purer_mlops.meta.tasks import TaskBatch
from purer_mlops.models.backbones import BatchStatNorm2d, build_backbone, fast_forward
from purer_mlops.models.kernels import max_pool2
from purer_mlops.models.learners import MetaLearner, build_learner

SIZE = 16


def tiny_model(way: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("conv4", way, SIZE, track_running_stats=False).to(dtype)


def task(way: int, shot: int, query: int, dtype: torch.dtype = torch.float32, seed: int = 1, tasks: int | None = None):
    """Random images and labels of one task (or ``tasks`` stacked tasks); support labels shuffled."""
    g = torch.Generator().manual_seed(seed)
    lead = () if tasks is None else (tasks,)
    xs = torch.randn(*lead, way * shot, 3, SIZE, SIZE, generator=g, dtype=dtype)
    xq = torch.randn(*lead, way * query, 3, SIZE, SIZE, generator=g, dtype=dtype)
    ys = torch.arange(way).repeat(shot)  # 0,1,2,0,1,2: not grouped by class
    yq = torch.arange(way).repeat_interleave(query)
    if tasks is not None:
        ys, yq = ys.expand(tasks, -1), yq.expand(tasks, -1)
    return xs, ys, xq, yq


def leaf_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def meta_grad(learner: MetaLearner, params, data, way) -> torch.Tensor:
    loss, _ = learner.task_loss(params, *data, way)
    return flat(torch.autograd.grad(loss, list(params.values())))


@pytest.mark.parametrize("looped", [False, True])
def test_maml_second_order_meta_gradient_matches_finite_differences(looped: bool) -> None:
    way = 3
    model = tiny_model(way, torch.float64)
    data = task(way, shot=2, query=2, dtype=torch.float64)
    # a large inner step makes the second-order terms big enough to tell apart
    so = build_learner("maml", model, inner_steps=2, inner_lr=0.3)
    so.looped = looped  # the fast forward: native batch norm, max-pool before ReLU
    fo = build_learner("maml", model, inner_steps=2, inner_lr=0.3, first_order=True)
    params = leaf_params(model)
    g_so, g_fo = meta_grad(so, params, data, way), meta_grad(fo, params, data, way)

    def loss_at(direction: torch.Tensor, eps: float) -> float:
        shifted, i = {}, 0
        for k, v in params.items():
            n = v.numel()
            shifted[k] = v.detach() + eps * direction[i:i + n].view_as(v)
            i += n
        return float(so.task_loss(shifted, *data, way)[0])

    eps = 1e-6
    gen = torch.Generator().manual_seed(3)
    diff = g_so - g_fo
    directions = [g_so / g_so.norm(), diff / diff.norm()]
    directions += [torch.randn(g_so.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    for v in directions:
        v = v / v.norm()
        fd = (loss_at(v, eps) - loss_at(v, -eps)) / (2 * eps)
        analytic = float(g_so @ v)
        # relative to |∇L|·|v| (|v| = 1), so a direction nearly orthogonal to ∇L is not ill-posed
        assert abs(fd - analytic) / float(g_so.norm()) < 1e-4, (fd, analytic)

    # first-order MAML is a different gradient: along g_so - g_fo the FD above matched g_so,
    # and g_fo is off by |g_so - g_fo|, far above the tolerance
    assert float(diff.norm() / g_so.norm()) > 1e-2
    # ... and it is exactly ∇ of the query loss at the (detached) adapted parameters
    xs, ys, xq, yq = data
    adapted = {k: v.detach().requires_grad_() for k, v in fo.adapt(params, xs, ys).items()}
    q_loss = F.cross_entropy(fo.logits(adapted, xq), yq)
    g_adapted = flat(torch.autograd.grad(q_loss, list(adapted.values())))
    torch.testing.assert_close(g_fo, g_adapted, rtol=1e-9, atol=1e-12)


def test_anil_inner_loop_adapts_only_the_head() -> None:
    way = 3
    model = tiny_model(way)
    learner = build_learner("anil", model, inner_steps=3, inner_lr=0.05)
    params = leaf_params(model)
    xs, ys, _, _ = task(way, shot=2, query=1)
    adapted = learner.adapt(params, xs, ys)
    assert adapted.keys() == params.keys()
    features = [k for k in params if k.startswith("features.")]
    assert features and all(adapted[k] is params[k] for k in features)
    for k in ("head.weight", "head.bias"):
        assert not torch.equal(adapted[k], params[k]), k
    # the head moved downhill on the support loss
    before = F.cross_entropy(learner.logits(params, xs), ys)
    after = F.cross_entropy(learner.logits(adapted, xs), ys)
    assert after < before


def test_protonet_logits_are_negative_squared_distances_to_class_means() -> None:
    way, shot, query = 3, 2, 2
    model = tiny_model(way)
    learner = build_learner("protonet", model, inner_steps=5, inner_lr=0.5)
    params = leaf_params(model)
    xs, ys, xq, yq = task(way, shot, query)
    logits = learner.query_logits(params, xs, ys, xq, way)
    with torch.no_grad():  # by hand; BN uses batch statistics, so support and query are embedded apart
        zs, zq = model.features(xs), model.features(xq)
        protos = torch.stack([zs[ys == c].mean(0) for c in range(way)])
        expected = -((zq[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
    assert logits.shape == (way * query, way)
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)
    loss, acc = learner.task_loss(params, xs, ys, xq, yq, way)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(expected, yq), rtol=1e-5, atol=1e-5)
    assert float(acc) == pytest.approx(float((expected.argmax(1) == yq).float().mean()))


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_batch_loss_batched_equals_loop(kind: str) -> None:
    # float64, so that a wrong batching rule (~1e-4) stands far above rounding (~1e-15)
    way = 3
    model = tiny_model(way, torch.float64)
    learner = build_learner(kind, model, inner_steps=2, inner_lr=0.1)
    params = leaf_params(model)
    data = task(way, shot=1, query=2, dtype=torch.float64, tasks=3)
    out = {}
    for batched in (True, False):
        losses, accs = learner.batch_loss(params, TaskBatch(*data, way), batched=batched)
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True,
                                    materialize_grads=True)
        out[batched] = (losses.detach(), accs, flat(grads))
    assert out[True][0].shape == (3,)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1])
    g_vmap, g_loop = out[True][2], out[False][2]
    assert float((g_vmap - g_loop).norm() / g_loop.norm()) < 1e-8
    # the tasks differ, so the per-task losses are not one value broadcast
    assert out[False][0].unique().numel() == 3


def test_fast_batch_norm_has_a_correct_double_backward() -> None:
    g = torch.Generator().manual_seed(0)
    norm = BatchStatNorm2d(3).double()
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def native(x, w, b):
        with fast_forward():
            return torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(native, (x, w, b))
    plain = torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,))
    torch.testing.assert_close(native(x, w, b), plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_max_pool_equals_max_pool_with_its_gradients(layout: torch.memory_format) -> None:
    x = torch.randn(3, 4, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.contiguous(memory_format=layout).requires_grad_()
    out, ref = max_pool2(x), torch.nn.MaxPool2d(2)(x)
    assert torch.equal(out, ref)
    w = torch.randn_like(ref)
    (g_out,), (g_ref,) = (torch.autograd.grad((o * w).sum(), [x]) for o in (out, ref))
    assert torch.equal(g_out, g_ref) and int((g_ref != 0).sum()) == ref.numel()
    assert torch.autograd.gradgradcheck(max_pool2, (x,))


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_looped_learner_task_by_task_equals_learner_under_vmap(kind: str) -> None:
    # evaluation runs a looped learner's tasks in a loop and another one's under vmap (meta/evaluation.py)
    way = 3
    model = tiny_model(way, torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tasks = TaskBatch(*task(way, shot=2, query=3, dtype=torch.float64, tasks=4), way)
    with torch.no_grad():
        plain = build_learner(kind, model, 3, 0.2).batch_loss(params, tasks, batched=True)
        looped = build_learner(kind, model, 3, 0.2, looped=True).batch_loss(params, tasks, batched=False)
    torch.testing.assert_close(looped[0], plain[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped[1], plain[1])
    assert plain[0].unique().numel() == 4


@pytest.mark.parametrize("kind", INNER_LOOP_LEARNERS)
def test_compiled_test_time_steps_equal_the_eager_ones(kind: str) -> None:
    # metatrain.compile / metatest.compile: each inner step of test-time adaptation compiled
    way = 3
    model = tiny_model(way, torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tasks = TaskBatch(*task(way, shot=2, query=3, dtype=torch.float64, tasks=3), way)
    compiled = build_learner(kind, model, 3, 0.2, looped=True, compiled=True)
    assert compiled.step is not compiled.sgd_step
    with torch.no_grad():
        eager = build_learner(kind, model, 3, 0.2, looped=True).batch_loss(params, tasks, batched=False)
        out = compiled.batch_loss(params, tasks, batched=False)
    torch.testing.assert_close(out[0], eager[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1], eager[1])
    assert eager[0].unique().numel() == 3


@pytest.mark.parametrize("kind", LEARNER_NAMES)
def test_channels_last_test_time_adaptation_equals_nchw(kind: str) -> None:
    way = 3
    model = tiny_model(way, torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    cl_params = channels_last(params)
    tasks = TaskBatch(*task(way, shot=2, query=3, dtype=torch.float64, tasks=3), way)
    cl_tasks = tasks.channels_last()
    assert torch.equal(cl_tasks.xs, tasks.xs) and torch.equal(cl_tasks.xq, tasks.xq)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in (cl_tasks.xs[1], cl_tasks.xq[2]))
    learner = build_learner(kind, model, 3, 0.2, looped=True)
    with torch.no_grad():
        nchw = learner.batch_loss(params, tasks, batched=False)
        cl = learner.batch_loss(cl_params, cl_tasks, batched=False)
    torch.testing.assert_close(cl[0], nchw[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cl[1], nchw[1])
    assert nchw[0].unique().numel() == 3


def test_task_accuracies_run_a_looped_learner_channels_last_on_cpu() -> None:
    way, per_class = 3, 4
    images = torch.randint(0, 256, (way * per_class, 3, SIZE, SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    imageset = ImageSet(images, torch.arange(way).repeat_interleave(per_class), [f"c{i}" for i in range(way)],
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "toy/meta_test")
    tasks = [(torch.arange(way), torch.tensor([[4 * c] for c in range(way)]),
              torch.tensor([[4 * c + 1, 4 * c + 2] for c in range(way)]))] * 2
    model = tiny_model(way)
    layouts: list[bool] = []
    model.features.body[0].register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    accs = task_accuracies(build_learner("maml", model, 2, 0.1, looped=True), dict(model.named_parameters()),
                           imageset, tasks)
    assert accs.shape == (2,) and bool(((accs >= 0) & (accs <= 1)).all())
    assert len(layouts) == 2 * 3 and all(layouts)  # 2 tasks × (2 steps + the query)
