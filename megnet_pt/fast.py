r"""The fast step: MEGNet's MLPs and blocks as a few autograd nodes, their backward written out in C++.

An ``MLP([d0, ..., dk])`` of :mod:`megnet_pt.mlp` is, for autograd, ``2k`` to
``3k`` nodes (``addmm``, ``softplus``, ``sub`` per layer), each with its own
dispatch, saved tensors and backward call; a MEGNet block adds the gathers,
concatenations and means around its three MLPs. On a CPU with MEGNet's small
matrices that bookkeeping costs more than the arithmetic. ``fast_mlp.cpp``
makes a whole MLP one node (``mlp``) and a whole :class:`~megnet_pt.conv.MEGNetConv`
update another (``conv``):

.. math::
    \mathbf{z}_l = \mathbf{h}_{l-1} W_l^\top + \mathbf{b}_l,\qquad
    \mathbf{h}_l = \sigma(\mathbf{z}_l)\quad(\mathbf{h}_0 = \mathbf{x})

forward saves each layer's input :math:`\mathbf{h}_{l-1}` and the derivative
of its activation :math:`\sigma'(\mathbf{z}_l)` (softplus2: the logistic
sigmoid, computed in the same pass as softplus2 itself; ReLU: the output);
backward is, from the last layer down,

.. math::
    \mathbf{g}_l \leftarrow \mathbf{g}_l \odot \sigma'(\mathbf{z}_l),\quad
    \partial W_l = \mathbf{g}_l^\top \mathbf{h}_{l-1},\quad
    \partial \mathbf{b}_l = \textstyle\sum_i \mathbf{g}_{l,i},\quad
    \mathbf{g}_{l-1} = \mathbf{g}_l W_l

one matrix product per weight gradient and one per input gradient, none for
what needs no gradient (MEGNet while it is frozen, the input of the first
layer). The function is the module's; the float32 sums run in another order
and softplus2 is the kernel's own (within 2e-7 of torch's), so a run with it
does not reproduce a plain run bit for bit: the fast step is a switch of its
own (:func:`set_fast`, ``train.py --fast-step``), recorded where a run records
its settings. ``fast_mlp.cpp`` is compiled on first use (:func:`fast_ops`);
checked against autograd by ``torch.autograd.gradcheck`` in float64 and against
the plain model's gradients (``tests/test_fast_step.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

ACTIVATIONS = ("softplus2", "relu")


_ops = None


def fast_ops():
    """The compiled operators of ``fast_mlp.cpp``: built on first use by ``torch.utils.cpp_extension`` (a C++
    compiler and ninja; about 40 s, then cached in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)."""
    global _ops
    if _ops is None:
        from torch.utils.cpp_extension import load

        try:
            _ops = load("megnet_pt_fast_mlp", [str(Path(__file__).with_name("fast_mlp.cpp"))],
                        extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"])
        except (RuntimeError, OSError, ImportError) as err:
            raise RuntimeError(f"the fast step needs its C++ operators (megnet_pt/fast_mlp.cpp) compiled, which "
                               f"failed: {err}. Install a C++ compiler (g++) and ninja (pip install ninja), or train without the "
                               "fast step") from err
    return _ops


def mlp_forward(x: Tensor, linears: list[nn.Linear], activation: str, activate_last: bool,
                activate_input: bool = False) -> Tensor:
    """The MLP of ``linears`` (activation between them, and after the last when ``activate_last``) as one autograd
    node; with ``activate_input``, ``x`` is a pre-activation, activated first."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    params = [t for lin in linears for t in (lin.weight, lin.bias)]
    shape = x.shape
    out = fast_ops().mlp(x.reshape(-1, shape[-1]), params, ACTIVATIONS.index(activation), activate_last, activate_input)
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
        return count.to(dtype).reciprocal().unsqueeze(-1)

    return GraphIndex(source, target, edge_batch, batch, inv_count(target, num_nodes), inv_count(edge_batch, num_graphs),
                      inv_count(batch, num_graphs))


def conv_forward(conv: nn.Module, x: Tensor, edge_attr: Tensor, state: Tensor, index: GraphIndex) -> tuple[Tensor, Tensor, Tensor]:
    r""":class:`megnet_pt.conv.MEGNetConv`'s update as one autograd node (``fast_mlp.cpp``'s ``ConvFunction``).

    The edge MLP's first layer reads :math:`[\mathbf{v}_i \| \mathbf{v}_j \| \mathbf{e}_k \| \mathbf{u}_g]`;
    its product with :math:`W = [W_s \| W_t \| W_e \| W_u]` is computed per atom
    (:math:`\mathbf{v} [W_s \| W_t]^\top`, one product for both ends) and per graph
    (:math:`\mathbf{u} W_u^\top + \mathbf{b}`) before it is gathered to the edges, so only
    :math:`\mathbf{e}_k W_e^\top` is a product over edges: a quarter of the layer's
    multiplications for MEGNet's sizes. The means divide by counts computed once per forward
    (:class:`GraphIndex`); the backward is written out.
    """
    mlps = (conv.edge_mlp, conv.node_mlp, conv.state_mlp)
    params = [t for mlp in mlps for lin in mlp.linears() for t in (lin.weight, lin.bias)]
    e, v, u = fast_ops().conv(x, edge_attr, state, params, list(index), [len(mlp.linears()) for mlp in mlps])
    return e, v, u
