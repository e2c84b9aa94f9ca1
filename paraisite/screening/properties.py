"""Published MEGNet properties as scan columns: the formation energy and the PBE band gap.

    eform_ev_per_atom   MEGNet-MP-2018.6.1-Eform (eV/atom), through the fused pass (``--with-eform``)
    band_gap_pbe_ev     MEGNet-MP-2019.4.1-BandGap-mfi at the PBE fidelity (eV) (``--with-bandgap``)

The band-gap model reads graphs at 5 Å, the cache holds them at the run's cutoff (4 Å): each batch's crystals
(their positions and lattice, which the cache keeps) are searched again at 5 Å (``megnet_pt.graph.with_cutoff``).
The band gap is one of the descriptors the paper correlates with the LTC (Tables 1-4); a structure from outside
the Materials Project has no band gap in its record, and ``--correlations`` uses the predicted one there
(:mod:`paraisite.screening.summary`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from megnet_pt import MEGNet
from megnet_pt.graph import with_cutoff

from ..model import published_megnet
from .fused import FusedEform

EFORM_COLUMN = "eform_ev_per_atom"
BANDGAP_COLUMN = "band_gap_pbe_ev"
BANDGAP_MODEL = "MEGNet-MP-2019.4.1-BandGap-mfi"
PBE = 0  # the band-gap model's fidelities: 0 PBE, 1 GLLB-SC, 2 HSE, 3 SCAN (megnet_pt's config.state_names)


class BandGap(nn.Module):
    """The published multi-fidelity band-gap MEGNet at one fidelity, on batches of any cutoff: eV ``[B]``."""

    def __init__(self, model: MEGNet, fidelity: int = PBE) -> None:
        super().__init__()
        self.model, self.fidelity, self.cutoff = model, fidelity, float(model.config.cutoff)

    def regraph(self, batch: Batch) -> Batch:
        """``batch``'s crystals as graphs at the model's cutoff (from their positions and lattice)."""
        ptr = batch.ptr.tolist()
        node_type, pos, lattice = batch.node_type.cpu(), batch.pos.cpu(), batch.lattice.cpu()  # the search is numpy's
        graphs = [with_cutoff(Data(node_type=node_type[a:b], pos=pos[a:b], lattice=lattice[i:i + 1], num_nodes=b - a),
                              self.cutoff) for i, (a, b) in enumerate(zip(ptr[:-1], ptr[1:]))]
        return Batch.from_data_list(graphs).to(batch.node_type.device)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> Tensor:
        return self.model(self.regraph(batch), state=self.fidelity).prediction


def property_models(with_eform: bool, with_bandgap: bool, cutoff: float) -> dict[str, nn.Module]:
    """The property columns asked for, each a module from a batch to ``[B]`` (the published weights are fetched
    and converted on first use)."""
    models: dict[str, nn.Module] = {}
    if with_eform:
        eform = FusedEform(published_megnet())
        if eform.cutoff != cutoff:
            raise ValueError(f"the formation-energy model uses cutoff {eform.cutoff:g} Å, the run {cutoff:g} Å")
        models[EFORM_COLUMN] = eform
    if with_bandgap:
        models[BANDGAP_COLUMN] = BandGap(published_megnet(BANDGAP_MODEL))
    return models
