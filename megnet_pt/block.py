"""The MEGNet block: optional dense layers, a graph convolution, a residual."""
from __future__ import annotations

from torch import Tensor, nn

from .conv import MEGNetConv
from .fast import GraphIndex
from .mlp import MLP


class MEGNetBlock(nn.Module):
    r"""One MEGNet block.

    .. math::
        (\mathbf{e}, \mathbf{v}, \mathbf{u}) \mapsto
        \mathrm{Conv}\big(D_e(\mathbf{e}), D_v(\mathbf{v}), D_u(\mathbf{u})\big) + (\mathbf{e}, \mathbf{v}, \mathbf{u})

    where the dense layers :math:`D = \mathrm{MLP}([d, *\mathrm{dense}])` (last layer
    activated) are present only when ``dense`` is given (all blocks but the first
    in the published model), and the residual adds the block's inputs.
    """

    def __init__(self, dim: int = 32, dense: tuple[int, ...] | None = (64, 32), conv_hidden: tuple[int, ...] = (64, 64, 32)) -> None:
        super().__init__()
        if dense:
            self.edge_dense: nn.Module = MLP([dim, *dense])
            self.node_dense: nn.Module = MLP([dim, *dense])
            self.state_dense: nn.Module = MLP([dim, *dense])
            inner = dense[-1]
        else:
            self.edge_dense = self.node_dense = self.state_dense = nn.Identity()
            inner = dim
        self.conv = MEGNetConv(inner, inner, inner, conv_hidden)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, state: Tensor, batch: Tensor,
                index: GraphIndex | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the updated ``(edge_attr, x, state)`` (``index``: the fast step's, see :mod:`megnet_pt.fast`)."""
        e, v, u = self.conv(self.node_dense(x), edge_index, self.edge_dense(edge_attr), self.state_dense(state), batch,
                            index)
        return e + edge_attr, v + x, u + state
