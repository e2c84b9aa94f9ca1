"""How one training step is computed: the only thing that differs between one split and M splits at once.

:func:`paraisite.training.loop.train` is one loop for both. It hands each step the
next batch of every member (one member per split) and asks a stepper:

    step(batches)       one Adam step of every member on its own batch; the loss summed over
                        each member's graphs, ``[M]`` float64 (the loop divides by the epoch's count)
    losses(parts)       every member's MAPE on its own part (validation or selection), W/m/K
    member(m)           member m as a ``ParAIsite`` with its current weights (to save or score it)
    freeze_megnet(f)    while f, MEGNet's parameters take no gradient and no Adam step (the head trains alone)
    state(), load_state(members, param_groups)
                        the resume state of each member, its weights and Adam moments: one format
                        whatever the stepper, so a state written by one is read by the other

:class:`PlainStep` trains one model on a PyG ``Batch``; :class:`StackedStep`
trains M models stacked into one (:mod:`paraisite.training.stacked`) on padded batches,
on CUDA replaying each step as a CUDA graph. Both use fused Adam (MEGNet at
its own learning rate with ``megnet_lr``; frozen by ``freeze_megnet``), the loss ``loss``
(:func:`paraisite.evaluation.metrics.training_loss`), and clip each member's gradient on
its own when ``clip_grad_norm`` is set.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megnet_pt.model import collate

from ..data.datasets import LTCDataset
from ..evaluation.metrics import mape_loss, training_loss
from ..model import ParAIsite, predict
from .padding import PackedGraphs, pad_batches, padded_shapes
from .stacked import CUDAGraphStep, StackedModel, train_step, validate
from ..transform import TargetTransform

MemberState = dict[str, dict[str, Any]]  # {"model": state_dict, "adam": {parameter name: Adam's state}}


def adam(named: list[tuple[str, Tensor]], lr: float, megnet_lr: float | None = None) -> torch.optim.Adam:
    """Adam over the trainable ``(name, parameter)`` pairs: one group at ``lr``, or with ``megnet_lr`` two,
    MEGNet's parameters (``megnet.*``) at ``megnet_lr`` and the head's at ``lr`` (each annealed alike)."""
    if megnet_lr is None:
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": [p for n, p in named if n.startswith("megnet.")], "lr": megnet_lr},
                  {"params": [p for n, p in named if not n.startswith("megnet.")]}]
    # fused: one kernel over all parameter tensors instead of a Python loop (3x faster step on a CPU);
    # Adam is elementwise, so on stacked tensors it is M independent Adams
    return torch.optim.Adam(groups, lr=lr, eps=1e-8, fused=True)


def _set_megnet_trainable(named: list[tuple[str, Tensor]], trainable: bool) -> None:
    """Switch MEGNet's gradients on or off: with none, fused Adam skips a parameter (no moment, no step count)."""
    for name, p in named:
        if name.startswith("megnet."):
            p.requires_grad_(trainable)


def _param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimiser's settings per group (lr as scheduled, betas, ...), without their parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _load_adam(optimizer: torch.optim.Optimizer, params: list[Tensor], adam_states: list[dict[str, Tensor]],
               param_groups: list[dict[str, Any]]) -> None:
    """Give each of ``params`` its saved Adam state and each group its saved settings."""
    if len(param_groups) != len(optimizer.param_groups):
        raise ValueError(f"the state has {len(param_groups)} parameter group(s), this optimiser {len(optimizer.param_groups)}")
    state_of = dict(zip(params, adam_states))  # tensors hash by identity
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, param_groups):
        groups.append(dict(saved, params=list(range(start, start + len(group["params"])))))
        start += len(group["params"])
    optimizer.load_state_dict({"state": {i: state_of[p] for i, p in enumerate(ordered)}, "param_groups": groups})


def validation_mape(model: ParAIsite, graphs: list, idx: np.ndarray, transform: TargetTransform, data: LTCDataset,
                    device: torch.device) -> float:
    """MAPE (W/m/K) of ``model`` on the structures ``idx`` of ``data`` (``graphs``: its graphs, on ``device``)."""
    return float(mape_loss(predict(model, [graphs[i] for i in idx], transform, device), data.ltc[idx]))


class PlainStep:
    """One model, one batch at a time: the textbook step."""

    def __init__(self, models: list[ParAIsite], transforms: list[TargetTransform], data: LTCDataset,
                 device: torch.device, lr: float, clip_grad_norm: float | None = None, loss: str = "mape",
                 megnet_lr: float | None = None) -> None:
        if len(models) != 1:
            raise ValueError(f"PlainStep trains one model (got {len(models)}); use StackedStep for several")
        self.model, self.transform, self.data, self.device = models[0].to(device), transforms[0], data, device
        self.y = data.ltc.to(device)
        # copies: PyG's .to() moves in place, and the dataset's graphs must stay on the CPU for other uses
        self.graphs = [copy.copy(g).to(device) for g in data.graphs] if device.type != "cpu" else data.graphs
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in trainable], [p for _, p in trainable]
        self.optimizer = adam(trainable, lr, megnet_lr)
        self.clip_grad_norm, self.loss = clip_grad_norm, loss

    def step(self, batches: list[np.ndarray]) -> Tensor:
        (idx,) = batches
        self.model.train()
        batch = collate([self.graphs[j] for j in idx])
        loss = training_loss(self.model(batch), self.y[idx], self.transform.mean, self.transform.std, self.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self.optimizer.step()
        return loss.detach().double().view(1) * len(idx)

    def losses(self, parts: list[np.ndarray]) -> list[float]:
        (idx,) = parts
        return [validation_mape(self.model, self.graphs, idx, self.transform, self.data, self.device)]

    def member(self, m: int) -> ParAIsite:
        return self.model

    def freeze_megnet(self, frozen: bool) -> None:
        _set_megnet_trainable(list(zip(self.names, self.params)), not frozen)

    def state(self) -> tuple[list[MemberState], dict[str, Any]]:
        adam_state = [self.optimizer.state[p] for p in self.params]
        return [{"model": self.model.state_dict(), "adam": dict(zip(self.names, adam_state))}], _param_groups(self.optimizer)

    def load_state(self, members: list[MemberState], param_groups: list[dict[str, Any]]) -> None:
        (member,) = members
        self.model.load_state_dict(member["model"])
        _load_adam(self.optimizer, self.params, [member["adam"][n] for n in self.names], param_groups)


class StackedStep:
    """M models of one architecture stacked into one (:mod:`paraisite.training.stacked`), each on its own batch."""

    def __init__(self, models: list[ParAIsite], transforms: list[TargetTransform], data: LTCDataset,
                 device: torch.device, lr: float, clip_grad_norm: float | None = None, batch_size: int = 8,
                 cuda_graphs: bool = True, loss: str = "mape", megnet_lr: float | None = None) -> None:
        self.models, self.transforms, self.data, self.device = models, transforms, data, device
        self.net = StackedModel(models, device)
        self.names = [n for n, p in self.net.params.items() if p.requires_grad]
        # float32, [M, 1]: PlainStep's Python-float transform meets float32 predictions in float32 arithmetic too
        self.mean = torch.tensor([[t.mean] for t in transforms], device=device)
        self.std = torch.tensor([[t.std] for t in transforms], device=device)
        self.packed = PackedGraphs.from_dataset(data, device)
        self.optimizer = adam([(n, self.net.params[n]) for n in self.names], lr, megnet_lr)
        self.clip_grad_norm, self.loss = clip_grad_norm, loss
        graphed = cuda_graphs and device.type == "cuda"
        self.shapes = padded_shapes(self.packed, batch_size) if graphed else None
        self.graphed = CUDAGraphStep(self.net, self.mean, self.std, loss) if graphed else None
        self.frozen = False

    def step(self, batches: list[np.ndarray]) -> Tensor:
        x = pad_batches(self.packed, batches, self.shapes)
        if self.graphed is not None and not self.frozen:  # the graphs were recorded with MEGNet's gradients
            losses = self.graphed(self.optimizer, x, self.clip_grad_norm)
        else:
            losses = train_step(self.net, self.optimizer, x, self.mean, self.std, self.clip_grad_norm, self.loss)
        return losses.double() * x.count

    def losses(self, parts: list[np.ndarray]) -> list[float]:
        if self.device.type != "cpu":
            return validate(self.net, self.packed, parts, self.transforms)
        # on a CPU the vmapped forward over validation-sized chunks is memory-bound and was measured slower
        # than M plain forwards; this way the numbers are also exactly those of PlainStep for the same weights
        return [validation_mape(self.member(m), self.data.graphs, idx, t, self.data, self.device)
                for m, (idx, t) in enumerate(zip(parts, self.transforms))]

    def member(self, m: int) -> ParAIsite:
        return self.net.load_into(m, self.models[m])

    def freeze_megnet(self, frozen: bool) -> None:
        self.frozen = frozen
        _set_megnet_trainable([(n, self.net.params[n]) for n in self.names], not frozen)

    def state(self) -> tuple[list[MemberState], dict[str, Any]]:
        params = [self.net.params[n] for n in self.names]
        members = []
        for m in range(len(self.models)):
            moments = {n: {key: (v if key == "step" else v[m]) for key, v in self.optimizer.state[p].items()}
                       for n, p in zip(self.names, params)}
            members.append({"model": self.net.member_state(m), "adam": moments})
        return members, _param_groups(self.optimizer)

    def load_state(self, members: list[MemberState], param_groups: list[dict[str, Any]]) -> None:
        with torch.no_grad():
            for name, p in self.net.params.items():
                p.copy_(torch.stack([m["model"][name] for m in members]))
            for name, b in self.net.buffers.items():
                b.copy_(torch.stack([m["model"][name] for m in members]))
        stacked = [{key: (v if key == "step" else torch.stack([m["adam"][n][key] for m in members]))
                    for key, v in members[0]["adam"][n].items()} for n in self.names]
        _load_adam(self.optimizer, [self.net.params[n] for n in self.names], stacked, param_groups)
