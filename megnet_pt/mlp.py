"""Softplus2 activation and the MLP convention of MEGNet."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .fast import mlp_forward


def softplus2(x: Tensor) -> Tensor:
    r""":math:`\mathrm{softplus2}(x) = \log(1 + e^x) - \log 2`, zero at the origin."""
    return F.softplus(x) - math.log(2.0)


class SoftPlus2(nn.Module):
    """Module form of :func:`softplus2`."""

    def forward(self, x: Tensor) -> Tensor:
        return softplus2(x)


class MLP(nn.Module):
    r"""``MLP([d0, ..., dk])`` = Linear(d0, d1), act, ..., Linear(d_{k-1}, dk) [, act].

    Layers are kept in ``self.layers`` (an ``nn.Sequential``) whose indices count
    the activations too, so Linear layers sit at even indices 0, 2, 4, ...
    The last activation is present only when ``activate_last`` is true.
    With ``fast`` set (:func:`megnet_pt.fast.set_fast`), the whole MLP is one
    autograd node with its backward written out (:mod:`megnet_pt.fast`).
    """

    def __init__(self, dims: Sequence[int], activate_last: bool = True, activation: type[nn.Module] = SoftPlus2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2 or activate_last:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)
        self.dims = tuple(dims)
        self.activate_last = activate_last
        self.fast = False
        self.fast_activation = "softplus2" if activation is SoftPlus2 else None

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and self.fast_activation:
            return mlp_forward(x, self.linears(), self.fast_activation, self.activate_last)
        return self.layers(x)
