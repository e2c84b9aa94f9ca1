r"""The fast step: an MLP as one autograd node, its backward written out.

An ``MLP([d0, ..., dk])`` of :mod:`megnet_pt.mlp` is, for autograd, ``2k`` to
``3k`` nodes (``addmm``, ``softplus``, ``sub`` per layer), each with its own
dispatch, saved tensors and backward call. On a CPU with MEGNet's small
matrices that bookkeeping costs more than the arithmetic. :class:`MLPFunction`
is the whole MLP as one :class:`torch.autograd.Function`:

.. math::
    \mathbf{z}_l = \mathbf{h}_{l-1} W_l^\top + \mathbf{b}_l,\qquad
    \mathbf{h}_l = \sigma(\mathbf{z}_l)\quad(\mathbf{h}_0 = \mathbf{x})

forward saves each layer's input :math:`\mathbf{h}_{l-1}` and the derivative
of its activation :math:`\sigma'(\mathbf{z}_l)` (softplus2: the logistic
sigmoid; ReLU: the mask :math:`z > 0`), computed once; backward is, from the
last layer down,

.. math::
    \mathbf{g}_l \leftarrow \mathbf{g}_l \odot \sigma'(\mathbf{z}_l),\quad
    \partial W_l = \mathbf{g}_l^\top \mathbf{h}_{l-1},\quad
    \partial \mathbf{b}_l = \textstyle\sum_i \mathbf{g}_{l,i},\quad
    \mathbf{g}_{l-1} = \mathbf{g}_l W_l

one matrix product per weight gradient and one per input gradient, none for
what needs no gradient (a frozen layer, MEGNet while its parameters are
frozen, the input of the first layer). The forward is the same arithmetic as
the module's (``addmm``, ``softplus - log 2``), so outputs are bit for bit the
same; gradients agree to rounding (the sums are ordered differently), which is
why the fast step is a switch of its own (:func:`set_fast`), recorded where a
run records its settings. Checked against autograd by ``torch.autograd.gradcheck``
in float64 (``tests/test_fast_step.py``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG2 = math.log(2.0)
ACTIVATIONS = ("softplus2", "relu")


class MLPFunction(torch.autograd.Function):
    """``MLPFunction.apply(x, activation, activate_last, activate_input, w1, b1, ..., wk, bk)``: the MLP, one autograd node."""

    @staticmethod
    def forward(ctx, x: Tensor, activation: str, activate_last: bool, activate_input: bool, *params: Tensor) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        act = _softplus2_and_slope if activation == "softplus2" else _relu_and_slope
        inputs: list[Tensor] = []
        slopes: list[Tensor | None] = []
        input_slope = None
        h = x
        if activate_input:  # x is the pre-activation of a layer computed outside (MEGNetConv's split first layer)
            h, input_slope = act(x)
        for layer, (w, b) in enumerate(zip(weights, biases)):
            inputs.append(h)
            z = torch.addmm(b, h, w.t())
            if layer == len(weights) - 1 and not activate_last:
                slopes.append(None)
                h = z
            else:
                h, slope = act(z)
                slopes.append(slope)
        ctx.num_layers = len(weights)
        ctx.save_for_backward(input_slope, *inputs, *slopes, *weights)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        n = ctx.num_layers
        input_slope, *saved = ctx.saved_tensors
        inputs, slopes, weights = saved[:n], saved[n : 2 * n], saved[2 * n :]
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (2 * n)
        g = grad
        for layer in range(n - 1, -1, -1):
            slope = slopes[layer]
            if slope is not None:
                g = g * slope
            if needs[4 + 2 * layer]:
                grads[2 * layer] = g.t().mm(inputs[layer])
            if needs[5 + 2 * layer]:
                grads[2 * layer + 1] = g.sum(0)
            if layer == 0 and not needs[0]:
                return (None, None, None, None, *grads)
            g = g.mm(weights[layer])
        if input_slope is not None:
            g = g * input_slope
        return (g, None, None, None, *grads)


def _softplus2_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    """softplus2(z) and its derivative, the logistic sigmoid of z."""
    return F.softplus(z).sub_(LOG2), torch.sigmoid(z)


def _relu_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.relu(z), z > 0


def mlp_forward(x: Tensor, linears: list[nn.Linear], activation: str, activate_last: bool,
                activate_input: bool = False) -> Tensor:
    """The MLP of ``linears`` (activation between them, and after the last when ``activate_last``) as one node;
    with ``activate_input``, ``x`` is a pre-activation, activated first."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    params = [t for lin in linears for t in (lin.weight, lin.bias)]
    shape = x.shape
    if not torch.is_grad_enabled():  # inference: the same arithmetic, nothing saved, no derivative computed
        h = x.reshape(-1, shape[-1])
        act = F.softplus if activation == "softplus2" else F.relu
        if activate_input:
            h = act(h).sub_(LOG2) if activation == "softplus2" else act(h)
        for layer, lin in enumerate(linears):
            h = torch.addmm(lin.bias, h, lin.weight.t())
            if layer < len(linears) - 1 or activate_last:
                h = act(h).sub_(LOG2) if activation == "softplus2" else act(h)
        return h.reshape(*shape[:-1], h.shape[-1])
    out = MLPFunction.apply(x.reshape(-1, shape[-1]), activation, activate_last, activate_input, *params)
    return out.reshape(*shape[:-1], out.shape[-1])


def set_fast(module: nn.Module, fast: bool = True) -> nn.Module:
    """Switch the fast step on (or off) in every part of ``module`` that has one; returns ``module``."""
    for m in module.modules():
        if hasattr(m, "fast"):
            m.fast = fast
    return module


def is_fast(module: nn.Module) -> bool:
    """Whether any part of ``module`` runs the fast step."""
    return any(getattr(m, "fast", False) for m in module.modules())


class GraphIndex(NamedTuple):
    """What every block of one forward reads of the batch's connectivity, computed once per forward."""

    source: Tensor  # [E] edge source atoms
    target: Tensor  # [E] edge target atoms
    edge_batch: Tensor  # [E] the graph of each edge
    batch: Tensor  # [N] the graph of each atom
    inv_in_degree: Tensor  # [N, 1] 1 / incoming edges (1 where none: a zero mean)
    inv_edges: Tensor  # [B, 1] 1 / edges of each graph
    inv_nodes: Tensor  # [B, 1] 1 / atoms of each graph


def graph_index(edge_index: Tensor, batch: Tensor, num_nodes: int, num_graphs: int, dtype: torch.dtype) -> GraphIndex:
    source, target = edge_index[0], edge_index[1]
    edge_batch = batch.index_select(0, source)

    def inv_count(index: Tensor, size: int) -> Tensor:
        count = torch.bincount(index, minlength=size).clamp_min_(1)
        return count.reciprocal().to(dtype).unsqueeze(-1)

    return GraphIndex(source, target, edge_batch, batch, inv_count(target, num_nodes), inv_count(edge_batch, num_graphs),
                      inv_count(batch, num_graphs))


def _mean_by(x: Tensor, index: Tensor, inv_count: Tensor) -> Tensor:
    return x.new_zeros(inv_count.size(0), x.size(1)).index_add(0, index, x) * inv_count


def conv_forward(conv: nn.Module, x: Tensor, edge_attr: Tensor, state: Tensor, index: GraphIndex) -> tuple[Tensor, Tensor, Tensor]:
    r""":class:`megnet_pt.conv.MEGNetConv`'s update with a fraction of its arithmetic and operators.

    The edge MLP's first layer reads :math:`[\mathbf{v}_i \| \mathbf{v}_j \| \mathbf{e}_k \| \mathbf{u}_g]`;
    its product with :math:`W = [W_s \| W_t \| W_e \| W_u]` is computed per atom
    (:math:`\mathbf{v} [W_s \| W_t]^\top`, one product for both ends) and per graph
    (:math:`\mathbf{u} W_u^\top + \mathbf{b}`) before it is gathered to the edges, so only
    :math:`\mathbf{e}_k W_e^\top` is a product over edges: a quarter of the layer's
    multiplications for MEGNet's sizes. The rest of each MLP is one :class:`MLPFunction`;
    the means divide by counts computed once per forward (:class:`GraphIndex`).
    """
    edge_linears = conv.edge_mlp.linears()
    first = edge_linears[0]
    dv, de = x.size(1), edge_attr.size(1)
    w = first.weight
    both_ends = x.mm(torch.cat([w[:, :dv], w[:, dv : 2 * dv]], dim=0).t())  # [N, 2 * hidden]: source | target parts
    width = w.size(0)
    per_graph = torch.addmm(first.bias, state, w[:, 2 * dv + de :].t())
    pre = torch.addmm(per_graph.index_select(0, index.edge_batch), edge_attr, w[:, 2 * dv : 2 * dv + de].t())
    pre = pre + both_ends[:, :width].index_select(0, index.source) + both_ends[:, width:].index_select(0, index.target)
    edge_attr = mlp_forward(pre, edge_linears[1:], "softplus2", conv.edge_mlp.activate_last, activate_input=True)
    incoming = _mean_by(edge_attr, index.target, index.inv_in_degree)
    x = mlp_forward(torch.cat([x, incoming, state.index_select(0, index.batch)], dim=-1), conv.node_mlp.linears(),
                    "softplus2", conv.node_mlp.activate_last)
    edge_mean = _mean_by(edge_attr, index.edge_batch, index.inv_edges)
    node_mean = _mean_by(x, index.batch, index.inv_nodes)
    state = mlp_forward(torch.cat([state, edge_mean, node_mean], dim=-1), conv.state_mlp.linears(), "softplus2",
                        conv.state_mlp.activate_last)
    return edge_attr, x, state
