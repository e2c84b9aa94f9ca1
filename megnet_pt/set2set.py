"""Set2Set readout whose LSTM step is written out, so ``torch.func.vmap`` can batch it."""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.nn import aggr
from torch_geometric.utils import softmax


class Set2Set(aggr.Set2Set):
    r"""PyG's :class:`~torch_geometric.nn.aggr.Set2Set` (same parameters, same ``lstm.*`` layout):

    .. math::
        \mathbf{q}_t = \mathrm{LSTM}(\mathbf{q}^*_{t-1}),\quad
        \alpha_{i,t} = \mathrm{softmax}_i(\mathbf{x}_i \cdot \mathbf{q}_t),\quad
        \mathbf{r}_t = \sum_i \alpha_{i,t}\,\mathbf{x}_i,\quad
        \mathbf{q}^*_t = [\mathbf{q}_t \,\|\, \mathbf{r}_t]

    with the single-layer LSTM cell computed from its weights,

    .. math::
        [\mathbf{i}, \mathbf{f}, \mathbf{g}, \mathbf{o}] = W_{ih}\mathbf{q}^*_{t-1} + b_{ih} + W_{hh}\mathbf{h}_{t-1} + b_{hh},\quad
        \mathbf{c}_t = \sigma(\mathbf{f}) \odot \mathbf{c}_{t-1} + \sigma(\mathbf{i}) \odot \tanh(\mathbf{g}),\quad
        \mathbf{q}_t = \mathbf{h}_t = \sigma(\mathbf{o}) \odot \tanh(\mathbf{c}_t)

    instead of calling ``torch.nn.LSTM``: ``aten::lstm`` has no ``vmap``
    batching rule, and written out the whole model can be vectorised over an
    ensemble of weights (``torch.func.stack_module_state``). A graph with no
    element (e.g. no edge) reads out zeros for :math:`\mathbf{r}`.
    """

    def __init__(self, in_channels: int, processing_steps: int) -> None:
        super().__init__(in_channels, processing_steps)

    def forward(self, x: Tensor, index: Tensor | None = None, ptr: Tensor | None = None,
                dim_size: int | None = None, dim: int = -2) -> Tensor:
        self.assert_index_present(index)
        self.assert_two_dimensional_input(x, dim)
        lstm = self.lstm
        h = x.new_zeros((dim_size, self.in_channels))
        c = x.new_zeros((dim_size, self.in_channels))
        q_star = x.new_zeros((dim_size, self.out_channels))
        for _ in range(self.processing_steps):
            gates = q_star @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            e = (x * h.index_select(0, index)).sum(dim=-1, keepdim=True)  # as h[index], with a faster backward
            a = softmax(e, index, ptr, dim_size, dim)
            r = self.reduce(a * x, index, ptr, dim_size, dim, reduce="sum")
            q_star = torch.cat([h, r], dim=-1)
        return q_star
