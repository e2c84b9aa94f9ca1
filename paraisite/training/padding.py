r"""M batches of graphs padded to common shapes and stacked, for M models trained at once.

At step t of epoch e, member m (split :math:`k_m`) takes its next batch
:math:`\mathcal B_m` of :math:`b_m \le B` graphs from its own shuffle. The M
batches are padded to common shapes and stacked:

.. math::
    N = \max_m n_m + 1,\qquad E = \max_m e_m,\qquad S = \max_m b_m + 1

nodes, edges and graph slots, where :math:`n_m, e_m` count the nodes and edges
of :math:`\mathcal B_m`. Slots :math:`0..b_m-1` hold the real graphs; slot
:math:`S-1` is a dummy graph that owns the padding nodes
(:math:`i \ge n_m`, element 0) and the padding edges (self-loops on the
padding nodes, distance 0). There is always at least one padding node, so
padding edges always have an end. Messages, means over a graph and the
Set2Set softmax are all taken within one graph, so padding leaves the real
graphs' outputs unchanged. For CUDA graphs the shapes are fixed instead, with
several dummy graphs (:func:`padded_shapes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import LTCDataset


@dataclass
class PackedGraphs:
    """All graphs of a dataset laid end to end (edge indices local to their graph), and their labels."""

    node_type: Tensor  # long [sum n]
    edge_index: Tensor  # long [2, sum e], local
    edge_dist: Tensor  # float [sum e]
    state: Tensor  # float [G, dim_state]
    ltc: Tensor  # float [G]
    node_ptr: np.ndarray  # int64 [G + 1]
    edge_ptr: np.ndarray  # int64 [G + 1]

    @classmethod
    def from_dataset(cls, data: LTCDataset, device: torch.device) -> "PackedGraphs":
        graphs = data.graphs
        n = np.array([g.num_nodes for g in graphs], dtype=np.int64)
        e = np.array([g.edge_index.shape[1] for g in graphs], dtype=np.int64)
        states = [g.state if getattr(g, "state", None) is not None else torch.zeros(1, 2) for g in graphs]
        return cls(
            node_type=torch.cat([g.node_type for g in graphs]).to(device),
            edge_index=torch.cat([g.edge_index for g in graphs], dim=1).to(device),
            edge_dist=torch.cat([g.edge_dist for g in graphs]).to(device),
            state=torch.cat(states).to(device),
            ltc=data.ltc.to(device),
            node_ptr=np.concatenate([[0], np.cumsum(n)]),
            edge_ptr=np.concatenate([[0], np.cumsum(e)]),
        )


@dataclass
class PaddedBatch:
    """M batches padded to common shapes: ``[M, N]`` nodes, ``[M, E]`` edges, ``[M, S]`` graph slots.

    Slots ``0..R-1`` hold the real graphs (R = ``num_real``), slots ``R..S-1``
    are dummy graphs that own the padding nodes and edges.
    """

    node_type: Tensor  # long [M, N]
    edge_index: Tensor  # long [M, 2, E]
    edge_dist: Tensor  # float [M, E]
    batch: Tensor  # long [M, N], slot of every node
    state: Tensor  # float [M, S, dim_state]
    target: Tensor  # float [M, R], labels (1 in empty slots, which keeps the masked loss finite)
    mask: Tensor  # float [M, R], 1 for a real graph
    count: Tensor  # float [M], real graphs per batch

    @property
    def num_slots(self) -> int:
        return self.state.shape[1]

    @property
    def num_real(self) -> int:
        return self.target.shape[1]


DUMMY_SLOTS = 8  # dummy graphs of a fixed-shape batch: its padding is spread over them (fewer colliding atomics)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` over (s, c), without a Python loop."""
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


def padded_shapes(g: PackedGraphs, batch_size: int, ratio: float = 1.25) -> list[tuple[int, int, int]]:
    """Fixed (N, E, S) shapes for :func:`pad_batches`, smallest first, the last holding any batch of ``g``.

    The largest is the totals of the ``batch_size`` largest graphs (+1 padding
    node); each smaller one is ``ratio`` times smaller in N and E, down to the
    ``batch_size`` smallest graphs. S is ``batch_size`` + :data:`DUMMY_SLOTS`.
    """
    n, e = np.sort(np.diff(g.node_ptr)), np.sort(np.diff(g.edge_ptr))
    top = (int(n[-batch_size:].sum()) + 1, max(int(e[-batch_size:].sum()), 1))
    low = (int(n[:batch_size].sum()) + 1, int(e[:batch_size].sum()))
    shapes = [top]
    while shapes[-1][0] > low[0] or shapes[-1][1] > max(low[1], 1):
        N, E = shapes[-1]
        shapes.append((max(math.ceil(N / ratio), low[0]), max(math.ceil(E / ratio), low[1], 1)))
    return [(N, E, batch_size + DUMMY_SLOTS) for N, E in reversed(shapes)]


def pad_batches(g: PackedGraphs, ids: list[np.ndarray], shapes: list[tuple[int, int, int]] | None = None) -> PaddedBatch:
    """Stack the batches ``ids[m]`` (graph indices into ``g``) as one padded batch (see the module docstring).

    With ``shapes`` (:func:`padded_shapes`) the batch takes the first of those
    (N, E, S) that holds it, with S - :data:`DUMMY_SLOTS` real slots, instead
    of the smallest shape that fits: CUDA graphs replay fixed shapes. The
    padding nodes of member m are spread over the dummy slots, its padding
    edges over its padding nodes (self-loops). The bookkeeping is done on the
    host in NumPy, so that on a GPU the step never waits for the device to
    learn a size.
    """
    device = g.node_type.device
    M = len(ids)
    b = np.array([len(i) for i in ids], dtype=np.int64)
    flat = np.concatenate(ids).astype(np.int64)  # every (member, slot) pair, member-major
    member = np.repeat(np.arange(M), b)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(b) - b, b)
    n = g.node_ptr[flat + 1] - g.node_ptr[flat]
    e = g.edge_ptr[flat + 1] - g.edge_ptr[flat]
    n_member = np.bincount(member, weights=n, minlength=M).astype(np.int64)
    e_member = np.bincount(member, weights=e, minlength=M).astype(np.int64)
    # first node / edge of every graph inside its member's batch
    node_start = np.cumsum(n) - n - np.repeat(np.cumsum(n_member) - n_member, b)
    edge_start = np.cumsum(e) - e - np.repeat(np.cumsum(e_member) - e_member, b)
    N, E, R = int(n_member.max()) + 1, int(e_member.max()), int(b.max())
    S = R + 1
    if shapes is not None:
        fits = [s for s in shapes if s[0] >= N and s[1] >= E and s[2] - DUMMY_SLOTS >= R]
        if not fits:
            raise ValueError(f"batches of {N - 1} nodes, {E} edges and {R} graphs do not fit the shapes {shapes}")
        N, E, S = fits[0]
        R = S - DUMMY_SLOTS

    def dev(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    node_src, node_dst = dev(_ranges(g.node_ptr[flat], n)), dev(_ranges(member * N + node_start, n))
    edge_src, edge_dst = dev(_ranges(g.edge_ptr[flat], e)), dev(_ranges(member * E + edge_start, e))
    graph_src, real = dev(flat), dev(member * R + slot)

    node_type = g.node_type.new_zeros(M * N)
    node_type[node_dst] = g.node_type[node_src]
    # padding node i >= n_m of member m -> dummy slot R + (i - n_m) mod (S - R); its padding edge j >= e_m -> the
    # self-loop on padding node n_m + (j - e_m) mod (N - n_m)
    pad_slot = R + (np.arange(N)[None, :] - n_member[:, None]) % (S - R)
    batch = dev(pad_slot.reshape(-1))
    batch[node_dst] = dev(np.repeat(slot, n))
    pad_end = n_member[:, None] + (np.arange(E)[None, :] - e_member[:, None]) % (N - n_member[:, None])
    edge_index = dev(np.broadcast_to(pad_end.reshape(-1), (2, M * E)).copy())
    edge_index[:, edge_dst] = g.edge_index[:, edge_src] + dev(np.repeat(node_start, e))
    edge_dist = g.edge_dist.new_zeros(M * E)
    edge_dist[edge_dst] = g.edge_dist[edge_src]
    state = g.state.new_zeros(M, S, g.state.shape[1])
    state.view(M * S, -1)[dev(member * S + slot)] = g.state[graph_src]
    target = g.ltc.new_ones(M * R)
    target[real] = g.ltc[graph_src]
    mask = g.ltc.new_zeros(M * R)
    mask[real] = 1.0
    return PaddedBatch(node_type.view(M, N), edge_index.view(2, M, E).transpose(0, 1), edge_dist.view(M, E),
                       batch.view(M, N), state, target.view(M, R), mask.view(M, R), dev(b.astype(np.float32)))
