r"""Training the splits of one dataset together, as one vectorised ensemble.

:func:`paraisite.training.train_split` trains split k on its own. Here the M
splits of a run are trained at once: their parameters are stacked along a
leading model axis, :math:`\Theta = [\theta_1, \dots, \theta_M]`
(``torch.func.stack_module_state``), and one call of the model, vectorised over
that axis with ``torch.func.vmap`` + ``functional_call``, does the work of M.
Every split still sees exactly its own batches, loss and optimiser, so the
result is that of M sequential runs, to float32 round-off.

**One step.** At step t of epoch e, member m (split :math:`k_m`) takes its
next batch :math:`\mathcal B_m` of :math:`b_m \le B` graphs from its own
shuffle, drawn as in ``train_split`` from a generator seeded with
(seed, :math:`k_m`, e), so the batches are exactly those of the sequential
path. The M batches are padded to common shapes and stacked:

.. math::
    N = \max_m n_m + 1,\qquad E = \max_m e_m,\qquad S = \max_m b_m + 1

nodes, edges and graph slots, where :math:`n_m, e_m` count the nodes and edges
of :math:`\mathcal B_m`. Slots :math:`0..b_m-1` hold the real graphs; slot
:math:`S-1` is a dummy graph that owns the padding nodes
(:math:`i \ge n_m`, element 0) and the padding edges (self-loops on the
padding nodes, distance 0). There is always at least one padding node, so
padding edges always have an end. Messages, means over a graph and the
Set2Set softmax are all taken within one graph, so padding leaves the real
graphs' outputs unchanged. (On CUDA the shapes are fixed instead, with
several dummy graphs: :func:`padded_shapes`, :class:`CUDAGraphStep`.)
With :math:`f(\theta; G) \in \mathbb R^S` the standardised prediction of
every slot and :math:`(\mu_m, \sigma_m)` the target transform
fitted on split m's own training part,

.. math::
    \hat z_m &= f(\theta_m; G_m) \qquad (m = 1..M, \text{ one vmapped call}) \\
    \hat y_{m,j} &= 10^{\min(\hat z_{m,j}\sigma_m + \mu_m,\ 6)} - 1 \\
    L(\Theta) &= \sum_{m=1}^M \underbrace{\frac{1}{b_m} \sum_{j < b_m}
        \frac{|y_{m,j} - \hat y_{m,j}|}{\max(|y_{m,j}|, \epsilon)}}_{\mathrm{MAPE}_m(\theta_m)}

with empty slots (:math:`j \ge b_m`, and the dummy) masked out. Since
:math:`\mathrm{MAPE}_m` depends on :math:`\theta_m` alone,
:math:`\partial L / \partial \theta_m = \nabla \mathrm{MAPE}_m(\theta_m)`: one
backward pass through the vmapped call gives every split its own gradient
(plain autograd through ``vmap``; ``vmap(torch.func.grad(...))`` gives the
same and was no faster).
Adam is elementwise, so Adam on :math:`\Theta` is M independent Adams; the
cosine schedule is the same for all. Every split of a dataset has the same
training size, hence the same number of steps per epoch and the same Adam step
count.

**Validation**: each split on its own validation part, as ``train_split``
(chunks of 256 graphs, back-transform in float64); vectorised the same way on
a GPU, member after member on a CPU, where that is faster. Each split keeps
its own best epoch.

**Files.** For every split the files of ``train_split``:
``split<k>/best.pt``, ``final.pt`` (:func:`paraisite.checkpoint.save_model`,
same metadata) and ``curve.csv`` (same columns; ``seconds`` is the split's
share, 1/M, of the ensemble epoch). The resume state is one atomic file per
group, ``ensemble_state_<k1>-<k2>-....pt`` in the run folder (the splits, the
stacked parameters, optimiser, schedule, curves, bests), written after every
epoch; it is named after its splits so that torchrun processes, each training
its share, do not collide. Splits already finished (``final.pt``) are left
alone; a state of another group of splits, or a split halfway through a
sequential run (``split<k>/state.pt``), is refused with a ``CheckpointError``.
On the CPU, an interrupted and resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from megnet_pt import MEGNet
from megnet_pt.checkpoint import CheckpointError

from .checkpoint import atomic_save, save_model
from .datasets import LTCDataset
from .metrics import mape_loss
from .model import ParAIsite
from .report import write_csv
from .training import ETA_MIN, T_MAX, TrainConfig, _epoch_generator, initial_model, predict, split_dir
from .transform import MAX_LOG10, TargetTransform

VAL_CHUNK = 256  # graphs per split per validation call, as training.predict


# --- padding M batches of graphs to one stacked batch ----------------------------------------

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


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` over (s, c)."""
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


DUMMY_SLOTS = 8  # dummy graphs of a fixed-shape batch: its padding is spread over them (fewer colliding atomics)


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


# --- the vectorised model and step ------------------------------------------------------------

class StackedModel:
    """M ParAIsite models of one architecture as stacked tensors, evaluated with one vmapped call."""

    def __init__(self, models: list[ParAIsite], device: torch.device) -> None:
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in params.items()}
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        with torch.device("meta"):
            self.base = ParAIsite(MEGNet(models[0].megnet.config))

    def trainable(self) -> list[Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def __call__(self, x: PaddedBatch) -> Tensor:
        """Standardised predictions ``[M, S]`` of every graph slot."""
        S = x.num_slots

        def one(params, buffers, node_type, edge_index, edge_dist, batch, state):
            graph = SimpleNamespace(node_type=node_type, edge_index=edge_index, edge_dist=edge_dist, batch=batch,
                                    state=state, num_graphs=S)
            return functional_call(self.base, (params, buffers), (graph,))

        return vmap(one)(self.params, self.buffers, x.node_type, x.edge_index, x.edge_dist, x.batch, x.state)

    def load_into(self, m: int, model: ParAIsite) -> ParAIsite:
        """Copy the weights of member ``m`` into ``model`` (to save it)."""
        weights = {k: v[m] for k, v in self.params.items()} | {k: v[m] for k, v in self.buffers.items()}
        model.load_state_dict(weights)
        return model


def inverse_transform(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """:meth:`TargetTransform.inverse` with one (mean, std) per row of ``z``."""
    return torch.pow(10.0, torch.clamp(z * std[:, None] + mean[:, None], max=MAX_LOG10)) - 1


def batched_mape(y_pred: Tensor, x: PaddedBatch, eps: float = 1e-8) -> Tensor:
    """:func:`paraisite.metrics.mape_loss` of every member over its real graphs: ``[M]``."""
    return ((x.target - y_pred).abs() / x.target.abs().clamp(min=eps) * x.mask).sum(dim=1) / x.count


def clip_members(params: list[Tensor], max_norm: float) -> None:
    r"""``torch.nn.utils.clip_grad_norm_`` for each member alone: :math:`g_m \leftarrow g_m \min(1, c/(\lVert g_m \rVert + 10^{-6}))`.

    ``params`` are stacked (dimension 0 is the member), so each member's norm is
    taken over its own slices of every tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


def train_step(net: StackedModel, optimizer: torch.optim.Optimizer, x: PaddedBatch, mean: Tensor,
               std: Tensor, clip_grad_norm: float | None = None) -> Tensor:
    """One Adam step of every member on its own batch; returns the M training losses (detached)."""
    z = net(x)[:, : x.num_real]
    losses = batched_mape(inverse_transform(z, mean, std), x)
    optimizer.zero_grad(set_to_none=True)
    # the members' losses do not share parameters, so d(sum)/d(theta_m) = d(loss_m)/d(theta_m)
    losses.sum().backward()
    if clip_grad_norm:
        clip_members(net.trainable(), clip_grad_norm)
    optimizer.step()
    return losses.detach()


@contextlib.contextmanager
def _side_stream_warning_ignored() -> Iterator[None]:
    """The recorded backward runs on make_graphed_callables' side stream, which autograd warns of; harmless here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
        yield


class CUDAGraphStep:
    r"""``train_step`` with its forward and backward recorded as CUDA graphs and replayed.

    On a GPU one eager step of the stacked model launches about a thousand
    small kernels and waits on the host that launches them
    (``benchmarks/bench_train.py``). Every batch is padded to one of a few
    fixed shapes (:func:`padded_shapes`), and for each shape the map

    .. math::
        (\Theta, G) \mapsto \big[\mathrm{MAPE}_m(\theta_m)\big]_{m=1..M}

    and its backward are recorded the first time the shape comes up
    (``torch.cuda.make_graphed_callables``, whose warm-up calls take gradients
    without touching ``.grad``, so they do not train) and replayed after that.
    Padding adds only dummy graphs, their nodes and edges, and empty slots,
    which change no real graph's output. The optimiser step (fused Adam, a few
    kernels) stays eager, so the optimiser, its schedule and the resume state
    are those of ``train_step``.
    """

    def __init__(self, net: StackedModel, mean: Tensor, std: Tensor) -> None:
        self.net, self.params, self.mean, self.std = net, net.trainable(), mean, std
        self.graphs: dict[tuple[int, int, int], Any] = {}

    @staticmethod
    def _inputs(x: PaddedBatch) -> tuple[Tensor, ...]:
        return (x.node_type, x.edge_index, x.edge_dist, x.batch, x.state, x.target, x.mask, x.count)

    def _record(self, x: PaddedBatch) -> Any:
        n, net, mean, std = len(self.params), self.net, self.mean, self.std

        def losses(*args: Tensor) -> Tensor:  # args: the trainable tensors of net.params, then the batch's
            batch = PaddedBatch(*args[n:])
            z = net(batch)[:, : batch.num_real]
            return batched_mape(inverse_transform(z, mean, std), batch)

        with _side_stream_warning_ignored(), torch.cuda.device(x.node_type.device):
            return torch.cuda.make_graphed_callables(losses, (*self.params, *self._inputs(x)))

    def __call__(self, optimizer: torch.optim.Optimizer, x: PaddedBatch, clip_grad_norm: float | None = None) -> Tensor:
        """As :func:`train_step` (``x`` padded by :func:`pad_batches` with ``shapes``)."""
        shape = (x.node_type.shape[1], x.edge_index.shape[2], x.num_slots)
        if shape not in self.graphs:
            self.graphs[shape] = self._record(x)
        losses = self.graphs[shape](*self.params, *self._inputs(x))
        optimizer.zero_grad(set_to_none=True)
        with _side_stream_warning_ignored():
            losses.sum().backward()
        if clip_grad_norm:
            clip_members(self.params, clip_grad_norm)
        optimizer.step()
        return losses.detach()


@torch.no_grad()
def validate(net: StackedModel, packed: PackedGraphs, val_idx: list[np.ndarray],
             transforms: list[TargetTransform]) -> list[float]:
    """Validation MAPE of every member on its own validation part, vectorised (for a GPU).

    As ``training.predict`` + ``mape_loss``: chunks of 256 graphs per member,
    back-transform in float64.
    """
    mean = torch.tensor([t.mean for t in transforms], dtype=torch.float64, device=packed.ltc.device)
    std = torch.tensor([t.std for t in transforms], dtype=torch.float64, device=packed.ltc.device)
    preds = []
    for i in range(0, max(len(v) for v in val_idx), VAL_CHUNK):
        x = pad_batches(packed, [v[i : i + VAL_CHUNK] for v in val_idx])
        preds.append(inverse_transform(net(x)[:, : x.num_real].double(), mean, std).float().cpu())
    pred = torch.cat(preds, dim=1)
    ltc = packed.ltc.cpu()
    return [float(mape_loss(pred[m, : len(v)], ltc[torch.from_numpy(v)])) for m, v in enumerate(val_idx)]


def validate_one_by_one(net: StackedModel, models: list[ParAIsite], data: LTCDataset, val_idx: list[np.ndarray],
                        transforms: list[TargetTransform]) -> list[float]:
    """The same, member after member with ``training.predict`` (for a CPU).

    On a CPU the vmapped forward over validation-sized chunks is memory-bound
    and was measured slower than M plain forwards; this way the validation
    numbers are also those of ``train_split`` for the same weights.
    """
    cpu = torch.device("cpu")
    return [float(mape_loss(predict(net.load_into(m, model), [data.graphs[i] for i in v], t, cpu), data.ltc[v]))
            for m, (model, v, t) in enumerate(zip(models, val_idx, transforms))]


# --- the training loop ------------------------------------------------------------------------

def state_path(run_dir: Path, splits: list[int]) -> Path:
    return run_dir / f"ensemble_state_{'-'.join(map(str, splits))}.pt"


def _splits_of(path: Path) -> list[int]:
    found = re.fullmatch(r"ensemble_state_([0-9-]+)\.pt", path.name)
    return [int(v) for v in found.group(1).split("-")] if found else []


def _load_state(path: Path, splits: list[int], dataset: str, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}: {exc}); delete it to restart "
                              f"split(s) {splits}") from exc
    if state.get("splits") != splits or state.get("dataset") != dataset:
        raise CheckpointError(f"{path}: resume state of the ensemble of split(s) {state.get('splits')} on "
                              f"{state.get('dataset')!r}, not of split(s) {splits} on {dataset!r}; "
                              "delete it to restart")
    return state


def _find_state(run_dir: Path, pending: list[int], epochs: int, device: torch.device,
                dataset: str) -> tuple[list[int], dict | None]:
    """The group to train (normally ``pending``) and its resume state, refusing states of other groups.

    A complete state of a larger group whose other splits are finished is the
    same group killed while writing its final models: it is finished from there.
    """
    for path in sorted(run_dir.glob("ensemble_state_*.pt")):
        theirs = _splits_of(path)
        if theirs == pending or not set(theirs) & set(pending):
            continue
        others_done = all((split_dir(run_dir, k) / "final.pt").is_file() for k in set(theirs) - set(pending))
        if set(pending) < set(theirs) and others_done:
            state = _load_state(path, theirs, dataset, device)
            if len(state["curves"][theirs[0]]) == epochs:
                return theirs, state
        raise CheckpointError(
            f"{path}: resume state of the ensemble of split(s) {theirs}, but split(s) {pending} are to be trained "
            f"together now; run with --splits {','.join(map(str, theirs))} to resume it, or delete it to restart")
    for k in pending:
        single = split_dir(run_dir, k) / "state.pt"
        if single.is_file():
            raise CheckpointError(f"{single}: split {k} was being trained on its own; finish it without --ensemble, "
                                  "or delete this file to train it in the ensemble from the start")
    path = state_path(run_dir, pending)
    return pending, (_load_state(path, pending, dataset, device) if path.is_file() else None)


def train_splits_together(
    data: LTCDataset, splits: list[int], config: TrainConfig, run_dir: Path, device: torch.device,
    deadline: float | None = None, progress: bool = True, cuda_graphs: bool = True,
) -> bool:
    """Train ``splits`` of ``data`` as one vectorised ensemble to ``config.epochs`` (see the module docstring).

    Resumes from the group's ``ensemble_state_*.pt``; skips splits that have a
    ``final.pt``; refuses (``CheckpointError``) a resume state of another group
    of splits. ``deadline`` (a ``time.monotonic()`` value) ends the call after
    the first epoch that finishes past it; returns True when every split is done.
    On CUDA the step is replayed as a CUDA graph (:class:`CUDAGraphStep`)
    unless ``cuda_graphs`` is False.
    """
    pending = [k for k in sorted(set(splits)) if not (split_dir(run_dir, k) / "final.pt").is_file()]
    if not pending:
        return True
    group, state = _find_state(run_dir, pending, config.epochs, device, data.name)
    M = len(group)
    train_idx, select_idx, val_idx = zip(*(data.training_parts(k, config.select_holdout) for k in group))
    n_train = len(train_idx[0])
    if any(len(t) != n_train for t in train_idx):
        raise ValueError(f"splits {group} of {data.name} have training parts of different sizes; train them one by one")
    transforms = [TargetTransform.fit(data.ltc[t]) for t in train_idx]
    # float32: train_split's Python-float transform meets float32 predictions in float32 arithmetic too
    mean = torch.tensor([t.mean for t in transforms], device=device)
    std = torch.tensor([t.std for t in transforms], device=device)
    packed = PackedGraphs.from_dataset(data, device)

    models = [initial_model(config, k) for k in group]
    net = StackedModel(models, device)
    # fused: one kernel over all stacked tensors; Adam is elementwise, so this is M independent Adams
    optimizer = torch.optim.Adam(net.trainable(), lr=config.lr, eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_MAX, eta_min=ETA_MIN)
    curves: dict[int, list[dict[str, float]]] = {k: [] for k in group}
    bests = {k: {"val": float("inf"), "epoch": 0} for k in group}
    path = state_path(run_dir, group)
    if state is not None:
        try:
            with torch.no_grad():
                for name, p in net.params.items():
                    p.copy_(state["params"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            curves, bests = state["curves"], state["bests"]
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}: {exc}); "
                                  "delete it to restart") from exc
    for k in group:
        split_dir(run_dir, k).mkdir(parents=True, exist_ok=True)
    start = len(curves[group[0]])
    graphed = cuda_graphs and device.type == "cuda"
    shapes = padded_shapes(packed, config.batch_size) if graphed else None
    step = CUDAGraphStep(net, mean, std) if graphed else None

    def losses_on(parts: tuple[np.ndarray, ...]) -> list[float]:
        """Each split's MAPE on its own part (validation or selection): member by member on a CPU, vectorised else."""
        if device.type == "cpu":
            return validate_one_by_one(net, models, data, list(parts), transforms)
        return validate(net, packed, list(parts), transforms)

    bar = tqdm(range(start + 1, config.epochs + 1), unit="epoch", initial=start, total=config.epochs,
               desc=f"{config.init} {data.name} splits {','.join(map(str, group))}", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        orders = [t[torch.randperm(n_train, generator=_epoch_generator(config.seed, k, epoch)).numpy()]
                  for k, t in zip(group, train_idx)]
        total = torch.zeros(M, dtype=torch.float64, device=device)
        for i in range(0, n_train, config.batch_size):
            x = pad_batches(packed, [o[i : i + config.batch_size] for o in orders], shapes)
            if step is not None:
                losses = step(optimizer, x, config.clip_grad_norm)
            else:
                losses = train_step(net, optimizer, x, mean, std, config.clip_grad_norm)
            total += losses.double() * x.count
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        vals = losses_on(val_idx)
        sels = losses_on(select_idx) if config.select_holdout else vals
        train_loss = (total / n_train).tolist()
        seconds = (time.perf_counter() - t0) / M  # each split's share of the ensemble epoch
        for m, k in enumerate(group):
            curves[k].append({"epoch": epoch, "train_loss": train_loss[m], "val_loss": vals[m], "lr": lr,
                              "seconds": seconds} | ({"select_loss": sels[m]} if config.select_holdout else {}))
            if sels[m] < bests[k]["val"]:
                bests[k] = {"val": sels[m], "epoch": epoch}
                save_model(net.load_into(m, models[m]), transforms[m], split_dir(run_dir, k) / "best.pt",
                           selection="best", init=config.init, dataset=data.name, split=k, epoch=epoch)
        atomic_save({"splits": group, "dataset": data.name, "params": {n: p.detach() for n, p in net.params.items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "curves": curves, "bests": bests}, path)
        for k in group:
            write_csv(split_dir(run_dir, k) / "curve.csv", curves[k])
        bar.set_postfix(val=" ".join(f"{v:.3f}" for v in vals))
        if deadline is not None and time.monotonic() > deadline and epoch < config.epochs:
            bar.close()
            return False
    bar.close()
    for m, k in enumerate(group):
        if not (split_dir(run_dir, k) / "final.pt").is_file():
            save_model(net.load_into(m, models[m]), transforms[m], split_dir(run_dir, k) / "final.pt",
                       selection="final", init=config.init, dataset=data.name, split=k, epoch=config.epochs)
    path.unlink(missing_ok=True)
    return True
