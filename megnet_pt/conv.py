"""The MEGNet graph convolution: edge, node and state updates."""
from __future__ import annotations

from torch import Tensor
import torch
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from .mlp import MLP


class MEGNetConv(MessagePassing):
    r"""One MEGNet graph convolution (Chen et al., Chem. Mater. 31, 3564, 2019).

    For an edge :math:`k = (i \to j)` of graph :math:`g` (source :math:`i`, target :math:`j`):

    .. math::
        \mathbf{e}'_k &= \phi_e\left([\mathbf{v}_i \,\|\, \mathbf{v}_j \,\|\, \mathbf{e}_k \,\|\, \mathbf{u}_g]\right) \\
        \mathbf{v}'_j &= \phi_v\left([\mathbf{v}_j \,\|\, \mathrm{mean}_{k:\,\mathrm{target}(k)=j}\, \mathbf{e}'_k \,\|\, \mathbf{u}_g]\right) \\
        \mathbf{u}'_g &= \phi_u\left([\mathbf{u}_g \,\|\, \mathrm{mean}_{k \in g}\, \mathbf{e}'_k \,\|\, \mathrm{mean}_{j \in g}\, \mathbf{v}'_j]\right)

    Each :math:`\phi` is an ``MLP([in, *hidden])`` with its last layer activated.
    A node with no incoming edge (or a graph with no edge) gets a zero mean.

    PyG naming: with ``flow="source_to_target"``, ``x_j`` is the *source*
    ``edge_index[0]`` and ``x_i`` the *target* ``edge_index[1]``.

    Args:
        dim_edge, dim_node, dim_state: input feature sizes.
        hidden: hidden and output sizes of the three MLPs (default ``(64, 64, 32)``).
    """

    def __init__(self, dim_edge: int = 32, dim_node: int = 32, dim_state: int = 32, hidden: tuple[int, ...] = (64, 64, 32)) -> None:
        super().__init__(aggr="mean", flow="source_to_target")
        self.edge_mlp = MLP([2 * dim_node + dim_edge + dim_state, *hidden])
        self.node_mlp = MLP([dim_node + hidden[-1] + dim_state, *hidden])
        self.state_mlp = MLP([dim_state + 2 * hidden[-1], *hidden])

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, state: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the updated ``(edge_attr, x, state)``."""
        num_graphs = state.size(0)
        edge_batch = batch[edge_index[0]]
        edge_attr = self.edge_updater(edge_index, x=x, edge_attr=edge_attr, edge_state=state[edge_batch])
        incoming = self.propagate(edge_index, e=edge_attr, size=(x.size(0), x.size(0)))
        x = self.node_mlp(torch.cat([x, incoming, state[batch]], dim=-1))
        edge_mean = scatter(edge_attr, edge_batch, dim=0, dim_size=num_graphs, reduce="mean")
        node_mean = scatter(x, batch, dim=0, dim_size=num_graphs, reduce="mean")
        state = self.state_mlp(torch.cat([state, edge_mean, node_mean], dim=-1))
        return edge_attr, x, state

    def edge_update(self, x_j: Tensor, x_i: Tensor, edge_attr: Tensor, edge_state: Tensor) -> Tensor:
        # x_j is the source (centre) atom, x_i the target (neighbour).
        return self.edge_mlp(torch.cat([x_j, x_i, edge_attr, edge_state], dim=-1))

    def message(self, e: Tensor) -> Tensor:
        return e
