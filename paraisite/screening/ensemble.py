"""The nine ParAIsite models of a run (or of the shipped ensemble in weights/) as one module.

A run folder (``python train.py ...`` writes ``runs/<init>_<dataset>/``) holds
one trained model per split, ``split<k>/best.pt`` (lowest validation loss) and
``split<k>/final.pt`` (last epoch). :func:`load_ensemble` loads one of the two
for every split, checks that they belong together (same MEGNet configuration,
hence the same cutoff; same training set and initialisation) and returns an
:class:`Ensemble`: a batch of crystal graphs in, an ``[B, M]`` matrix of LTC
predictions (W/m/K) out, one column per model.

Three forward passes give the same numbers (to float32 round-off):
``reference``, each model's own ``ParAIsite.forward`` one after the other;
``fused`` (default), the M models stacked into one hand-written pass
(:mod:`paraisite.screening.fused`, about 2x faster on a CPU); and ``fast``,
each model's own forward through megnet_pt's C++ nodes (:mod:`megnet_pt.fast`:
a C++ compiler and ninja at first use; on a CPU about 1.3x the fused pass).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from megnet_pt.checkpoint import CheckpointError
from megnet_pt.fast import fast_ops, set_fast

from ..checkpoint import load_model_file
from .fused import FusedParAIsite
from .shipped import MANIFEST, check_shipped, is_shipped
from ..model import ParAIsite
from ..training.provenance import check_file, run_record
from ..training.rundir import RunDir
from ..transform import TargetTransform, inverse_transform

METHODS = ("fused", "reference", "fast")


# --- loading a run ------------------------------------------------------------------------------

@dataclass
class RunInfo:
    """Where the models of an ensemble come from."""

    run_dir: Path
    selection: str
    splits: list[int]
    init: str
    dataset: str
    cutoff: float
    epochs: list[int]
    shipped: bool = False  # the ensemble shipped in weights/, not a run folder

    def describe(self) -> str:
        where = f"the shipped ensemble {self.run_dir} (its card: README.md there)" if self.shipped else self.run_dir
        return (f"{len(self.splits)} models ({self.init} trained on {self.dataset}, {self.selection}.pt of split(s) "
                f"{','.join(map(str, self.splits))}) from {where}")


def load_ensemble(run_dir: str | Path, selection: str | None = None, method: str = "fused") -> Ensemble:
    """The models of every split of ``run_dir`` as one :class:`Ensemble` (in eval mode, on the CPU).

    ``run_dir`` is a run folder (``selection`` default ``best``) or a shipped ensemble
    (:mod:`paraisite.screening.shipped`, its own selection, every file's sha256 checked first). Each file must
    be the ``selection`` model of the split of its folder, and all of one run: the run its ``config.json``
    names, where it has a readable one (:mod:`paraisite.training.provenance`)."""
    run = RunDir(run_dir)
    shipped = check_shipped(run_dir) if is_shipped(run_dir) else None
    if shipped is not None:
        if selection not in (None, shipped["selection"]):
            raise CheckpointError(f"{run_dir}: a shipped ensemble of {shipped['selection']}.pt models only "
                                  f"(no {selection}.pt); drop --selection")
        selection = shipped["selection"]
    selection = selection or "best"
    models, transforms, metas, splits = [], [], [], []
    checkpoints = run.finished_checkpoints(selection)
    if shipped is not None:
        unlisted = [str(p) for _, p in checkpoints if p.relative_to(run.path).as_posix() not in shipped["files"]]
        if unlisted:
            raise CheckpointError(f"{', '.join(unlisted)}: not in {run.path / MANIFEST}, so not of the shipped "
                                  "ensemble; remove it")
    config = run.read_config()
    for k, path in checkpoints:
        model, transform, meta = load_model_file(path)
        if config is None and meta.get("run") is not None and metas and metas[0].get("run") is not None:
            config = metas[0]["run"]["settings"] | {"inputs": metas[0]["run"]["inputs"]}  # one run: split 1's
        check_file(meta, str(path), split=k, selection=selection,
                   record=run_record(config) if config is not None else None)
        models.append(model)
        transforms.append(transform)
        metas.append(meta)
        splits.append(k)
    first = metas[0]
    for k, meta in zip(splits[1:], metas[1:]):
        for key in ("megnet_config", "dataset", "init"):
            if meta.get(key) != first.get(key):
                raise CheckpointError(
                    f"{run_dir}: split {k} does not belong with split {splits[0]}: {key} is {meta.get(key)!r} there, "
                    f"{first.get(key)!r} in split {splits[0]}"
                )
    info = RunInfo(Path(run_dir), selection, splits, str(first.get("init")), str(first.get("dataset")),
                   float(first["megnet_config"]["cutoff"]), [int(m.get("epoch", 0)) for m in metas], shipped is not None)
    return Ensemble(models, transforms, info, method=method)


# --- the ensemble -------------------------------------------------------------------------------

class Ensemble(nn.Module):
    r"""M ParAIsite models (one per split) with their target transforms.

    ``forward(batch)`` returns the LTC (W/m/K, float64) ``[B, M]``:

    .. math::
        \hat y_{g,m} = 10^{\min(\hat z_{g,m} \sigma_m + \mu_m,\ 6)} - 1

    where :math:`\hat z_{g,m}` is model m's standardised output for graph g and
    :math:`(\mu_m, \sigma_m)` its split's transform, applied in float64 as in
    training. ``models_per_pass`` evaluates the models in groups of that size
    (the default, all at once, suits a GPU; on a CPU smaller groups keep the
    per-edge tensors in cache).
    """

    def __init__(
        self, models: Sequence[ParAIsite], transforms: Sequence[TargetTransform], info: RunInfo | None = None,
        method: str = "fused", models_per_pass: int | None = None,
    ) -> None:
        super().__init__()
        if not models or len(models) != len(transforms):
            raise ValueError("an ensemble needs at least one model and one transform per model")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
        self.models = nn.ModuleList(m.eval() for m in models)
        if method == "fast":
            fast_ops()  # compiled now: a missing compiler is said before a scan starts
            set_fast(self.models)
        self.info = info
        self.method = method
        self.models_per_pass = models_per_pass
        self.register_buffer("log_mean", torch.tensor([t.mean for t in transforms], dtype=torch.float64))
        self.register_buffer("log_std", torch.tensor([t.std for t in transforms], dtype=torch.float64))
        self.cutoff = float(models[0].megnet.config.cutoff)
        self.set_models_per_pass(models_per_pass)

    def __len__(self) -> int:
        return len(self.models)

    def set_models_per_pass(self, n: int | None) -> None:
        """Evaluate the models in groups of ``n`` (None: all in one pass)."""
        self.models_per_pass = n
        self.fused = FusedParAIsite(list(self.models), n).to(self.log_mean.device)

    def standardised(self, batch: Data | Batch) -> Tensor:
        """The models' outputs before the back-transform, ``[B, M]`` float32."""
        if self.method in ("reference", "fast"):
            return torch.stack([m(batch) for m in self.models], dim=1)
        return self.fused(batch).t()

    @torch.inference_mode()
    def forward(self, batch: Data | Batch) -> Tensor:
        return inverse_transform(self.standardised(batch).double(), self.log_mean, self.log_std)
