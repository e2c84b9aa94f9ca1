"""The MEGNet graph convolution: edge, node and state updates."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from .fast import GraphIndex, conv_forward
from .mlp import MLP


class MEGNetConv(nn.Module):
    r"""One MEGNet graph convolution (Chen et al., Chem. Mater. 31, 3564, 2019).

    For an edge :math:`k = (i \to j)` of graph :math:`g` (source :math:`i`, target :math:`j`):

    .. math::
        \mathbf{e}'_k &= \phi_e\left([\mathbf{v}_i \,\|\, \mathbf{v}_j \,\|\, \mathbf{e}_k \,\|\, \mathbf{u}_g]\right) \\
        \mathbf{v}'_j &= \phi_v\left([\mathbf{v}_j \,\|\, \mathrm{mean}_{k:\,\mathrm{target}(k)=j}\, \mathbf{e}'_k \,\|\, \mathbf{u}_g]\right) \\
        \mathbf{u}'_g &= \phi_u\left([\mathbf{u}_g \,\|\, \mathrm{mean}_{k \in g}\, \mathbf{e}'_k \,\|\, \mathrm{mean}_{j \in g}\, \mathbf{v}'_j]\right)

    Each :math:`\phi` is an ``MLP([in, *hidden])`` with its last layer activated.
    A node with no incoming edge (or a graph with no edge) gets a zero mean.

    Edges are ``edge_index[0]`` (source) -> ``edge_index[1]`` (target), as PyG's
    ``flow="source_to_target"``. The gathers and means are written out with
    ``torch_geometric.utils.scatter`` (what ``MessagePassing.propagate`` would
    call, without its per-call Python machinery, which is a sizeable share of a
    CPU step on small batches).

    Args:
        dim_edge, dim_node, dim_state: input feature sizes.
        hidden: hidden and output sizes of the three MLPs (default ``(64, 64, 32)``).
    """

    def __init__(self, dim_edge: int = 32, dim_node: int = 32, dim_state: int = 32, hidden: tuple[int, ...] = (64, 64, 32)) -> None:
        super().__init__()
        self.edge_mlp = MLP([2 * dim_node + dim_edge + dim_state, *hidden])
        self.node_mlp = MLP([dim_node + hidden[-1] + dim_state, *hidden])
        self.state_mlp = MLP([dim_state + 2 * hidden[-1], *hidden])

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, state: Tensor, batch: Tensor,
                index: GraphIndex | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the updated ``(edge_attr, x, state)``; given ``index``, by the fast step's
        :func:`megnet_pt.fast.conv_forward` (the same function, fewer operators)."""
        if index is not None:
            return conv_forward(self, x, edge_attr, state, index)
        num_graphs = state.size(0)
        source, target = edge_index[0], edge_index[1]
        edge_batch = batch[source]
        # index_select, not x[source]: the same values, and a backward (index_add) about twice as fast on a CPU
        gathered = [x.index_select(0, source), x.index_select(0, target), edge_attr, state.index_select(0, edge_batch)]
        edge_attr = self.edge_mlp(torch.cat(gathered, dim=-1))
        incoming = scatter(edge_attr, target, dim=0, dim_size=x.size(0), reduce="mean")
        x = self.node_mlp(torch.cat([x, incoming, state.index_select(0, batch)], dim=-1))
        edge_mean = scatter(edge_attr, edge_batch, dim=0, dim_size=num_graphs, reduce="mean")
        node_mean = scatter(x, batch, dim=0, dim_size=num_graphs, reduce="mean")
        state = self.state_mlp(torch.cat([state, edge_mean, node_mean], dim=-1))
        return edge_attr, x, state
