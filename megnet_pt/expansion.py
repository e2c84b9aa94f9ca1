"""Gaussian expansion of interatomic distances."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianExpansion(nn.Module):
    r"""Expand a distance into ``num_centers`` Gaussians on a uniform grid:

    .. math::
        \phi_k(d) = \exp\!\left(-\gamma\,(d - c_k)^2\right),
        \qquad c_k = \mathrm{linspace}(r_\min, r_\max, K)_k

    The published MEGNet uses :math:`\gamma = 0.5`, K = 100 and centres on
    [0, 5] Å. Note that :math:`\gamma` multiplies the squared difference; it is
    not a width :math:`\sigma`.
    """

    def __init__(self, start: float = 0.0, stop: float = 5.0, num_centers: int = 100, gamma: float = 0.5) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("centers", torch.linspace(start, stop, num_centers))

    def forward(self, distance: Tensor) -> Tensor:
        return torch.exp(-self.gamma * (distance.unsqueeze(-1) - self.centers) ** 2)

    def extra_repr(self) -> str:
        return f"num_centers={self.centers.numel()}, gamma={self.gamma}"
