"""The ParAIsite model: MEGNet features followed by an MLP head."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from megnet_pt import MEGNet
from megnet_pt.fast import mlp_forward
from megnet_pt.model import collate
from megnet_pt.pretrained import load_pretrained

from .data import paths
from .transform import TargetTransform

PRETRAINED = "MEGNet-MP-2018.6.1-Eform"


def published_megnet(name: str = PRETRAINED) -> MEGNet:
    """The published formation-energy MEGNet, from ``$PARAISITE_HOME/weights`` (fetched on first use)."""
    return load_pretrained(name, published_dir=paths.weights_dir(name), base_url=paths.base_url(),
                           advice=paths.download_advice())


class LTCHead(nn.Sequential):
    r"""Head 16 -> 450 -> 350 -> 350 -> 1 with ReLU between layers:

    .. math::
        \hat z = W_4\,\mathrm{ReLU}(W_3\,\mathrm{ReLU}(W_2\,\mathrm{ReLU}(W_1 \mathbf{f} + b_1) + b_2) + b_3) + b_4

    With ``fast`` set (:func:`megnet_pt.fast.set_fast`), the head is one autograd node.
    """

    def __init__(self, dims: tuple[int, ...] = (16, 450, 350, 350, 1)) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.fast = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fast:
            return mlp_forward(x, [m for m in self if isinstance(m, nn.Linear)], "relu", activate_last=False)
        return super().forward(x)


class ParAIsite(nn.Module):
    r"""MEGNet with its last output layer dropped, then :class:`LTCHead`.

    .. math::
        \hat z = \mathrm{Head}(\mathbf{f}),\qquad
        \mathbf{f} = W_2\,\mathrm{softplus2}(W_1 \mathbf{r} + b_1) + b_2 \in \mathbb{R}^{16}

    where :math:`\mathbf{r}` is MEGNet's 160-d readout. The output is the
    *standardised* target (see :class:`paraisite.transform.TargetTransform`).
    Everything is trained; MEGNet's own last layer (16 -> 1) is unused and frozen.
    """

    def __init__(self, megnet: MEGNet | None = None) -> None:
        super().__init__()
        self.megnet = megnet if megnet is not None else MEGNet()
        self.megnet.output_mlp.layers[-1].requires_grad_(False)
        self.head = LTCHead((self.megnet.config.hidden_output[-1], 450, 350, 350, 1))

    def features(self, batch: Batch) -> Tensor:
        return self.megnet.features_from_readout(self.megnet.readout(batch))

    def forward(self, batch: Batch) -> Tensor:
        return self.head(self.features(batch)).squeeze(-1)


@torch.no_grad()
def predict(model: ParAIsite, graphs: list[Data], transform: TargetTransform, device: torch.device,
            batch_size: int = 256) -> Tensor:
    """LTC predictions (W/m/K) of ``model`` for ``graphs``, float32 on the CPU (back-transformed in float64)."""
    model.eval()
    out = []
    for i in range(0, len(graphs), batch_size):
        batch = collate(graphs[i : i + batch_size]).to(device)
        out.append(transform.inverse(model(batch).double()).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
