"""megnet_pt: MEGNet on PyTorch Geometric, with the published formation-energy and band-gap weights.

    from megnet_pt import load_pretrained, structure_to_graph
    model = load_pretrained("MEGNet-MP-2018.6.1-Eform")
    out = model(structure_to_graph(structure))   # out.prediction, out.features, out.readout
    gap = load_pretrained("MEGNet-MP-2019.4.1-BandGap-mfi")   # multi-fidelity: state 0 PBE, 1 GLLB-SC, 2 HSE, 3 SCAN
    gap(structure_to_graph(structure, cutoff=5.0), state=2).prediction   # the HSE band gap (eV)
"""
from .block import MEGNetBlock
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .conv import MEGNetConv
from .elements import ELEMENTS, UnsupportedElementError
from .expansion import GaussianExpansion
from .graph import StructureError, structure_to_graph
from .mlp import MLP, SoftPlus2, softplus2
from .model import MEGNet, MEGNetConfig, MEGNetOutput
from .pretrained import load_model, load_pretrained
from .set2set import Set2Set

__version__ = "0.1.0"

__all__ = [
    "ELEMENTS", "CheckpointError", "GaussianExpansion", "MEGNet", "MEGNetBlock", "MEGNetConfig", "MEGNetConv",
    "MEGNetOutput", "MLP", "Set2Set", "SoftPlus2", "StructureError", "UnsupportedElementError", "load_checkpoint",
    "load_model", "load_pretrained", "save_checkpoint", "softplus2", "structure_to_graph",
]
