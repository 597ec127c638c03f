"""MAML, ANIL and ProtoNet as pure functions of a weight dict (``torch.func``), behind one interface.

A meta-learner maps the weights and one task (support, support labels, query) to the query
logits after adaptation. Weights are re-pointed functionally, never mutated, so the same
function runs task by task (the plain loop) or over a stack of tasks with ``vmap``, and the
outer gradient flows to the meta-parameters (and to the images, for the adversarial bank
update) through the inner loop.

References: Finn et al., ICML 2017 (MAML); Raghu et al., ICLR 2020 (ANIL);
Snell et al., NeurIPS 2017 (ProtoNet).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .backbones import fast_forward

if TYPE_CHECKING:
    from ..meta.tasks import TaskBatch

Weights = dict[str, torch.Tensor]


def prototypes(z: torch.Tensor, y: torch.Tensor, way: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class prototypes (way, D): the (``weight``-weighted) mean embedding of each class.

    Args:
        z: embeddings (N, D); y: their labels (N,) in 0..way-1; weight: (N,) per-example weights.
    """
    onehot = F.one_hot(y, way).to(z.dtype)  # (N, way)
    if weight is not None:
        onehot = onehot * weight.unsqueeze(1)
    return onehot.T @ z / onehot.sum(0).clamp_min(1).unsqueeze(1)


def prototype_logits(zq: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Logits (Q, way) of query embeddings zq (Q, D): minus the squared distance to each prototype."""
    return -torch.cdist(zq, protos).pow(2)


class MetaLearner:
    """The common part of the algorithms: a model, its inner-loop settings, task losses.

    What the rest of the code asks of an algorithm is a class attribute: ``has_head`` (its
    classes are the outputs of the linear head, so a task has at most that many) and
    ``metric_based`` (the query is classified by distances to class prototypes of embeddings,
    not by the head; ICFIL then re-estimates the prototypes instead of calibrating the head).

    Args:
        model: a :class:`~purer_mlops.models.backbones.Classifier` whose BatchNorm layers use
            batch statistics (``track_running_stats=False``), so it has no buffers.
        inner_steps, inner_lr: SGD steps and step size of the inner loop.
        first_order: drop second-order terms (MAML's ``approx``); test-time adaptation
            uses detached meta-parameters, so it builds no graph at all.
        looped: tasks run one after another, their losses under the model's fast forward
            (:func:`~purer_mlops.models.backbones.fast_forward`: native batch norm, max-pool
            before ReLU), which ``vmap`` cannot run; test-time adaptation then runs channels-last on
            CPU (:mod:`.evaluation`; the meta update stays NCHW: channels-last did not pay there).
            False: the elementary forward, so that tasks can run together under ``vmap``.
        compiled: each inner step runs under ``torch.compile`` (test-time adaptation only: the
            meta-gradient's double backward does not compile).
    """

    has_head: bool = True
    metric_based: bool = False

    def __init__(self, model: nn.Module, inner_steps: int, inner_lr: float, first_order: bool = False,
                 looped: bool = False, compiled: bool = False):
        self.model = model
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.looped = looped
        self.step = torch.compile(self.sgd_step, dynamic=False) if compiled else self.sgd_step

    def replicas(self, count: int) -> list[MetaLearner]:
        """This learner and ``count - 1`` eager copies, each over its own module, for
        :mod:`.lanes`: ``functional_call`` re-points a module's parameters while it runs, so
        lanes running side by side need one module each (the weights themselves are passed in)."""
        return [self, *(type(self)(copy.deepcopy(self.model), self.inner_steps, self.inner_lr, self.first_order,
                                   self.looped) for _ in range(count - 1))]

    def logits(self, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, way) of images x (B, 3, S, S) under ``weights``."""
        return functional_call(self.model, weights, (x,))

    def embed(self, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D): the model without its head."""
        feats = {k.removeprefix("features."): v for k, v in weights.items() if k.startswith("features.")}
        return functional_call(self.model.features, feats, (x,))

    def inner_loss(self, inner: Weights, inputs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The support loss (0-dim) the inner loop minimises over ``inner``, given ``inputs``."""
        raise NotImplementedError(f"{type(self).__name__} has no inner loop")

    def sgd_step(self, inner: Weights, inputs: torch.Tensor, ys: torch.Tensor) -> Weights:
        """One SGD step on ``inner`` (a sub-dict of weights) down :meth:`inner_loss`."""
        with fast_forward(self.looped):  # also inside a compiled step, which traces it
            g = grad(self.inner_loss)(inner, inputs, ys)
        if self.first_order:
            g = {k: v.detach() for k, v in g.items()}
        return {k: inner[k] - self.inner_lr * g[k] for k in inner}

    def sgd(self, inner: Weights, inputs: torch.Tensor, ys: torch.Tensor) -> Weights:
        """``inner_steps`` SGD steps on ``inner`` (:meth:`sgd_step`, or its compiled form)."""
        for _ in range(self.inner_steps):
            inner = self.step(inner, inputs, ys)
        return inner

    def adapt(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor) -> Weights:
        """The inner loop on the support xs (S, 3, H, W), ys (S,); the base learner does not adapt."""
        return weights

    def query_logits(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                     way: int) -> torch.Tensor:
        """Logits (Q, way) of the query xq (Q, 3, H, W) after adaptation to the support."""
        return self.logits(self.adapt(weights, xs, ys), xq)

    def task_loss(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                  yq: torch.Tensor, way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy and accuracy (both 0-dim) of one task after adaptation."""
        with fast_forward(self.looped):
            logits = self.query_logits(weights, xs, ys, xq, way)
        acc = (logits.argmax(dim=1) == yq).float().mean()
        return F.cross_entropy(logits, yq), acc

    def batch_loss(self, weights: Weights, tasks: TaskBatch, batched: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query losses and accuracies, each of shape (T,), for the T tasks of ``tasks``.

        ``batched`` runs the tasks together with ``vmap``; otherwise one after another (the
        yardstick the benchmarks compare against).
        """
        def one(x_s, y_s, x_q, y_q):
            return self.task_loss(weights, x_s, y_s, x_q, y_q, tasks.way)

        if batched:
            return vmap(one, randomness="same")(tasks.xs, tasks.ys, tasks.xq, tasks.yq)
        pairs = [one(*tasks.task(t)) for t in range(len(tasks))]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class MAML(MetaLearner):
    """MAML: every weight takes the inner-loop steps."""

    def inner_loss(self, inner: Weights, inputs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(inner, inputs), ys)

    def adapt(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor) -> Weights:
        return self.sgd(weights, xs, ys)


class ANIL(MetaLearner):
    """ANIL: only the head (the linear classifier) takes the inner-loop steps."""

    def inner_loss(self, inner: Weights, inputs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        # inner: the head; inputs: the support's embeddings
        return F.cross_entropy(F.linear(inputs, inner["head.weight"], inner["head.bias"]), ys)

    def adapt(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor) -> Weights:
        head = {k: v for k, v in weights.items() if k.startswith("head.")}
        return {**weights, **self.sgd(head, self.embed(weights, xs), ys)}


class ProtoNet(MetaLearner):
    """ProtoNet: no inner loop; the query is classified by its distance to the class prototypes."""

    has_head = False
    metric_based = True

    def query_logits(self, weights: Weights, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                     way: int) -> torch.Tensor:
        zs, zq = self.embed(weights, xs), self.embed(weights, xq)
        return prototype_logits(zq, prototypes(zs, ys, way))


LEARNERS: dict[str, type[MetaLearner]] = {"maml": MAML, "anil": ANIL, "protonet": ProtoNet}


def build_learner(kind: str, model: nn.Module, inner_steps: int, inner_lr: float,
                  first_order: bool = False, looped: bool = False, compiled: bool = False) -> MetaLearner:
    """The meta-learner named ``kind`` (a key of :data:`LEARNERS`) for ``model``."""
    return LEARNERS[kind](model, inner_steps, inner_lr, first_order, looped, compiled)
