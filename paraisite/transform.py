"""The target transform: log10(y + 1), then standardisation fitted on training labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Guard on the back-transform: 10**6 W/m/K is far above any real LTC (the
# largest label is ~1.8e3), and clamping there keeps an early bad step from
# overflowing to inf/NaN.
MAX_LOG10 = 6.0


@dataclass
class TargetTransform:
    r"""Map LTC :math:`y` (W/m/K) to the network's target and back.

    .. math::
        z = \frac{\log_{10}(y + 1) - \mu}{\sigma}, \qquad
        y = 10^{\min(z\sigma + \mu,\ 6)} - 1

    :math:`\mu, \sigma` are the mean and population standard deviation of
    :math:`\log_{10}(y + 1)` over the *training* part of a split only (upstream
    fitted them on the whole dataset, leaking the validation fold).
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, y: Tensor) -> "TargetTransform":
        t = torch.log10(torch.as_tensor(y, dtype=torch.float64) + 1)
        std = float(t.std(unbiased=False))
        return cls(float(t.mean()), std if std > 0 else 1.0)

    def forward(self, y: Tensor) -> Tensor:
        return (torch.log10(y + 1) - self.mean) / self.std

    def inverse(self, z: Tensor) -> Tensor:
        return inverse_transform(z, self.mean, self.std)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


def inverse_transform(z: Tensor, mean: float | Tensor, std: float | Tensor) -> Tensor:
    r""":math:`y = 10^{\min(z\sigma + \mu,\ 6)} - 1`; ``mean``, ``std`` numbers, or tensors that broadcast
    against ``z`` (one transform per model of a stack)."""
    return torch.pow(10.0, torch.clamp(z * std + mean, max=MAX_LOG10)) - 1
