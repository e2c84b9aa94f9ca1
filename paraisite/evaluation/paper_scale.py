r"""The scale the paper's numbers were computed on, to compare with them like for like.

Upstream (ParAIsite on matgl) standardises the labels of every dataset D with a
scaler fitted on all of D, :math:`z = (\log_{10}(y+1) - \mu_D)/\sigma_D`, and its
training module turns labels and predictions back into W/m/K with the scaler it
was built with, M: the training set's, and for the ``+af`` models AFLOW's (the
second stage is restored from the AFLOW checkpoint, whose hyper-parameters carry
the AFLOW scaler). A model trained on labels standardised with scaler L and
scored on a test set T is therefore reported as

.. math::
    \mathrm{MAPE}\big(g_{T \to M}(y),\ g_{L \to M}(\hat y)\big),\qquad
    g_{A \to M}(y) = 10^{\,(\log_{10}(y+1) - \mu_A)\,\sigma_M/\sigma_A + \mu_M} - 1

(upstream's ``ModelLightningModule.loss_fn``, and ``load_from_checkpoint`` in
``ParAIsite_double_train.py``). That is the MAPE in W/m/K only when T = L = M:
steps 1 and 2 scored on their own training set. For FEAFTG15 on Togo15
(T = L = Togo15, M = AFLOW), g maps the labels into AFLOW's range and shrinks
the spread of :math:`\log_{10}(y+1)` by :math:`\sigma_{AF}/\sigma_{TG}` (0.45 on
our data), and relative errors shrink with it. In a cross-dataset column
(T != L) the labels are mapped into the training set's range. A test set made
of several sources (MIX) maps each source with its own scaler, as upstream
does. Models trained on MIX get no number on this scale: upstream standardises
each source of MIX with its own scaler, so there is no single L.

Our AFLOW set (3269 entries) is not upstream's (5578), so with M = AFLOW this
is upstream's scale as our set gives it: close to the paper's, not equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import LTCDataset
from .metrics import mape_loss
from ..transform import TargetTransform


def rescale(y: Tensor, source: TargetTransform, module: TargetTransform) -> Tensor:
    """:math:`g_{A \\to M}(y)`: LTC standardised with ``source``, turned back with ``module``."""
    return module.inverse(source.forward(torch.as_tensor(y, dtype=torch.float64)))


@dataclass
class PaperScale:
    """The whole-dataset scalers upstream's evaluation would use for one run's models."""

    labels: TargetTransform  # L: fitted on all of the training set
    module: TargetTransform  # M: L, or AFLOW's for the +af models

    @classmethod
    def for_run(cls, init: str, train: LTCDataset, aflow_ltc: Tensor | None = None) -> "PaperScale | None":
        """None for a training set made of several sources (MIX), which has no single upstream scaler."""
        if len(train.parts) != 1:
            return None
        labels = TargetTransform.fit(train.ltc)
        if "+af" not in init:
            return cls(labels, labels)
        if aflow_ltc is None:
            raise ValueError("a +af run needs the AFLOW labels to know the scale of its module")
        return cls(labels, TargetTransform.fit(aflow_ltc))

    def mape(self, test: LTCDataset, idx: np.ndarray, y_pred: Tensor) -> float:
        """MAPE of predictions ``y_pred`` for ``test``'s structures ``idx``, on upstream's scale."""
        idx = np.asarray(idx)
        y_true = test.ltc.double()
        mapped = torch.empty(len(idx), dtype=torch.float64)
        start = 0
        for _, size in test.parts:  # each source with its own whole-dataset scaler, as upstream
            part = (idx >= start) & (idx < start + size)
            source = TargetTransform.fit(y_true[start : start + size])
            mapped[torch.from_numpy(part)] = rescale(y_true[idx[part]], source, self.module)
            start += size
        return float(mape_loss(rescale(y_pred, self.labels, self.module), mapped))
