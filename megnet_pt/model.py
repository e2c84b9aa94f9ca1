"""The MEGNet model (Chen, Ye, Zuo, Zheng, Ong, Chem. Mater. 31, 3564, 2019)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from .block import MEGNetBlock
from .expansion import GaussianExpansion
from .fast import graph_index, mlp_forward
from .mlp import MLP, softplus2
from .set2set import Set2Set


@dataclass
class MEGNetConfig:
    """Hyper-parameters; the defaults are those of MEGNet-MP-2018.6.1-Eform."""

    num_elements: int = 89
    dim_node_embedding: int = 16
    num_gaussians: int = 100
    gaussian_start: float = 0.0
    gaussian_stop: float = 5.0
    gaussian_gamma: float = 0.5
    dim_state: int = 2
    num_state_types: int | None = None  # an embedded integer state (e.g. 4 fidelities); None: a float state of dim_state
    num_blocks: int = 3
    hidden_encoder: tuple[int, ...] = (64, 32)
    hidden_dense: tuple[int, ...] = (64, 32)
    hidden_conv: tuple[int, ...] = (64, 64, 32)
    hidden_output: tuple[int, ...] = (32, 16)
    set2set_steps: int = 2
    cutoff: float = 4.0
    target_name: str = "eform_ev_per_atom"  # what the prediction is (the column megnet_pt.predict writes)
    state_names: tuple[str, ...] = ()  # names of the integer states, e.g. ("pbe", "gllb-sc", "hse", "scan")

    @classmethod
    def from_dict(cls, d: dict) -> "MEGNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MEGNet config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


INPUT_KEYS = ("node_type", "edge_index", "edge_dist", "state")  # what MEGNet reads of a graph (and the batch vector)


def collate(graphs: list[Data]) -> Batch:
    """``Batch.from_data_list`` of the fields MEGNet reads (:data:`INPUT_KEYS`); positions, lattice, images, ids
    and labels are left out, which makes collating a training batch about a quarter faster."""
    return Batch.from_data_list(graphs, exclude_keys=[k for k in graphs[0].keys() if k not in INPUT_KEYS])


class MEGNetOutput(NamedTuple):
    readout: Tensor  # [B, 160]: node Set2Set | edge Set2Set | state
    features: Tensor  # [B, 16]: output MLP before its last layer
    prediction: Tensor  # [B]: target units (normaliser applied)


class MEGNet(nn.Module):
    r"""MEGNet: embedding, encoders, blocks, Set2Set readout, output MLP.

    .. math::
        \mathbf{v}^0 = \mathrm{MLP}_v(\mathrm{Emb}(Z)),\quad
        \mathbf{e}^0 = \mathrm{MLP}_e(\phi(d)),\quad
        \mathbf{u}^0 = \mathrm{MLP}_u(\mathbf{u}) \;\text{or}\; \mathrm{MLP}_u(\mathrm{Emb}_u(s)) \\
        (\mathbf{e}^{b+1}, \mathbf{v}^{b+1}, \mathbf{u}^{b+1}) = \mathrm{Block}_b(\mathbf{e}^b, \mathbf{v}^b, \mathbf{u}^b) \\
        \mathbf{r} = [\mathrm{Set2Set}(\mathbf{v}) \,\|\, \mathrm{Set2Set}(\mathbf{e}) \,\|\, \mathbf{u}] \in \mathbb{R}^{160} \\
        \mathbf{f} = W_2\,\mathrm{softplus2}(W_1 \mathbf{r} + b_1) + b_2 \in \mathbb{R}^{16},\quad
        \hat y = (W_3\,\mathrm{softplus2}(\mathbf{f}) + b_3)\,\sigma + \mu

    where :math:`\phi` is the Gaussian expansion, the encoders have their last
    layer activated and :math:`(\mu, \sigma)` is the target normaliser (buffers
    ``target_mean``, ``target_std``). The state is either a float vector per graph
    (``dim_state``; ``[0, 0]`` for the formation-energy model) or, when
    ``num_state_types`` is set, an integer per graph looked up in an embedding
    (the fidelity of the multi-fidelity band-gap model: 0 PBE, 1 GLLB-SC, 2 HSE,
    3 SCAN). Input: a PyG ``Data``/``Batch`` from
    :func:`megnet_pt.graph.structure_to_graph` (``node_type``, ``edge_index``,
    ``edge_dist``, optional ``state``, ``batch``); ``state=`` given to
    :meth:`forward` replaces the graphs' own (an int: the same for every graph).
    """

    def __init__(self, config: MEGNetConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or MEGNetConfig()
        dim = c.hidden_encoder[-1]
        self.distance_expansion = GaussianExpansion(c.gaussian_start, c.gaussian_stop, c.num_gaussians, c.gaussian_gamma)
        self.node_embedding = nn.Embedding(c.num_elements, c.dim_node_embedding)
        self.edge_encoder = MLP([c.num_gaussians, *c.hidden_encoder])
        self.node_encoder = MLP([c.dim_node_embedding, *c.hidden_encoder])
        self.state_embedding = nn.Embedding(c.num_state_types, c.dim_state) if c.num_state_types else None
        self.state_encoder = MLP([c.dim_state, *c.hidden_encoder])
        self.blocks = nn.ModuleList(
            MEGNetBlock(dim if b == 0 else c.hidden_conv[-1], None if b == 0 else c.hidden_dense, c.hidden_conv)
            for b in range(c.num_blocks)
        )
        out = c.hidden_conv[-1]
        self.node_set2set = Set2Set(out, processing_steps=c.set2set_steps)
        self.edge_set2set = Set2Set(out, processing_steps=c.set2set_steps)
        self.output_mlp = MLP([2 * out + 2 * out + out, *c.hidden_output, 1], activate_last=False)
        self.register_buffer("target_mean", torch.tensor(0.0))
        self.register_buffer("target_std", torch.tensor(1.0))
        self.fast = False  # the fast step (megnet_pt.fast.set_fast): the same function, a fraction of the operators

    def encode_state(self, state: Tensor | int | None, num_graphs: int) -> Tensor:
        """``[num_graphs, dim_state]``: the float state as given, or the embedding of the integer one."""
        weight = self.node_embedding.weight
        if self.state_embedding is None:
            if state is None:
                return weight.new_zeros(num_graphs, self.config.dim_state)
            if isinstance(state, int) or not torch.is_floating_point(state):
                raise ValueError(f"this model reads a float state of {self.config.dim_state} per graph, not an integer "
                                 "state (that is for a model with num_state_types, e.g. the band-gap model's fidelity)")
            return state
        if state is None:
            return self.state_embedding.weight[:1].expand(num_graphs, -1)  # state 0 (PBE for the band-gap model)
        if isinstance(state, int):
            state = torch.full((num_graphs,), state, dtype=torch.long, device=weight.device)
        if torch.is_floating_point(state):
            raise ValueError(f"this model embeds an integer state (0..{self.config.num_state_types - 1}) per graph; "
                             "build its graphs with structure_to_graph(..., state=k) or pass state=k")
        state = state.reshape(-1)
        if state.numel() != num_graphs or bool(((state < 0) | (state >= self.config.num_state_types)).any()):
            raise ValueError(f"the integer state must be one of 0..{self.config.num_state_types - 1} per graph "
                             f"({num_graphs} graphs, got {state.tolist()[:8]})")
        return self.state_embedding(state)

    def readout(self, data: Data | Batch, state: Tensor | int | None = None) -> Tensor:
        """The readout ``[node Set2Set | edge Set2Set | state]`` (160-d for the published models)."""
        batch = data.batch if getattr(data, "batch", None) is not None else data.node_type.new_zeros(data.num_nodes)
        num_graphs = int(data.num_graphs) if hasattr(data, "num_graphs") else 1
        v = self.node_encoder(self.node_embedding(data.node_type))
        e = self.edge_encoder(self.distance_expansion(data.edge_dist))
        u = self.state_encoder(self.encode_state(getattr(data, "state", None) if state is None else state, num_graphs))
        index = graph_index(data.edge_index, batch, v.size(0), num_graphs, v.dtype) if self.fast else None
        for block in self.blocks:
            e, v, u = block(v, data.edge_index, e, u, batch, index)
        node_readout = self.node_set2set(v, batch, dim_size=num_graphs)
        edge_readout = self.edge_set2set(e, batch[data.edge_index[0]], dim_size=num_graphs)
        return torch.cat([node_readout, edge_readout, u], dim=-1)

    def features_from_readout(self, readout: Tensor) -> Tensor:
        """The 16-d features: the output MLP without its last layer (no activation after)."""
        if self.output_mlp.fast:
            return mlp_forward(readout, self.output_mlp.linears()[:-1], "softplus2", activate_last=False)
        return self.output_mlp.layers[:-2](readout)

    def forward(self, data: Data | Batch, state: Tensor | int | None = None) -> MEGNetOutput:
        r = self.readout(data, state)
        f = self.features_from_readout(r)
        raw = self.output_mlp.layers[-1](softplus2(f)).squeeze(-1)
        return MEGNetOutput(r, f, raw * self.target_std + self.target_mean)
