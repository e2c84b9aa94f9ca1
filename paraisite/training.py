"""Training one ParAIsite model per split, resumable epoch by epoch.

The loop, for split k (training part T, validation part V):

    transform = TargetTransform.fit(y[T])
    for epoch in 1..E:
        for each batch B of a shuffled T:    loss = MAPE(transform.inverse(model(B)), y[B]); Adam step
        cosine schedule step (T_max = 1000 epochs, eta_min = 1e-5)
        val = MAPE over V; keep the weights of the lowest val (the paper's selection)

Everything a re-run needs is written after every epoch (``split<k>/state.pt``),
so an interrupted run resumes from its last completed epoch and, on the CPU,
ends with the same weights as an uninterrupted one: the shuffle of epoch e is
drawn from a generator seeded with (seed, k, e), not from global state.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Batch, Data
from tqdm import tqdm

from megnet_pt import MEGNet
from megnet_pt.checkpoint import CheckpointError
from megnet_pt.pretrained import load_pretrained

from .checkpoint import atomic_save, load_model, read_model_checkpoint, save_model
from .datasets import LTCDataset
from .metrics import mape_loss, regression_metrics
from .model import ParAIsite
from .paper_scale import PaperScale
from .report import write_csv
from .transform import TargetTransform

INITS = ("rw", "fe", "fe+af", "rw+af")
PRETRAINED = "MEGNet-MP-2018.6.1-Eform"
T_MAX = 1000
ETA_MIN = 1e-5


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"split{k}"


# --- models -----------------------------------------------------------------------------------

def aflow_checkpoint(aflow_run: Path, k: int) -> Path:
    """The AFLOW-stage model a +af run of split ``k`` starts from: its best epoch (the paper's selection)."""
    return split_dir(aflow_run, k) / "best.pt"


def aflow_stage_done(aflow_run: Path, k: int) -> bool:
    """Whether the AFLOW stage of split ``k`` has finished (``final.pt`` written).

    ``best.pt`` alone proves nothing: it is written whenever the validation
    loss improves, so an interrupted stage has one long before its last epoch.
    """
    return (split_dir(aflow_run, k) / "final.pt").is_file() and aflow_checkpoint(aflow_run, k).is_file()


def check_aflow_checkpoint(path: Path, init: str, k: int, cutoff: float) -> None:
    """A clear error unless ``path`` is the AFLOW-stage model of split ``k`` for ``init``."""
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
        return ParAIsite(load_pretrained(PRETRAINED))
    if config.init in ("fe+af", "rw+af"):
        path = aflow_checkpoint(Path(config.aflow_run), k)
        if not aflow_stage_done(Path(config.aflow_run), k):
            raise CheckpointError(f"{path.parent}: the AFLOW stage of split {k} is unfinished (no final.pt); finish it first")
        check_aflow_checkpoint(path, config.init, k, config.cutoff)
        return load_model(path)[0]
    raise ValueError(f"unknown init {config.init!r}: expected one of {', '.join(INITS)}")


# --- one split --------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: ParAIsite, graphs: list[Data], transform: TargetTransform, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """LTC predictions (W/m/K) for ``graphs``, on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(graphs), batch_size):
        batch = Batch.from_data_list(graphs[i : i + batch_size]).to(device)
        out.append(transform.inverse(model(batch).double()).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _epoch_generator(seed: int, k: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + epoch)


def train_split(
    data: LTCDataset, k: int, config: TrainConfig, run_dir: Path, device: torch.device,
    deadline: float | None = None, progress: bool = True,
) -> bool:
    """Train split ``k`` to ``config.epochs``, resuming from ``split<k>/state.pt``.

    ``best.pt`` is the epoch with the lowest loss on the selection part
    (:meth:`LTCDataset.training_parts`: the validation part, as in the paper,
    or with ``config.select_holdout`` a share of the training part, which is
    then not trained on).

    ``deadline`` (a ``time.monotonic()`` value) ends the call after the first
    epoch that finishes past it, so the protocol can be run in pieces; returns
    True when the split is finished.
    """
    out = split_dir(run_dir, k)
    if (out / "final.pt").is_file():
        return True
    for group in run_dir.glob("ensemble_state_*.pt"):
        if str(k) in group.stem.removeprefix("ensemble_state_").split("-"):
            raise CheckpointError(f"{group}: split {k} was being trained with --ensemble; resume it with --ensemble "
                                  "(or delete the file to start the split again)")
    out.mkdir(parents=True, exist_ok=True)
    train_idx, select_idx, val_idx = data.training_parts(k, config.select_holdout)
    y = data.ltc.to(device)
    # copies: PyG's .to() moves in place, and the dataset's graphs must stay on the CPU for other uses
    graphs = [copy.copy(g).to(device) for g in data.graphs] if device.type != "cpu" else data.graphs
    val_graphs = [graphs[i] for i in val_idx]
    select_graphs = [graphs[i] for i in select_idx]
    transform = TargetTransform.fit(data.ltc[train_idx])

    model = initial_model(config, k).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all ~110 parameter tensors instead of a Python loop (3x faster step on CPU).
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_MAX, eta_min=ETA_MIN)
    state_path = out / "state.pt"
    curve: list[dict[str, float]] = []
    best = {"val": float("inf"), "epoch": 0}
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            curve, best = state["curve"], state["best"]
        except Exception as exc:
            raise CheckpointError(f"{state_path}: cannot resume from it ({type(exc).__name__}: {exc}); delete it to restart split {k}") from exc
    start = len(curve)

    bar = tqdm(range(start + 1, config.epochs + 1), desc=f"{config.init} {data.name} split {k}", unit="epoch",
               initial=start, total=config.epochs, disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=_epoch_generator(config.seed, k, epoch)).numpy()]
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            batch = Batch.from_data_list([graphs[j] for j in idx])
            loss = mape_loss(transform.inverse(model(batch)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            total += loss.item() * len(idx)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss = float(mape_loss(predict(model, val_graphs, transform, device), data.ltc[val_idx]))
        curve.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss, "lr": lr,
                      "seconds": time.perf_counter() - t0})
        select_loss = val_loss
        if config.select_holdout:
            select_loss = float(mape_loss(predict(model, select_graphs, transform, device), data.ltc[select_idx]))
            curve[-1]["select_loss"] = select_loss
        meta = dict(init=config.init, dataset=data.name, split=k, epoch=epoch)
        if select_loss < best["val"]:
            best = {"val": select_loss, "epoch": epoch}
            save_model(model, transform, out / "best.pt", selection="best", **meta)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "curve": curve, "best": best}, state_path)
        write_csv(out / "curve.csv", curve)
        bar.set_postfix(train=f"{curve[-1]['train_loss']:.3f}", val=f"{val_loss:.3f}", best=f"{best['val']:.3f}")
        if deadline is not None and time.monotonic() > deadline and epoch < config.epochs:
            bar.close()
            return False
    bar.close()
    save_model(model, transform, out / "final.pt", selection="final", init=config.init, dataset=data.name, split=k,
               epoch=config.epochs)
    state_path.unlink(missing_ok=True)
    return True


def evaluate_split(
    k: int, run_dir: Path, datasets: dict[str, LTCDataset], device: torch.device, paper_scale: PaperScale | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score the best and final models of split ``k`` on each dataset's validation part of seed ``k``.

    Returns metric rows and per-structure prediction rows. With ``paper_scale``
    the rows also hold ``mape_paper_scale``, the MAPE as upstream computed it
    (:mod:`paraisite.paper_scale`); empty without. ``share_nonpositive`` is the
    share of predictions at or below 0 W/m/K, which no material has: most of
    them there means the model collapsed (:func:`paraisite.report.collapsed`).
    """
    rows, preds = [], []
    for selection in ("best", "final"):
        model, transform, meta = load_model(split_dir(run_dir, k) / f"{selection}.pt")
        model.to(device)
        for name, data in datasets.items():
            _, val_idx = data.split(k)
            graphs = [data.graphs[i] for i in val_idx]
            y_true = data.ltc[val_idx]
            y_pred = predict(model, graphs, transform, device)
            rows.append({"split": k, "selection": selection, "test_dataset": name, "epoch": meta["epoch"],
                         "n": len(val_idx), **regression_metrics(y_true.numpy(), y_pred.numpy()),
                         "mape_paper_scale": paper_scale.mape(data, val_idx, y_pred) if paper_scale else "",
                         "share_nonpositive": float((y_pred <= 0).double().mean())})
            preds += [{"split": k, "selection": selection, "test_dataset": name, "id": data.ids[i],
                       "formula": data.formulas[i], "ltc": float(t), "predicted": float(p)}
                      for i, t, p in zip(val_idx, y_true, y_pred)]
    return rows, preds


def check_run_config(run_dir: Path, config: TrainConfig) -> None:
    """Write ``config.json`` on first use; refuse a folder that holds a run with other settings.

    Processes that start on one new folder at once (one split each) may all
    write it: each through a file of its own, and each then compares its
    settings with the one that landed.
    """
    path = run_dir / "config.json"
    current = config.to_dict()
    if current["aflow_run"]:
        current["aflow_run"] = os.path.normpath(current["aflow_run"])
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"config.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=2) + "\n")
        os.replace(tmp, path)
    stored = json.loads(path.read_text())
    if stored.get("aflow_run"):
        stored["aflow_run"] = os.path.normpath(stored["aflow_run"])
    # aflow_run too: +af models that started from other AFLOW models must not be taken as finished
    diff = {key: (stored.get(key), value) for key, value in current.items() if stored.get(key) != value}
    if diff:
        shown = ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds a run with other settings ({shown}); use another --run-dir or delete it")
