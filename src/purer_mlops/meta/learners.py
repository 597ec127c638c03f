"""MAML, ANIL and ProtoNet as pure functions of a parameter dict (``torch.func``).

A meta-learner maps ``(params, support, support labels, query, query labels)`` of one task to
``(query loss, query accuracy)``. Parameters are re-pointed functionally, never mutated, so
the same function runs task by task (the plain loop) or over a stack of tasks with ``vmap``,
and the outer gradient flows to the meta-parameters (and to the images, for the
adversarial bank update) through the inner loop.

References: Finn et al., ICML 2017 (MAML); Raghu et al., ICLR 2020 (ANIL);
Snell et al., NeurIPS 2017 (ProtoNet).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

Params = dict[str, torch.Tensor]
TaskLoss = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]


class MetaLearner:
    """One meta-learning algorithm bound to a model and its inner-loop settings.

    Args:
        model: a :class:`~purer_mlops.models.backbones.Classifier` whose BatchNorm layers use
            batch statistics (``track_running_stats=False``), so it has no buffers.
        kind: ``maml`` (all parameters adapted), ``anil`` (head only) or ``protonet``.
        inner_steps, inner_lr: SGD steps and step size of the inner loop.
        first_order: drop second-order terms (MAML's ``approx``); test-time adaptation
            uses detached meta-parameters, so it builds no graph at all.
    """

    def __init__(self, model: nn.Module, kind: str, inner_steps: int, inner_lr: float,
                 first_order: bool = False):
        self.model = model
        self.kind = kind
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.first_order = first_order

    # -- building blocks -------------------------------------------------------------------
    def logits(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, way) of images x (B, 3, S, S) under ``params``."""
        return functional_call(self.model, params, (x,))

    def embed(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D): the model without its head."""
        feats = {k.removeprefix("features."): v for k, v in params.items() if k.startswith("features.")}
        return functional_call(self.model.features, feats, (x,))

    def _sgd(self, loss_fn: Callable[[Params], torch.Tensor], fast: Params) -> Params:
        """``inner_steps`` of SGD on ``fast`` (a sub-dict of parameters) minimising ``loss_fn``."""
        for _ in range(self.inner_steps):
            g = grad(loss_fn)(fast)
            if self.first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
        return fast

    def adapt(self, params: Params, xs: torch.Tensor, ys: torch.Tensor) -> Params:
        """Inner loop on the support set (MAML: all parameters; ANIL: head only)."""
        if self.kind == "maml":
            return self._sgd(lambda p: F.cross_entropy(self.logits(p, xs), ys), params)
        if self.kind == "anil":
            feats = self.embed(params, xs)
            head = {k: v for k, v in params.items() if k.startswith("head.")}
            head = self._sgd(lambda h: F.cross_entropy(F.linear(feats, h["head.weight"], h["head.bias"]), ys),
                             head)
            return {**params, **head}
        return params

    def query_logits(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                     way: int) -> torch.Tensor:
        """Logits (Q, way) of the query after adaptation to the support (xs (S,...), ys (S,))."""
        if self.kind == "protonet":
            zs, zq = self.embed(params, xs), self.embed(params, xq)
            # prototypes (way, D): mean support embedding of each class
            onehot = F.one_hot(ys, way).to(zs.dtype)  # (S, way)
            protos = onehot.T @ zs / onehot.sum(0).clamp_min(1).unsqueeze(1)
            return -torch.cdist(zq, protos).pow(2)
        return self.logits(self.adapt(params, xs, ys), xq)

    def task_loss(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                  yq: torch.Tensor, way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy and accuracy (both 0-dim) of one task after adaptation."""
        logits = self.query_logits(params, xs, ys, xq, way)
        acc = (logits.argmax(dim=1) == yq).float().mean()
        return F.cross_entropy(logits, yq), acc

    # -- many tasks ------------------------------------------------------------------------
    def batch_loss(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                   yq: torch.Tensor, way: int, batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query losses and accuracies, each of shape (T,), for T stacked tasks.

        ``xs`` (T, way·shot, 3, S, S), ``ys`` (T, way·shot), ``xq`` (T, way·query, 3, S, S),
        ``yq`` (T, way·query). ``batched`` runs the tasks together with ``vmap``; otherwise
        one after another (the yardstick the benchmarks compare against).
        """
        def one(x_s, y_s, x_q, y_q):
            return self.task_loss(params, x_s, y_s, x_q, y_q, way)

        if batched:
            return vmap(one, randomness="same")(xs, ys, xq, yq)
        pairs = [one(xs[t], ys[t], xq[t], yq[t]) for t in range(xs.shape[0])]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def meta_parameters(model: nn.Module) -> Params:
    """The meta-model's parameters as a dict (the tensors the outer optimiser updates)."""
    return dict(model.named_parameters())
