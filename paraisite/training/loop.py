"""Training ParAIsite models, one per split: one loop, whatever computes the step.

For each split k (training part T, selection part S, validation part V):

    transform = TargetTransform.fit(y[T])
    for epoch in 1..E:
        for each batch B of a shuffled T:    loss = MAPE(transform.inverse(model(B)), y[B]); Adam step
        cosine schedule step (T_max = 1000 epochs, eta_min = 1e-5)
        val = MAPE over V; keep the weights of the lowest MAPE over S as best.pt

S is V itself in the paper's protocol, or with ``select_holdout`` a share of
T that is then not trained on (:meth:`LTCDataset.training_parts`). Off the
paper, a config may also change the loss (``loss="log10"``: the error of
log10(y + 1)), give MEGNet its own learning rate (``megnet_lr``), or make
final.pt the mean of the weights of the last ``swa_epochs`` epochs (stochastic
weight averaging), or train the head alone for the first ``freeze_megnet_epochs``
epochs; :data:`RECIPES` names such settings.

:func:`train` runs this loop for a group of splits at once: one split with a
:class:`~paraisite.training.steps.PlainStep`, or M splits stacked into one model with a
:class:`~paraisite.training.steps.StackedStep` (``stacked=True``, meant for a GPU).
Everything else (shuffles, schedule, validation, selection, curves,
checkpoints, the resume state, the time limit) is this one loop. The shuffle
of epoch e of split k is drawn from a generator seeded with (seed, k, e), so
the batches do not depend on the stepper, and an interrupted run resumes from
its last completed epoch and, on the CPU, ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from megnet_pt import MEGNet
from megnet_pt.checkpoint import CheckpointError, atomic_save, check_digest, load_plain, tensors_sha256
from megnet_pt.fast import set_fast
from megnet_pt.interrupt import check_interrupted

from ..checkpoint import load_model_file, read_model_checkpoint, save_model
from ..data.datasets import LTCDataset
from ..model import ParAIsite, predict, published_megnet
from ..evaluation.paper_scale import PaperScale
from ..evaluation.report import write_csv
from ..evaluation.metrics import regression_metrics
from .provenance import check_file, run_record
from .rundir import RunDir
from .steps import PlainStep, StackedStep
from ..transform import TargetTransform

INITS = ("rw", "fe", "fe+af", "rw+af")
T_MAX = 1000
ETA_MIN = 1e-5
STATE_FORMAT = "paraisite.train_state"
STATE_VERSION = 3  # 3: with the run's record (paraisite.training.provenance)


# Named settings off the paper's protocol (train.py --recipe); "paper" is the protocol itself. "robust" is the
# recipe of the candidate scripts/recipe_search.py chose on inner hold-outs of the training parts only (which
# averages three seeds of it; one is trained here), trained on the whole training part (docs/results.md: on
# Togo15 its final models score about what the paper's protocol's do).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "robust": {"loss": "log10"},
}
# the TrainConfig fields a recipe may set and a train.py flag of the same name overrides
RECIPE_SETTINGS = ("clip_grad_norm", "select_holdout", "loss", "megnet_lr", "swa_epochs", "freeze_megnet_epochs")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: the message names the split and the epoch."""


@dataclass
class TrainConfig:
    """Settings that define a run; two runs in one folder must agree on these."""

    init: str = "fe+af"
    dataset: str = "togo15"
    epochs: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 42
    cutoff: float = 4.0
    aflow_run: str | None = None  # folder of the AFLOW-stage run for fe+af / rw+af
    clip_grad_norm: float | None = None  # not in the paper: clip each step's gradient to this L2 norm
    select_holdout: float | None = None  # not in the paper: choose the epoch on this share of the training part
    loss: str = "mape"  # "log10", not in the paper: the error of log10(LTC + 1) (paraisite.evaluation.metrics.training_loss)
    megnet_lr: float | None = None  # not in the paper: MEGNet's own learning rate (the head keeps lr)
    swa_epochs: int | None = None  # not in the paper: final.pt is the mean of the weights of the last N epochs
    freeze_megnet_epochs: int | None = None  # not in the paper: MEGNet is not trained in the first N epochs
    recipe: str = "paper"  # the name of the settings above (RECIPES); the folder is named after it
    fast_step: bool = False  # megnet_pt.fast: the same function in C++ nodes, float32 sums in another order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def off_paper(self) -> dict[str, Any]:
        """The training settings that are not the paper's (summary.md names them; select_holdout has its own line)."""
        paper = TrainConfig(init=self.init, dataset=self.dataset).to_dict()
        keys = {*RECIPE_SETTINGS, "recipe", "lr", "epochs", "batch_size", "seed"} - {"select_holdout"}
        return {k: v for k, v in self.to_dict().items() if k in keys and v != paper[k]}

    def aflow_stage(self) -> "TrainConfig":
        """The run a ``+af`` init starts from: the same settings on AFLOW AGL, with its own selection."""
        return TrainConfig(init=self.init.split("+")[0], dataset="aflow_agl", epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, seed=self.seed, cutoff=self.cutoff,
                           clip_grad_norm=self.clip_grad_norm, fast_step=self.fast_step)


# --- the model a split starts from -----------------------------------------------------------

def check_aflow_checkpoint(aflow: RunDir, init: str, k: int, cutoff: float) -> None:
    """A clear error unless split ``k`` of ``aflow`` holds the finished AFLOW-stage model ``init`` needs."""
    path = aflow.checkpoint(k, "best")
    if not aflow.finished(k):
        raise CheckpointError(f"{aflow.split(k)}: the AFLOW stage of split {k} is unfinished (no final.pt); finish it first")
    meta = read_model_checkpoint(path)
    expected = {"dataset": "aflow_agl", "split": k, "init": init.split("+")[0]}
    wrong = [f"{key} is {meta.get(key)!r}, expected {value!r}" for key, value in expected.items() if meta.get(key) != value]
    if float(meta.get("megnet_config", {}).get("cutoff", -1)) != cutoff:
        wrong.append(f"cutoff is {meta.get('megnet_config', {}).get('cutoff')}, expected {cutoff}")
    if wrong:
        raise CheckpointError(f"{path}: not the AFLOW model this run needs ({'; '.join(wrong)})")


def initial_model(config: TrainConfig, k: int) -> ParAIsite:
    """The model split ``k`` starts from (the head is always seeded with (seed, k))."""
    torch.manual_seed(config.seed * 1000 + k)
    if config.init == "rw":
        return ParAIsite(MEGNet())
    if config.init == "fe":
        return ParAIsite(published_megnet())
    if config.init in ("fe+af", "rw+af"):
        aflow = RunDir(config.aflow_run)
        check_aflow_checkpoint(aflow, config.init, k, config.cutoff)
        return load_model_file(aflow.checkpoint(k, "best"))[0]
    raise ValueError(f"unknown init {config.init!r}: expected one of {', '.join(INITS)}")


# --- the resume state ------------------------------------------------------------------------

def epoch_generator(seed: int, k: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + epoch)


def _load_state(path, group: list[int], dataset: str, record: dict[str, Any]) -> dict:
    try:
        state = load_plain(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({exc}); delete it to restart split(s) {group}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a resume state of this version ({STATE_FORMAT} v{STATE_VERSION}); "
                              f"delete it to restart split(s) {group}")
    check_digest(state, "members", path)
    if state.get("splits") != group or state.get("dataset") != dataset:
        raise CheckpointError(f"{path}: resume state of split(s) {state.get('splits')} on {state.get('dataset')!r}, "
                              f"not of split(s) {group} on {dataset!r}; delete it to restart")
    check_file(state, str(path), record=record)  # written by a run of other settings: resuming it would lie
    return state


def _find_state(run: RunDir, pending: list[int], epochs: int, dataset: str,
                record: dict[str, Any]) -> tuple[list[int], dict | None]:
    """The group to train (normally ``pending``) and its resume state, refusing states of other groups.

    A complete state of a larger group whose other splits are finished is that
    group killed while writing its final models: it is finished from there.
    """
    for path, theirs in run.states():
        if theirs == pending or not set(theirs) & set(pending):
            continue
        if set(pending) < set(theirs) and all(run.finished(k) for k in set(theirs) - set(pending)):
            state = _load_state(path, theirs, dataset, record)
            if len(state["curves"][theirs[0]]) == epochs:
                return theirs, state
        how, was = ("with --ensemble", "trained together") if len(theirs) > 1 else ("without --ensemble", "trained on its own")
        raise CheckpointError(
            f"{path}: resume state of split(s) {theirs} {was}, but split(s) {pending} are to be trained "
            f"together now; run {how} --splits {','.join(map(str, theirs))}, to resume it, or delete it to restart")
    path = run.state(pending)
    return pending, (_load_state(path, pending, dataset, record) if path.is_file() else None)


# --- the loop --------------------------------------------------------------------------------

def train(
    data: LTCDataset, splits: list[int], config: TrainConfig, run: RunDir, device: torch.device,
    stacked: bool = False, deadline: float | None = None, progress: bool = True, cuda_graphs: bool = True,
    on_epoch: Callable[[list[int], int, float], None] | None = None,
) -> bool:
    """Train ``splits`` of ``data`` to ``config.epochs`` into ``run`` (see the module docstring).

    One split at a time, or with ``stacked`` all pending splits together.
    Splits already finished are left alone; a resume state of another group
    of splits is refused (``CheckpointError``). ``deadline`` (a
    ``time.monotonic()`` value) ends the call after the first epoch that
    finishes past it (the limit is checked between epochs); ``on_epoch(group,
    epoch, seconds)`` is called after each epoch is saved. Returns True when
    every split is finished.
    """
    pending = [k for k in sorted(set(splits)) if not run.finished(k)]
    for group in split_groups(pending, stacked):
        if not _train_group(data, group, config, run, device, stacked, deadline, progress, cuda_graphs, on_epoch):
            return False
    return True


def split_groups(splits: list[int], stacked: bool) -> list[list[int]]:
    """The groups the splits are trained in: all together when ``stacked``, else one by one."""
    return [list(splits)] if stacked and splits else [[k] for k in splits]


def _train_group(data: LTCDataset, pending: list[int], config: TrainConfig, run: RunDir, device: torch.device,
                 stacked: bool, deadline: float | None, progress: bool, cuda_graphs: bool,
                 on_epoch: Callable[[list[int], int, float], None] | None = None) -> bool:
    record = run_record(config.to_dict(), {data.name: data.sources_sha256})
    group, state = _find_state(run, pending, config.epochs, data.name, record)
    M = len(group)
    train_idx, select_idx, val_idx = (list(p) for p in zip(*(data.training_parts(k, config.select_holdout) for k in group)))
    n_train = len(train_idx[0])
    if any(len(t) != n_train for t in train_idx):
        raise ValueError(f"splits {group} of {data.name} have training parts of different sizes; train them one by one")
    transforms = [TargetTransform.fit(data.ltc[t]) for t in train_idx]
    models = [initial_model(config, k) for k in group]
    if config.fast_step:
        if stacked or M > 1 or device.type != "cpu":
            raise ValueError("the fast step (--fast-step) is one model at a time on a CPU: train without --ensemble, "
                             "on --device cpu")
        for model in models:
            set_fast(model)
    if stacked or M > 1:  # M > 1 without stacked: a stacked group's complete state, only its final models to write
        stepper = StackedStep(models, transforms, data, device, config.lr, config.clip_grad_norm, config.batch_size,
                              cuda_graphs, config.loss, config.megnet_lr)
    else:
        stepper = PlainStep(models, transforms, data, device, config.lr, config.clip_grad_norm, config.loss,
                            config.megnet_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(stepper.optimizer, T_max=T_MAX, eta_min=ETA_MIN)
    curves: dict[int, list[dict[str, float]]] = {k: [] for k in group}
    bests = {k: {"val": float("inf"), "epoch": 0} for k in group}
    swa_start = config.epochs - config.swa_epochs + 1 if config.swa_epochs else config.epochs + 1
    weight_sums: dict[int, dict[str, torch.Tensor]] = {}  # per split, the weights summed over epochs >= swa_start
    path = run.state(group)
    if state is not None:
        try:
            stepper.load_state(state["members"], state.get("param_groups") or [state["param_group"]])
            scheduler.load_state_dict(state["scheduler"])
            curves, bests = state["curves"], state["bests"]
            weight_sums = {k: member["swa"] for k, member in zip(group, state["members"]) if "swa" in member}
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}: {exc}); "
                                  "delete it to restart") from exc
    for k in group:
        run.split(k).mkdir(parents=True, exist_ok=True)
    start = len(curves[group[0]])
    meta = dict(init=config.init, dataset=data.name, run=record)

    name = f"split {group[0]}" if M == 1 else f"splits {','.join(map(str, group))}"
    if state is not None:
        print(f"{run}: resuming {name} at epoch {start + 1} of {config.epochs} (from {path.name})", file=sys.stderr)
    bar = tqdm(range(start + 1, config.epochs + 1), unit="epoch", initial=start, total=config.epochs,
               desc=f"{config.init} {data.name} {name}", disable=not progress, leave=False)
    for epoch in bar:
        check_interrupted()  # a signal Python dropped (megnet_pt.interrupt) stops the run between epochs
        t0 = time.perf_counter()
        stepper.freeze_megnet(epoch <= (config.freeze_megnet_epochs or 0))
        orders = [t[torch.randperm(n_train, generator=epoch_generator(config.seed, k, epoch)).numpy()]
                  for k, t in zip(group, train_idx)]
        total = None
        for i in range(0, n_train, config.batch_size):
            summed = stepper.step([o[i : i + config.batch_size] for o in orders])
            total = summed if total is None else total + summed
        lr = stepper.optimizer.param_groups[-1]["lr"]  # the head's (the only group unless megnet_lr)
        scheduler.step()
        vals = stepper.losses(val_idx)
        sels = stepper.losses(select_idx) if config.select_holdout else vals
        train_loss = (total / n_train).tolist()
        diverged = [(k, v) for m, k in enumerate(group) for v in (train_loss[m], vals[m]) if not math.isfinite(v)]
        if diverged:  # before anything of this epoch is written: the files hold the last finite epoch
            bar.close()
            raise TrainingDiverged(
                f"{run}: split {diverged[0][0]} diverged in epoch {epoch} (a loss of {diverged[0][1]}); the run stops with "
                f"epoch {epoch - 1} saved. Lower --lr, or try --clip-grad-norm 10, in another --run-dir")
        seconds = (time.perf_counter() - t0) / M  # each split's share of the epoch
        if epoch >= swa_start:
            for m, k in enumerate(group):
                weight_sums[k] = add_weights(weight_sums.get(k), stepper.member(m).state_dict())
        for m, k in enumerate(group):
            curves[k].append({"epoch": epoch, "train_loss": train_loss[m], "val_loss": vals[m], "lr": lr,
                              "seconds": seconds} | ({"select_loss": sels[m]} if config.select_holdout else {}))
            if sels[m] < bests[k]["val"]:
                bests[k] = {"val": sels[m], "epoch": epoch}
                save_model(stepper.member(m), transforms[m], run.checkpoint(k, "best"), selection="best", **meta,
                           split=k, epoch=epoch)
        members, param_groups = stepper.state()
        for member, k in zip(members, group):
            if k in weight_sums:
                member["swa"] = weight_sums[k]
        atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "splits": group, "dataset": data.name,
                     "members": members, "sha256": tensors_sha256(members), "param_groups": param_groups,
                     "scheduler": scheduler.state_dict(), "curves": curves, "bests": bests, "run": record}, path)
        for k in group:
            write_csv(run.curve(k), curves[k])
        if on_epoch is not None:
            on_epoch(group, epoch, time.perf_counter() - t0)
        bar.set_postfix(val=" ".join(f"{v:.3f}" for v in vals), best=" ".join(f"{bests[k]['val']:.3f}" for k in group))
        if deadline is not None and time.monotonic() > deadline and epoch < config.epochs:
            bar.close()
            return False
    bar.close()
    for m, k in enumerate(group):
        if not run.checkpoint(k, "final").is_file():
            model = stepper.member(m)
            if k in weight_sums:
                model.load_state_dict(mean_weights(weight_sums[k], model.state_dict(), config.epochs - swa_start + 1))
            save_model(model, transforms[m], run.checkpoint(k, "final"), selection="final", **meta,
                       split=k, epoch=config.epochs)
    path.unlink(missing_ok=True)
    return True


def add_weights(total: dict[str, torch.Tensor] | None, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + weights`` for every floating tensor of a state dict, summed in float64 (a new dict)."""
    return {n: (w.to(torch.float64, copy=True) if total is None else total[n] + w.double())
            for n, w in weights.items() if w.is_floating_point()}


def mean_weights(total: dict[str, torch.Tensor], like: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """The weight average of stochastic weight averaging (Izmailov et al. 2018): ``total / count`` in the dtypes of ``like``."""
    return {n: (total[n] / count).to(w.dtype) if n in total else w for n, w in like.items()}


# --- scoring a finished split ----------------------------------------------------------------

def evaluate_split(
    k: int, run: RunDir, datasets: dict[str, LTCDataset], device: torch.device, paper_scale: PaperScale | None = None,
    record: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score the best and final models of split ``k`` on each dataset's validation part of seed ``k``.

    Returns metric rows and per-structure prediction rows. With ``paper_scale``
    the rows also hold ``mape_paper_scale``, the MAPE as upstream computed it
    (:mod:`paraisite.evaluation.paper_scale`); empty without. ``share_nonpositive`` is the
    share of predictions at or below 0 W/m/K, which no material has: most of
    them there means the model collapsed (:func:`paraisite.evaluation.report.collapsed`).
    Each file must be of split ``k`` and its selection, and of the run ``record`` when given.
    """
    rows, preds = [], []
    for selection in ("best", "final"):
        model, transform, meta = load_model_file(run.checkpoint(k, selection))
        check_file(meta, str(run.checkpoint(k, selection)), split=k, selection=selection, record=record)
        model.to(device)
        for name, data in datasets.items():
            _, val_idx = data.split(k)
            y_true = data.ltc[val_idx]
            y_pred = predict(model, [data.graphs[i] for i in val_idx], transform, device)
            rows.append({"split": k, "selection": selection, "test_dataset": name, "epoch": meta["epoch"],
                         "n": len(val_idx), **regression_metrics(y_true.numpy(), y_pred.numpy()),
                         "mape_paper_scale": paper_scale.mape(data, val_idx, y_pred) if paper_scale else "",
                         "share_nonpositive": float((y_pred <= 0).double().mean())})
            preds += [{"split": k, "selection": selection, "test_dataset": name, "id": data.ids[i],
                       "formula": data.formulas[i], "ltc": float(t), "predicted": float(p)}
                      for i, t, p in zip(val_idx, y_true, y_pred)]
    return rows, preds
