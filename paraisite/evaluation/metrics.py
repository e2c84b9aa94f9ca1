"""Training losses and regression metrics, in original units (W/m/K)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..transform import inverse_transform

LOSSES = ("mape", "log10")


def mape_loss(y_pred: Tensor, y_true: Tensor, eps: float = 1e-8, mask: Tensor | None = None,
              count: Tensor | None = None) -> Tensor:
    r"""Mean absolute percentage error as a fraction: :math:`\frac1n\sum_i |y_i - \hat y_i| / \max(|y_i|, \epsilon)`.

    With ``mask`` (1 for a real entry) and ``count`` (real entries per row) the
    mean is taken per row over the real entries: one MAPE per stacked model.
    """
    return _mean((y_true - y_pred).abs() / y_true.abs().clamp(min=eps), mask, count)


def _mean(error: Tensor, mask: Tensor | None, count: Tensor | None) -> Tensor:
    """The mean of ``error``, or with ``mask`` (1 for a real entry) the mean of each row over its ``count`` real entries."""
    return error.mean() if mask is None else (error * mask).sum(dim=-1) / count


def training_loss(z: Tensor, y_true: Tensor, mean: float | Tensor, std: float | Tensor, loss: str = "mape",
                  mask: Tensor | None = None, count: Tensor | None = None) -> Tensor:
    r"""The loss of standardised predictions ``z`` against LTC ``y_true`` (W/m/K), with the target transform (mean, std).

    ``mape`` (the paper): :func:`mape_loss` of :math:`\hat y = 10^{z\sigma+\mu} - 1`. ``log10``: the mean
    absolute error of :math:`\log_{10}(y + 1)`, :math:`\frac1n\sum_i |z_i\sigma + \mu - \log_{10}(y_i + 1)|`,
    which weighs a factor of 2 alike at every κ and keeps its gradient where :math:`10^z` is flat (a collapse).
    ``mask``/``count``: one loss per row of a stack, as :func:`mape_loss`.
    """
    if loss == "mape":
        return mape_loss(inverse_transform(z, mean, std), y_true, mask=mask, count=count)
    if loss != "log10":
        raise ValueError(f"unknown loss {loss!r}: expected one of {', '.join(LOSSES)}")
    return _mean((z * std + mean - torch.log10(y_true + 1)).abs(), mask, count)


LOG_FLOOR = 1e-3  # W/m/K: predictions at or below it count as this in log10 (no material conducts less; collapses do)


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    r"""Metrics of predictions in original units (W/m/K):

    MAPE (fraction), MAE, RMSE, R^2, and the three the field compares on:

    .. math::
        \mathrm{SRE} = \frac1n\sum_i \frac{2|\hat y_i - y_i|}{|\hat y_i| + |y_i|},\qquad
        \mathrm{MAE}_{\log} = \frac1n\sum_i |\log_{10}\max(\hat y_i, 10^{-3}) - \log_{10} y_i|

    (SRE is the :math:`\kappa_\mathrm{SRE}` of Matbench Discovery's thermal
    conductivity task, bounded by 2; the absolute values keep it defined for a
    collapsed model's predictions at or below 0), and Spearman's rank
    correlation, which is what a screening depends on.
    """
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
        "sre": float((2 * np.abs(err) / np.maximum(np.abs(p) + np.abs(t), 1e-300)).mean()),
        "log10_mae": float(np.abs(np.log10(np.maximum(p, LOG_FLOOR)) - np.log10(t)).mean()),
        "spearman": spearman(t, p),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``); NaN when it is undefined (n < 2, a constant)."""
    from scipy import stats

    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)
