r"""M ParAIsite models trained as one: stacked parameters, one vmapped forward, one backward.

The parameters of the M models (one per split) are stacked along a leading
model axis, :math:`\Theta = [\theta_1, \dots, \theta_M]`
(``torch.func.stack_module_state``), and one call of ``ParAIsite.forward``,
vectorised over that axis with ``torch.func.vmap`` + ``functional_call``, does
the work of M on a padded batch (:mod:`paraisite.training.padding`). With
:math:`f(\theta; G) \in \mathbb R^S` the standardised prediction of every slot
and :math:`(\mu_m, \sigma_m)` the target transform of split m,

.. math::
    \hat y_{m,j} &= 10^{\min(f(\theta_m; G_m)_j\sigma_m + \mu_m,\ 6)} - 1 \\
    L(\Theta) &= \sum_{m=1}^M \underbrace{\frac{1}{b_m} \sum_{j < b_m}
        \frac{|y_{m,j} - \hat y_{m,j}|}{\max(|y_{m,j}|, \epsilon)}}_{\mathrm{MAPE}_m(\theta_m)}

with empty slots masked out. Since :math:`\mathrm{MAPE}_m` depends on
:math:`\theta_m` alone, :math:`\partial L / \partial \theta_m = \nabla
\mathrm{MAPE}_m(\theta_m)`: one backward pass gives every split its own
gradient. Adam is elementwise, so Adam on :math:`\Theta` is M independent
Adams. The result is that of M separate runs, to float32 round-off.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from megnet_pt import MEGNet

from ..evaluation.metrics import mape_loss, training_loss
from ..model import ParAIsite
from .padding import PackedGraphs, PaddedBatch, pad_batches
from ..transform import TargetTransform, inverse_transform

VAL_CHUNK = 256  # graphs per split per validation call, as paraisite.model.predict


class StackedModel:
    """M ParAIsite models of one architecture as stacked tensors, evaluated with one vmapped call."""

    def __init__(self, models: list[ParAIsite], device: torch.device) -> None:
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in params.items()}
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        with torch.device("meta"):
            self.base = ParAIsite(MEGNet(models[0].megnet.config))

    def trainable(self) -> list[Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def __call__(self, x: PaddedBatch) -> Tensor:
        """Standardised predictions ``[M, S]`` of every graph slot."""
        S = x.num_slots

        def one(params, buffers, node_type, edge_index, edge_dist, batch, state):
            graph = SimpleNamespace(node_type=node_type, edge_index=edge_index, edge_dist=edge_dist, batch=batch,
                                    state=state, num_graphs=S)
            return functional_call(self.base, (params, buffers), (graph,))

        return vmap(one)(self.params, self.buffers, x.node_type, x.edge_index, x.edge_dist, x.batch, x.state)

    def member_state(self, m: int) -> dict[str, Tensor]:
        """The state dict of member ``m`` (views into the stacked tensors)."""
        return {k: v[m].detach() for k, v in self.params.items()} | {k: v[m] for k, v in self.buffers.items()}

    def load_into(self, m: int, model: ParAIsite) -> ParAIsite:
        """Copy the weights of member ``m`` into ``model`` (to save it)."""
        model.load_state_dict(self.member_state(m))
        return model


def clip_members(params: list[Tensor], max_norm: float) -> None:
    r"""``torch.nn.utils.clip_grad_norm_`` for each member alone: :math:`g_m \leftarrow g_m \min(1, c/(\lVert g_m \rVert + 10^{-6}))`.

    ``params`` are stacked (dimension 0 is the member), so each member's norm is
    taken over its own slices of every tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


def train_step(net: StackedModel, optimizer: torch.optim.Optimizer, x: PaddedBatch, mean: Tensor,
               std: Tensor, clip_grad_norm: float | None = None, loss: str = "mape") -> Tensor:
    """One Adam step of every member on its own batch; returns the M training losses (detached).

    ``mean``, ``std``: ``[M, 1]``, each member's target transform; ``loss`` as
    :func:`paraisite.evaluation.metrics.training_loss` (MAPE in the formula above).
    """
    z = net(x)[:, : x.num_real]
    losses = training_loss(z, x.target, mean, std, loss, mask=x.mask, count=x.count)
    optimizer.zero_grad(set_to_none=True)
    # the members' losses do not share parameters, so d(sum)/d(theta_m) = d(loss_m)/d(theta_m)
    losses.sum().backward()
    if clip_grad_norm:
        clip_members(net.trainable(), clip_grad_norm)
    optimizer.step()
    return losses.detach()


@contextlib.contextmanager
def _side_stream_warning_ignored() -> Iterator[None]:
    """The recorded backward runs on make_graphed_callables' side stream, which autograd warns of; harmless here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
        yield


class CUDAGraphStep:
    r"""``train_step`` with its forward and backward recorded as CUDA graphs and replayed.

    On a GPU one eager step of the stacked model launches about a thousand
    small kernels and waits on the host that launches them
    (``benchmarks/bench_train.py``). Every batch is padded to one of a few
    fixed shapes (:func:`padded_shapes`), and for each shape the map

    .. math::
        (\Theta, G) \mapsto \big[\mathrm{MAPE}_m(\theta_m)\big]_{m=1..M}

    and its backward are recorded the first time the shape comes up
    (``torch.cuda.make_graphed_callables``, whose warm-up calls take gradients
    without touching ``.grad``, so they do not train) and replayed after that.
    Padding adds only dummy graphs, their nodes and edges, and empty slots,
    which change no real graph's output. The optimiser step (fused Adam, a few
    kernels) stays eager, so the optimiser, its schedule and the resume state
    are those of ``train_step``.
    """

    def __init__(self, net: StackedModel, mean: Tensor, std: Tensor, loss: str = "mape") -> None:
        self.net, self.params, self.mean, self.std, self.loss = net, net.trainable(), mean, std, loss
        self.graphs: dict[tuple[int, int, int], Any] = {}

    @staticmethod
    def _inputs(x: PaddedBatch) -> tuple[Tensor, ...]:
        return (x.node_type, x.edge_index, x.edge_dist, x.batch, x.state, x.target, x.mask, x.count)

    def _record(self, x: PaddedBatch) -> Any:
        n, net, mean, std, loss = len(self.params), self.net, self.mean, self.std, self.loss

        def losses(*args: Tensor) -> Tensor:  # args: the trainable tensors of net.params, then the batch's
            batch = PaddedBatch(*args[n:])
            z = net(batch)[:, : batch.num_real]
            return training_loss(z, batch.target, mean, std, loss, mask=batch.mask, count=batch.count)

        with _side_stream_warning_ignored(), torch.cuda.device(x.node_type.device):
            return torch.cuda.make_graphed_callables(losses, (*self.params, *self._inputs(x)))

    def __call__(self, optimizer: torch.optim.Optimizer, x: PaddedBatch, clip_grad_norm: float | None = None) -> Tensor:
        """As :func:`train_step` (``x`` padded by :func:`pad_batches` with ``shapes``)."""
        shape = (x.node_type.shape[1], x.edge_index.shape[2], x.num_slots)
        if shape not in self.graphs:
            self.graphs[shape] = self._record(x)
        losses = self.graphs[shape](*self.params, *self._inputs(x))
        optimizer.zero_grad(set_to_none=True)
        with _side_stream_warning_ignored():
            losses.sum().backward()
        if clip_grad_norm:
            clip_members(self.params, clip_grad_norm)
        optimizer.step()
        return losses.detach()


@torch.no_grad()
def validate(net: StackedModel, packed: PackedGraphs, val_idx: list[np.ndarray],
             transforms: list[TargetTransform]) -> list[float]:
    """Validation MAPE of every member on its own validation part, vectorised (for a GPU).

    As ``paraisite.model.predict`` + ``mape_loss``: chunks of 256 graphs per member,
    back-transform in float64.
    """
    mean = torch.tensor([t.mean for t in transforms], dtype=torch.float64, device=packed.ltc.device)
    std = torch.tensor([t.std for t in transforms], dtype=torch.float64, device=packed.ltc.device)
    preds = []
    for i in range(0, max(len(v) for v in val_idx), VAL_CHUNK):
        x = pad_batches(packed, [v[i : i + VAL_CHUNK] for v in val_idx])
        preds.append(inverse_transform(net(x)[:, : x.num_real].double(), mean[:, None], std[:, None]).float().cpu())
    pred = torch.cat(preds, dim=1)
    ltc = packed.ltc.cpu()
    return [float(mape_loss(pred[m, : len(v)], ltc[torch.from_numpy(v)])) for m, v in enumerate(val_idx)]
