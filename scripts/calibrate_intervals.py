"""Calibrate the intervals and the domain score of a run (or shipped ensemble) by nested cross-validation.

    python scripts/calibrate_intervals.py weights/ltc_fe_togo15_log10_clip10     # the shipped ensemble
    python scripts/calibrate_intervals.py runs/fe_togo15                          # a run of your own

For each of the run's splits k (outer), a whole inner ensemble is trained, with the run's own settings, on
split k's training part only (``--inner-splits`` models, the paper's 80/20 splits of that part); it then
predicts split k's validation part, which none of its models saw. Those held-out predictions (members, so
spread and error are both honest) and their domain scores (against the training part only) are written
to ``<work>/nested.csv``; :func:`paraisite.screening.intervals.fit_calibration` turns them into
``intervals.json`` in the run folder, which scan.py and :func:`paraisite.load_ltc_model` read.

The inner runs go to ``--work`` (default ``runs/nested/<run name>``) and resume like any run: a second call
trains nothing that is done. ``--report FILE`` also writes the coverage figures (docs/results/intervals.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paraisite.data.datasets import dataset_folder, load_dataset, read_labels  # noqa: E402
from paraisite.screening.ensemble import load_ensemble  # noqa: E402
from paraisite.screening.shipped import is_shipped, list_file  # noqa: E402
from paraisite.training.rundir import RunDir  # noqa: E402

# config.json keys that train.py takes back as flags (None: not given)
FLAGS = {"init": "--init", "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
         "clip_grad_norm": "--clip-grad-norm", "select_holdout": "--select-holdout", "loss": "--loss",
         "megnet_lr": "--megnet-lr", "swa_epochs": "--swa-epochs", "freeze_megnet_epochs": "--freeze-megnet-epochs",
         "recipe": "--recipe", "aflow_run": "--aflow-run"}


def inner_folder(work: Path, k: int, ids: list[str], formulas: list[str], ltc: np.ndarray, cif_dir: Path) -> Path:
    """``<work>/outer<k>/data``: labels.csv and cif/ of the materials of split k's training part."""
    data = work / f"outer{k}" / "data"
    (data / "cif").mkdir(parents=True, exist_ok=True)
    rows = ["id,formula,ltc"] + [f"{i},{f},{v!r}" for i, f, v in zip(ids, formulas, ltc.tolist())]
    text = "\n".join(rows) + "\n"
    labels = data / "labels.csv"
    if not labels.is_file() or labels.read_text() != text:
        labels.write_text(text)
    for i in ids:
        target = data / "cif" / f"{i}.cif"
        if not target.is_file():
            shutil.copyfile(cif_dir / f"{i}.cif", target)
    return data


def train_inner(config: dict, data: Path, run_dir: Path, inner_splits: int, processes: str) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--splits", str(inner_splits),
           "--run-dir", str(run_dir), "--processes", processes, "--no-progress"]
    for key, flag in FLAGS.items():
        if config.get(key) is not None:
            cmd += [flag, str(config[key])]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def held_out(ensemble, graphs: list, scorer, embed, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Member predictions ``[n, M]`` and domain scores ``[n]`` of ``graphs``."""
    members, domain = [], []
    for start in range(0, len(graphs), batch_size):
        batch = Batch.from_data_list(graphs[start:start + batch_size])
        with torch.inference_mode():
            members.append(ensemble(batch).numpy())
        domain.append(scorer.score(embed(batch)))
    return np.concatenate(members), np.concatenate(domain)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run folder or a shipped ensemble (its config.json names the settings)")
    p.add_argument("--inner-splits", type=int, default=5, help="models per inner ensemble")
    p.add_argument("--work", default=None, help="folder of the inner runs (default runs/nested/<run name>)")
    p.add_argument("--processes", default="auto", help="train.py's --processes for the inner runs")
    p.add_argument("--train-only", action="store_true", help="train the inner ensembles, fit nothing")
    p.add_argument("--report", default=None, metavar="MD", help="also measure the intervals (nested folds, "
                   "--shifted datasets with the run's own models) and write the figures to this Markdown file")
    p.add_argument("--shifted", default="miyazaki21,aflow_agl", help="with --report: datasets the run never trained on")
    args = p.parse_args()
    run = RunDir(args.run)
    config = run.read_config()
    if config is None:
        sys.exit(f"error: {args.run}: no readable config.json, so the run's settings are unknown")
    work = Path(args.work or ROOT / "runs" / "nested" / Path(args.run).resolve().name)
    name = config["dataset"]
    folder = dataset_folder(name)
    ids, formulas, ltc = read_labels(folder / "labels.csv")
    data = load_dataset(name, cutoff=float(config.get("cutoff", 4.0)), progress=False)
    if data.ids != list(ids):
        sys.exit(f"error: {folder}: the dataset's graphs and labels.csv list different ids")
    outer = sorted(k for k, _ in run.finished_checkpoints("final")) or list(range(1, 10))
    if args.train_only:
        for k in outer:
            train, _ = data.split(k)
            inner = inner_folder(work, k, [ids[i] for i in train], [formulas[i] for i in train], ltc[train],
                                 folder / "cif")
            train_inner(config, inner, work / f"outer{k}" / "run", args.inner_splits, args.processes)
        return
    from paraisite.screening.intervals import (CALIBRATION_FILE, DomainEmbedding, DomainScorer, fit_calibration,
                                               nested_coverage, read_nested, write_nested)
    rows = []
    embed = DomainEmbedding.published()
    for k in outer:
        train, val = data.split(k)
        inner = inner_folder(work, k, [ids[i] for i in train], [formulas[i] for i in train], ltc[train], folder / "cif")
        inner_run = work / f"outer{k}" / "run"
        train_inner(config, inner, inner_run, args.inner_splits, args.processes)
        ensemble = load_ensemble(inner_run, "final")
        trained_on = set((inner / "labels.csv").read_text().split()[1:])
        trained_on = {line.split(",")[0] for line in trained_on}
        leaked = trained_on & {ids[i] for i in val}
        if leaked:
            sys.exit(f"error: outer split {k}: {sorted(leaked)} both trained on and scored")
        scorer = DomainScorer.fit(embed(Batch.from_data_list([data.graphs[i] for i in train])))
        members, domain = held_out(ensemble, [data.graphs[i] for i in val], scorer, embed)
        rows += [(k, ids[i], float(ltc[i]), members[j], float(domain[j])) for j, i in enumerate(val)]
    nested = work / "nested.csv"
    write_nested(nested, rows)
    _, held_ids, labels, members, domain = read_nested(nested)
    calibration = fit_calibration(labels, members, domain, reference=embed(Batch.from_data_list(data.graphs)))
    calibration.coverage = nested_coverage(held_ids, labels, members, domain)
    calibration.save(Path(args.run) / CALIBRATION_FILE)
    if is_shipped(args.run):
        list_file(args.run, CALIBRATION_FILE)
    print(f"{len(rows)} held-out predictions from {len(outer)} inner ensembles -> {Path(args.run) / CALIBRATION_FILE}")
    print(calibration.describe())
    if args.report:
        from interval_report import write_report

        write_report(Path(args.report), Path(args.run), nested, calibration, data,
                     [n for n in args.shifted.split(",") if n], embed, held_out, args.inner_splits)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
