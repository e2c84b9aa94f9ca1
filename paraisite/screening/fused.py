"""The fast inference pass: M ParAIsite models evaluated together, written out by hand.

The M models evaluated together, their weights stacked along a leading
    model axis (``[M, in, out]``) so every layer is one batched matrix product
    (``torch.baddbmm``) over all models, and with three exact rewrites of the
    MEGNet algebra that save work on the edges, by far the most numerous rows:

    1. the first layer of the edge update acts on ``[v_src | v_dst | e | u]``;
       split its weight into four blocks and project the atoms (and the state)
       once per atom instead of once per edge, then gather:
       ``W [v_i|v_j|e|u] = (W_s v + W_u u_g)_i + (W_d v)_j + W_e e``;
    2. the constant of softplus2 inside an MLP is folded into the next
       layer's bias, ``W (softplus(x) - ln 2) + b = W softplus(x) + (b - ln 2 W 1)``;
    3. the Gaussian expansion and the edge encoder are functions of the
       distance alone, and symmetry makes most distances of a crystal repeat
       (about one in ten is distinct in AFLOW cells): both are computed once
       per distinct distance of the batch, the expansion once for all models,
       then gathered onto the edges.

    ``torch.func.stack_module_state`` + ``vmap`` over ``ParAIsite.forward`` is
    the generic way to stack the models (megnet_pt's Set2Set writes its LSTM
    step out so that it vectorises) and agrees to round-off, but on a CPU it
    ran no faster than the plain loop (9 models, batches of 32 AFLOW cells, one
    thread: loop 854, vmap 783, fused 1515 model-structures per CPU-second);
    the written-out pass below is kept.

    Only :class:`FusedParAIsite` and :class:`FusedEform` are meant for use
    elsewhere; ``tests/test_scan.py`` checks every stacked layer against the
    megnet_pt layer it rewrites, so a change to ``MEGNetConv`` that is not
    mirrored here fails there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from megnet_pt import MEGNet
from megnet_pt.mlp import MLP, SoftPlus2

from ..model import ParAIsite

LOG2 = math.log(2.0)


def softplus(x: Tensor) -> Tensor:
    r""":math:`\log(1 + e^x)` as ``logaddexp(x, 0)``: within one float32 ulp of ``F.softplus``, about a quarter cheaper on CPUs."""
    return torch.logaddexp(x, x.new_zeros(()))


# --- the per-batch graph quantities every model shares ------------------------------------------

@dataclass
class GraphIndex:
    r"""Index tensors and normalisers of one batch, built once and used by every model.

    ``src``/``dst`` are ``edge_index[0]``/``edge_index[1]`` (centre, neighbour);
    the mean over the incoming edges of atom j uses ``dst``; per-graph means
    use ``batch`` (atoms) and ``edge_batch = batch[src]`` (edges). The
    reciprocal counts are clamped at 1, so an empty set has mean zero, as in
    PyG's ``scatter(..., reduce="mean")``.
    """

    node_type: Tensor
    src: Tensor
    dst: Tensor
    batch: Tensor
    edge_batch: Tensor
    num_graphs: int
    inv_in_degree: Tensor  # [N, 1]
    inv_nodes: Tensor  # [B, 1]
    inv_edges: Tensor  # [B, 1]
    distances: Tensor  # [D] the distinct values of edge_dist
    distance_index: Tensor  # [E] edge_dist = distances[distance_index]
    state: Tensor  # [B, dim_state]

    @classmethod
    def build(cls, data: Data | Batch) -> GraphIndex:
        n = data.num_nodes
        batch = data.batch if getattr(data, "batch", None) is not None else data.node_type.new_zeros(n)
        num_graphs = int(data.num_graphs) if hasattr(data, "num_graphs") else 1
        src, dst = data.edge_index[0], data.edge_index[1]
        edge_batch = batch[src]
        dtype = data.edge_dist.dtype

        def inverse_count(index: Tensor, size: int) -> Tensor:
            count = torch.bincount(index, minlength=size).to(dtype)
            return count.clamp_(min=1).reciprocal_().unsqueeze(-1)

        state = getattr(data, "state", None)
        if state is None:
            state = data.edge_dist.new_zeros(num_graphs, 2)
        distances, distance_index = torch.unique(data.edge_dist, return_inverse=True)
        return cls(data.node_type, src, dst, batch, edge_batch, num_graphs, inverse_count(dst, n),
                   inverse_count(batch, num_graphs), inverse_count(edge_batch, num_graphs), distances, distance_index, state)


def segment_softmax(x: Tensor, index: Tensor, size: int) -> Tensor:
    """Softmax of ``x [M, n]`` over the entries sharing an ``index``, as ``torch_geometric.utils.softmax``."""
    m = x.size(0)
    expanded = index.unsqueeze(0).expand(m, -1)
    top = x.new_full((m, size), -math.inf).scatter_reduce_(1, expanded, x, "amax")
    out = (x - top.gather(1, expanded)).exp_()
    total = x.new_zeros(m, size).index_add_(1, index, out).add_(1e-16)
    return out.div_(total.gather(1, expanded))


# --- stacked layers ----------------------------------------------------------------------------

class StackedLinear(nn.Module):
    r"""M ``nn.Linear`` of one shape as ``y = x W^T + b`` over a leading model axis: ``[M, n, in] -> [M, n, out]``.

    With ``after_softplus2`` the input is taken to be ``softplus(x)`` rather
    than ``softplus(x) - \ln 2`` and the bias absorbs the difference:
    :math:`b' = b - \ln 2 \sum_i W_{:,i}` (rewrite 2 of the module docstring).
    """

    def __init__(self, linears: Sequence[nn.Linear], after_softplus2: bool = False) -> None:
        super().__init__()
        weight = torch.stack([l.weight.detach() for l in linears])  # [M, out, in]
        bias = torch.stack([l.bias.detach() for l in linears])  # [M, out]
        if after_softplus2:
            bias = bias - LOG2 * weight.sum(-1)
        self.register_buffer("weight", weight.transpose(1, 2).contiguous())  # [M, in, out]
        self.register_buffer("bias", bias.unsqueeze(1).contiguous())  # [M, 1, out]

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def _linears(mlp: nn.Module) -> list[nn.Linear]:
    return [m for m in mlp.modules() if isinstance(m, nn.Linear)]


class StackedMLP(nn.Module):
    """M megnet_pt ``MLP``s of one shape (softplus2 between layers, and after the last if ``activate_last``)."""

    def __init__(self, mlps: Sequence[MLP]) -> None:
        super().__init__()
        layers = [list(m.layers) for m in mlps]
        if not all(isinstance(a, SoftPlus2) for m in layers for a in m if not isinstance(a, nn.Linear)):
            raise ValueError("the fused forward supports MEGNet MLPs with softplus2 activations only")
        self.activate_last = not isinstance(layers[0][-1], nn.Linear)
        per_model = [_linears(m) for m in mlps]
        self.layers = nn.ModuleList(
            StackedLinear([p[i] for p in per_model], after_softplus2=i > 0) for i in range(len(per_model[0]))
        )

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.activate_last:
                x = softplus(x)
        return x.sub_(LOG2) if self.activate_last else x


class StackedEdgeUpdate(nn.Module):
    r"""The edge MLP of M MEGNet convolutions with its first layer split (rewrite 1):

    .. math::
        W_1 [\mathbf{v}_i \| \mathbf{v}_j \| \mathbf{e}_k \| \mathbf{u}_g] + b_1
        = \underbrace{(W_s \mathbf{v} + (W_u \mathbf{u} + b_1)_{g(\cdot)})_i}_{\text{per atom}}
        + \underbrace{(W_d \mathbf{v})_j}_{\text{per atom}} + W_e \mathbf{e}_k
    """

    def __init__(self, mlps: Sequence[MLP], dim_node: int, dim_edge: int) -> None:
        super().__init__()
        first = StackedLinear([_linears(m)[0] for m in mlps])
        w = first.weight  # [M, 2 dn + de + du, out]
        a, b, c = dim_node, 2 * dim_node, 2 * dim_node + dim_edge
        self.register_buffer("w_node", torch.cat([w[:, :a], w[:, a:b]], dim=2).contiguous())  # [M, dn, 2 out]
        self.register_buffer("w_edge", w[:, b:c].contiguous())
        self.register_buffer("w_state", w[:, c:].contiguous())
        self.register_buffer("bias", first.bias)
        rest = StackedMLP(mlps)
        self.rest = nn.ModuleList(list(rest.layers)[1:])
        self.width = w.size(2)

    def forward(self, v: Tensor, e: Tensor, u: Tensor, g: GraphIndex) -> Tensor:
        node = torch.bmm(v, self.w_node)  # [M, N, 2 out]: source and target projections
        source = node[..., : self.width] + torch.baddbmm(self.bias, u, self.w_state).index_select(1, g.batch)
        h = source.index_select(1, g.src)
        h += node[..., self.width :].index_select(1, g.dst)
        h.baddbmm_(e, self.w_edge)
        h = softplus(h)
        for layer in self.rest:
            h = softplus(layer(h))
        return h.sub_(LOG2)


class StackedBlock(nn.Module):
    """M MEGNet blocks: optional dense layers, the graph convolution, the residual (see ``megnet_pt.block``)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.dense = not isinstance(blocks[0].edge_dense, nn.Identity)
        if self.dense:
            self.edge_dense = StackedMLP([b.edge_dense for b in blocks])
            self.node_dense = StackedMLP([b.node_dense for b in blocks])
            self.state_dense = StackedMLP([b.state_dense for b in blocks])
        convs = [b.conv for b in blocks]
        # MEGNetConv's MLP inputs: edge [v_i|v_j|e|u], node [v|mean e'|u], state [u|mean e'|mean v'].
        out = convs[0].edge_mlp.dims[-1]
        dim_state = convs[0].state_mlp.dims[0] - 2 * out
        dim_node = convs[0].node_mlp.dims[0] - out - dim_state
        dim_edge = convs[0].edge_mlp.dims[0] - 2 * dim_node - dim_state
        self.edge_update = StackedEdgeUpdate([c.edge_mlp for c in convs], dim_node, dim_edge)
        self.node_mlp = StackedMLP([c.node_mlp for c in convs])
        self.state_mlp = StackedMLP([c.state_mlp for c in convs])

    def forward(self, e: Tensor, v: Tensor, u: Tensor, g: GraphIndex) -> tuple[Tensor, Tensor, Tensor]:
        e1, v1, u1 = (self.edge_dense(e), self.node_dense(v), self.state_dense(u)) if self.dense else (e, v, u)
        m, n, b = v.size(0), v.size(1), g.num_graphs
        e2 = self.edge_update(v1, e1, u1, g)
        incoming = e2.new_zeros(m, n, e2.size(2)).index_add_(1, g.dst, e2).mul_(g.inv_in_degree)
        v2 = self.node_mlp(torch.cat([v1, incoming, u1.index_select(1, g.batch)], dim=2))
        edge_mean = e2.new_zeros(m, b, e2.size(2)).index_add_(1, g.edge_batch, e2).mul_(g.inv_edges)
        node_mean = v2.new_zeros(m, b, v2.size(2)).index_add_(1, g.batch, v2).mul_(g.inv_nodes)
        u2 = self.state_mlp(torch.cat([u1, edge_mean, node_mean], dim=2))
        return e2.add_(e), v2.add_(v), u2.add_(u)


class StackedSet2Set(nn.Module):
    r"""M PyG ``Set2Set`` readouts (one-layer LSTM, ``steps`` iterations):

    .. math::
        \mathbf{q}_t = \mathrm{LSTM}(\mathbf{q}^*_{t-1}),\quad
        a_i = \mathrm{softmax}_{i \in g}(\mathbf{x}_i \cdot \mathbf{q}_{t,g}),\quad
        \mathbf{r}_g = \textstyle\sum_{i \in g} a_i \mathbf{x}_i,\quad
        \mathbf{q}^*_t = [\mathbf{q}_t \| \mathbf{r}_t]
    """

    def __init__(self, readouts: Sequence[nn.Module]) -> None:
        super().__init__()
        lstms = [r.lstm for r in readouts]
        if any(l.num_layers != 1 or l.bidirectional or not l.bias for l in lstms):
            raise ValueError("the fused forward supports one-layer, one-directional Set2Set LSTMs with biases")
        self.steps = readouts[0].processing_steps
        self.register_buffer("w_input", torch.stack([l.weight_ih_l0.detach().t() for l in lstms]).contiguous())
        self.register_buffer("w_hidden", torch.stack([l.weight_hh_l0.detach().t() for l in lstms]).contiguous())
        self.register_buffer("bias", torch.stack([(l.bias_ih_l0 + l.bias_hh_l0).detach() for l in lstms]).unsqueeze(1))

    def forward(self, x: Tensor, index: Tensor, size: int) -> Tensor:
        m, d = x.size(0), x.size(2)
        h = x.new_zeros(m, size, d)
        c = x.new_zeros(m, size, d)
        q_star = x.new_zeros(m, size, 2 * d)
        for _ in range(self.steps):
            gates = torch.baddbmm(self.bias, q_star, self.w_input).baddbmm_(h, self.w_hidden)
            i, f, g, o = gates.chunk(4, dim=2)  # PyTorch's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            score = (x * h.index_select(1, index)).sum(dim=2)
            a = segment_softmax(score, index, size)
            r = x.new_zeros(m, size, d).index_add_(1, index, a.unsqueeze(2) * x)
            q_star = torch.cat([h, r], dim=2)
        return q_star


class StackedMEGNet(nn.Module):
    """M MEGNets of one configuration, evaluated together up to the 16-d features (``MEGNet.features_from_readout``)."""

    def __init__(self, megnets: Sequence[MEGNet]) -> None:
        super().__init__()
        config = megnets[0].config
        if any(m.config != config for m in megnets):
            raise ValueError("models of an ensemble must share one MEGNet configuration")
        expansions = [m.distance_expansion for m in megnets]
        if any(not torch.equal(x.centers, expansions[0].centers) or x.gamma != expansions[0].gamma for x in expansions):
            raise ValueError("models of an ensemble must share the Gaussian distance expansion")
        self.gamma = expansions[0].gamma
        self.register_buffer("centers", expansions[0].centers.detach().clone())
        self.register_buffer("embedding", torch.stack([m.node_embedding.weight.detach() for m in megnets]))
        self.edge_encoder = StackedMLP([m.edge_encoder for m in megnets])
        self.node_encoder = StackedMLP([m.node_encoder for m in megnets])
        self.state_encoder = StackedMLP([m.state_encoder for m in megnets])
        self.blocks = nn.ModuleList(StackedBlock([m.blocks[b] for m in megnets]) for b in range(config.num_blocks))
        self.node_set2set = StackedSet2Set([m.node_set2set for m in megnets])
        self.edge_set2set = StackedSet2Set([m.edge_set2set for m in megnets])
        # output MLP without its last layer: Linear, softplus2, Linear (no activation after).
        out = [_linears(m.output_mlp) for m in megnets]
        self.out1 = StackedLinear([o[0] for o in out])
        self.out2 = StackedLinear([o[1] for o in out], after_softplus2=True)
        self.size = len(megnets)

    def expansion(self, g: GraphIndex) -> Tensor:
        """The Gaussian expansion of the distinct distances, ``[D, K]``, shared by all models (rewrite 3)."""
        return torch.exp(-self.gamma * (g.distances.unsqueeze(-1) - self.centers) ** 2)

    def forward(self, g: GraphIndex, rbf: Tensor | None = None) -> Tensor:
        """16-d features ``[M, B, 16]``."""
        m = self.size
        rbf = self.expansion(g) if rbf is None else rbf
        e = self.edge_encoder(rbf.unsqueeze(0).expand(m, -1, -1)).index_select(1, g.distance_index)
        v = self.node_encoder(self.embedding.index_select(1, g.node_type))
        u = self.state_encoder(g.state.unsqueeze(0).expand(m, -1, -1))
        for block in self.blocks:
            e, v, u = block(e, v, u, g)
        readout = torch.cat([
            self.node_set2set(v, g.batch, g.num_graphs),
            self.edge_set2set(e, g.edge_batch, g.num_graphs),
            u,
        ], dim=2)
        return self.out2(softplus(self.out1(readout)))


class StackedHead(nn.Module):
    """M ParAIsite heads (``LTCHead``: Linear layers with ReLU between)."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        per_model = [_linears(h) for h in heads]
        self.layers = nn.ModuleList(StackedLinear([p[i] for p in per_model]) for i in range(len(per_model[0])))

    def forward(self, f: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            f = layer(f)
            if i < len(self.layers) - 1:
                f = F.relu_(f)
        return f.squeeze(-1)


class _Group(nn.Module):
    """Some models of an ensemble, stacked: trunk and head."""

    def __init__(self, models: Sequence[ParAIsite]) -> None:
        super().__init__()
        self.trunk = StackedMEGNet([m.megnet for m in models])
        self.head = StackedHead([m.head for m in models])

    def forward(self, g: GraphIndex, rbf: Tensor) -> Tensor:
        return self.head(self.trunk(g, rbf))


class FusedParAIsite(nn.Module):
    """M ParAIsite models of one architecture in one pass: standardised outputs ``[M, B]``.

    ``models_per_pass`` evaluates them in groups of that size (None: all at
    once, which suits a GPU; on a CPU smaller groups keep the per-edge
    tensors in cache).
    """

    def __init__(self, models: Sequence[ParAIsite], models_per_pass: int | None = None) -> None:
        super().__init__()
        n = len(models) if models_per_pass is None else max(1, min(int(models_per_pass), len(models)))
        self.groups = nn.ModuleList(_Group(models[a : a + n]) for a in range(0, len(models), n))

    def forward(self, batch: Data | Batch) -> Tensor:
        g = GraphIndex.build(batch)
        rbf = self.groups[0].trunk.expansion(g)
        return torch.cat([group(g, rbf) for group in self.groups], dim=0)


class FusedEform(nn.Module):
    """The published formation-energy MEGNet through the same fused pass: eV/atom ``[B]``."""

    def __init__(self, model: MEGNet) -> None:
        super().__init__()
        self.trunk = StackedMEGNet([model])
        self.last = StackedLinear([_linears(model.output_mlp)[-1]], after_softplus2=True)
        self.register_buffer("target_mean", model.target_mean.detach().clone())
        self.register_buffer("target_std", model.target_std.detach().clone())
        self.cutoff = float(model.config.cutoff)

    @torch.inference_mode()
    def forward(self, batch: Data | Batch) -> Tensor:
        f = self.trunk(GraphIndex.build(batch))
        return self.last(softplus(f))[0, :, 0] * self.target_std + self.target_mean
