"""LTC datasets as graphs: labels checked, graphs read from an HDF5 cache.

``load_dataset(name)`` gives the graphs and labels of ``togo15``,
``miyazaki21``, ``aflow_agl``, ``mix`` (togo15 + miyazaki21, split per source)
or a folder of your own holding ``labels.csv`` (``id,formula,ltc``) and
``cif/<id>.cif``. Inputs come from ``$PARAISITE_HOME/data`` (fetched on first
use when missing); graph caches are built on first use into ``data/`` in the
current folder and reused afterwards.
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from megnet_pt import paths as megnet_paths
from megnet_pt.cache import ensure_cache
from megnet_pt.structures import plain_id

from . import paths
from .splits import holdout_parts, split_parts

SOURCES = ("togo15", "miyazaki21", "aflow_agl")
COMPOSITES = {"mix": ("togo15", "miyazaki21")}
NAMES = SOURCES + tuple(COMPOSITES)


class DatasetError(ValueError):
    """A dataset name, folder or label file is unusable (the message says which and why)."""


@dataclass
class LTCDataset:
    """Graphs and LTC labels (W/m/K) of one dataset, possibly made of several sources."""

    name: str
    ids: list[str]
    formulas: list[str]
    ltc: torch.Tensor  # float32 [n]
    graphs: list[Data]
    parts: list[tuple[str, int]] = field(default_factory=list)  # (source name, size), laid end to end
    sources_sha256: str = ""  # of labels.csv and every structure file it was read from (the graph cache's record)

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices of split ``seed`` (each source split on its own)."""
        return split_parts([n for _, n in self.parts], seed)

    def training_parts(self, seed: int, holdout: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fit, select, validation) of split ``seed``: the epoch is chosen on ``select``.

        Without ``holdout`` (the paper's protocol) fit is the training part and
        select is the validation part itself; with it, a share of the training
        part (:func:`paraisite.data.splits.holdout_parts`).
        """
        if holdout is None:
            train, val = self.split(seed)
            return train, val, val
        return holdout_parts([n for _, n in self.parts], seed, holdout)


def dataset_folder(name: str) -> Path:
    """The folder of a named source (fetched when missing) or a user folder with labels.csv."""
    if name in SOURCES:
        folder = paths.data_dir(name)
        if not (folder / "labels.csv").is_file():
            from .sources import ensure_dataset

            folder = ensure_dataset(name)
        return folder
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "labels.csv").is_file():
            raise DatasetError(f"{folder}: a dataset folder needs labels.csv (id,formula,ltc) and cif/<id>.cif")
        return folder
    raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)} or a folder holding labels.csv and cif/")


def read_labels(labels_csv: Path) -> tuple[list[str], list[str], np.ndarray]:
    """ids, formulas and LTC from ``labels.csv``; NaN, infinite, zero or negative labels are errors.

    An id names ``cif/<id>.cif``: one with a path separator, ``..``, or white
    space around it is an error naming its line. A byte-order mark (a file
    saved by Excel) is read as such.
    """
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"id", "ltc"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{labels_csv}: missing column(s) {', '.join(sorted(missing))} (expected id,formula,ltc)")
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{labels_csv}: no rows")
    odd = [f"line {line} ({row['id']!r})" for line, row in enumerate(rows, start=2) if not plain_id(row["id"] or "")]
    if odd:
        shown = ", ".join(odd[:10]) + (f" and {len(odd) - 10} more" if len(odd) > 10 else "")
        raise DatasetError(f"{labels_csv}: {len(odd)} id(s) are not plain file names (an id names cif/<id>.cif: no "
                           f"path separators, no '..', no white space around it, not empty): {shown}")
    bad, values = [], []
    for line, row in enumerate(rows, start=2):
        try:
            v = float(row["ltc"])
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or v <= 0:
            bad.append(f"line {line} ({row['id']}: {row['ltc']!r})")
        values.append(v)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(
            f"{labels_csv}: {len(bad)} label(s) are not finite positive numbers, which MAPE and log10(y+1) need: {shown}"
        )
    ids = [r["id"] for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dupes:
        raise DatasetError(f"{labels_csv}: duplicate ids {', '.join(dupes[:10])}")
    return ids, [r.get("formula", "") for r in rows], np.asarray(values, dtype=np.float64)


def load_source(name: str, cutoff: float = 4.0, cache_dir: str | Path | None = None, progress: bool = True) -> LTCDataset:
    folder = dataset_folder(name)
    ids, formulas, ltc = read_labels(folder / "labels.csv")
    label = name if name in SOURCES else Path(name).resolve().name
    # two folders of one name (a/data, b/data) must not share a cache: a user folder's is named after its path too
    stem = label if name in SOURCES else f"{label}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]}"
    cache_path = Path(cache_dir or megnet_paths.local_data_dir()) / f"{stem}_cutoff{cutoff:g}.h5"
    cache = ensure_cache([folder], cache_path, cutoff=cutoff, progress=progress)
    position = {i: k for k, i in enumerate(cache.ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        failures = dict(getattr(cache, "failures", []) or [])
        shown = "; ".join(f"{i}: {failures.get(i, 'not in cache')}" for i in missing[:10])
        raise DatasetError(f"{folder}: {len(missing)} structure(s) could not be turned into graphs: {shown}")
    graphs = [cache[position[i]] for i in ids]
    return LTCDataset(label, ids, formulas, torch.tensor(ltc, dtype=torch.float32), graphs, [(label, len(ids))],
                      cache.sources_sha256)


def load_dataset(name: str, cutoff: float = 4.0, cache_dir: str | Path | None = None, progress: bool = True) -> LTCDataset:
    """A named dataset, ``mix``, or a user folder (see the module docstring)."""
    if name in COMPOSITES:
        parts = [load_source(p, cutoff, cache_dir, progress) for p in COMPOSITES[name]]
        return LTCDataset(
            name,
            [i for p in parts for i in p.ids],
            [f for p in parts for f in p.formulas],
            torch.cat([p.ltc for p in parts]),
            [g for p in parts for g in p.graphs],
            [(p.name, len(p)) for p in parts],
            hashlib.sha256("".join(p.sources_sha256 for p in parts).encode()).hexdigest(),
        )
    return load_source(name, cutoff, cache_dir, progress)
