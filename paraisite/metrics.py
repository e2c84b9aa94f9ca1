"""Loss and regression metrics, in original units (W/m/K)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def mape_loss(y_pred: Tensor, y_true: Tensor, eps: float = 1e-8, mask: Tensor | None = None,
              count: Tensor | None = None) -> Tensor:
    r"""Mean absolute percentage error as a fraction: :math:`\frac1n\sum_i |y_i - \hat y_i| / \max(|y_i|, \epsilon)`.

    With ``mask`` (1 for a real entry) and ``count`` (real entries per row) the
    mean is taken per row over the real entries: one MAPE per stacked model.
    """
    error = (y_true - y_pred).abs() / y_true.abs().clamp(min=eps)
    if mask is None:
        return error.mean()
    return (error * mask).sum(dim=-1) / count


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """MAPE (fraction), MAE, RMSE and R^2 of predictions in original units."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"metrics need two equal-length, non-empty arrays (got {t.shape} and {p.shape})")
    err = p - t
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return {
        "mape": float(mape_loss(torch.from_numpy(p), torch.from_numpy(t))),
        "mae": float(np.abs(err).mean()),
        "rmse": float(math.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
    }
