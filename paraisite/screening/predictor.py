"""The LTC of a few structures from Python, in one line::

    from paraisite import load_ltc_model
    load_ltc_model().predict([structure])      # pymatgen Structure or ASE Atoms; the shipped ensemble

gives, per structure, the ensemble mean (W/m/K, 300 K), its sample standard deviation, every member's
prediction and, for models with a calibration (the shipped ones), the interval ``lo``..``hi`` at ``level``
and the ``domain`` score: the numbers scan.py writes (``ltc_mean``, ``ltc_std``, ``ltc_split<k>``,
``ltc_lo``, ``ltc_hi``, ``domain``) for the same models.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch

from megnet_pt.graph import structure_to_graph
from megnet_pt.predict import resolve_device

from .ensemble import Ensemble, load_ensemble
from .intervals import Calibration, DomainEmbedding, load_calibration
from .scan import ensemble_statistics
from .shipped import default_models


@dataclass
class LTCPredictions:
    """Predictions of an ensemble for ``len(mean)`` structures, W/m/K."""

    formulas: list[str]  # [B] reduced formula of each structure
    mean: np.ndarray  # [B] the ensemble mean
    std: np.ndarray  # [B] sample standard deviation over the members
    members: np.ndarray  # [B, M] one column per member
    splits: list[int]  # the split of each member's column
    lo: np.ndarray | None = None  # [B] the interval at ``level`` (None: the models have no calibration)
    hi: np.ndarray | None = None
    domain: np.ndarray | None = None  # [B] distance to the training structures, ~1 inside them
    level: float | None = None
    warnings: list[str] | None = None  # [B] empty, or why the domain score says not to trust the interval

    def __len__(self) -> int:
        return len(self.mean)


class LTCModel:
    """An :class:`~paraisite.screening.ensemble.Ensemble` on a device, taking structures rather than graphs."""

    def __init__(self, ensemble: Ensemble, device: torch.device | str = "cpu",
                 calibration: Calibration | None = None) -> None:
        self.device = torch.device(device)
        self.ensemble = ensemble.to(self.device)
        self.info = ensemble.info
        self.calibration = calibration
        self.embed = DomainEmbedding.published().to(self.device) if calibration is not None else None

    def __repr__(self) -> str:
        return f"LTCModel({self.info.describe() if self.info else f'{len(self.ensemble)} models'}, on {self.device})"

    def predict(self, structures: Sequence[Any], batch_size: int = 32, level: float | None = None) -> LTCPredictions:
        """Predict every structure of ``structures`` (pymatgen ``Structure`` or ASE ``Atoms``); ``level``: of
        the intervals (default the calibration's, 0.9)."""
        if not isinstance(structures, Sequence):
            structures = list(structures)
        rows, formulas, domains = [], [], []
        for start in range(0, len(structures), batch_size):
            graphs = [structure_to_graph(s, cutoff=self.ensemble.cutoff, id=f"structure {start + i}")
                      for i, s in enumerate(structures[start:start + batch_size])]
            formulas += [g.formula for g in graphs]
            batch = Batch.from_data_list(graphs).to(self.device)
            rows.append(self.ensemble(batch).cpu().numpy())
            if self.calibration is not None:
                domains.append(self.calibration.domain.score(self.embed(batch)))
        members = np.concatenate(rows) if rows else np.zeros((0, len(self.ensemble)))
        stats = ensemble_statistics(members)
        splits = self.info.splits if self.info else list(range(1, len(self.ensemble) + 1))
        out = LTCPredictions(formulas, stats["ltc_mean"], stats["ltc_std"], members, splits)
        if self.calibration is not None:
            out.domain = np.concatenate(domains) if domains else np.zeros(0)
            out.lo, out.hi = self.calibration.interval(members, out.domain, level)
            out.level = self.calibration.level if level is None else level
            out.warnings = self.calibration.warnings(out.domain)
        return out


def load_ltc_model(models: str | Path | None = None, device: str = "auto", selection: str | None = None) -> LTCModel:
    """The shipped ensemble (``models=None``) or the models of a run folder, ready to predict on ``device``.

    ``device``: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``; ``selection``: for a run folder, ``best``
    (default) or ``final``.
    """
    models = models or default_models()
    return LTCModel(load_ensemble(models, selection), resolve_device(device), load_calibration(models))
