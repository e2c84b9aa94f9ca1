"""Screening: the LTC of every structure of a graph cache by the nine models of a run.

As in the paper's screening of the ~34k stable Materials Project materials
(section 3.2, supplement Table S6), each material gets the predictions
:math:`y_1..y_M` of the M = 9 split models and

    ltc_mean                  m = (1/M) sum_k y_k                      (the paper's mTC)
    ltc_std                   s = sqrt( sum_k (y_k - m)^2 / (M - 1) )  (sample std, as pandas upstream)
    ltc_std_over_mean         s / m
    ltc_max                   max_k y_k
    ltc_max_x_std_over_mean   max_k y_k * s / m

and, where the models carry a calibration (``intervals.json``: :mod:`paraisite.screening.intervals`),
``ltc_lo`` and ``ltc_hi``, the interval at the stated level (default 90 %), and ``domain``, how far
the structure is from the training structures (about 1 inside them; flagged above the calibration's
threshold).

Output CSV columns, one row per input structure:

    id, formula, ltc_split<k> (one per model), the five statistics above, [ltc_lo, ltc_hi, domain],
    n_sites, volume (Å^3), density (g/cm^3), atomic_density (atoms/Å^3), n_elements,
    [eform_ev_per_atom: the published MEGNet formation energy, with --with-eform],
    [band_gap_pbe_ev: the published multi-fidelity MEGNet's PBE band gap, with --with-bandgap],
    input_<field> for every per-structure field of the cache (its labels: e.g. the
    Materials Project's band_gap, is_stable as 1/0; empty where missing),
    warning

``warning`` is empty, or lists (separated by "; "): atoms without a neighbour
within the cutoff (``megnet_pt.predict.isolated_warning``), elements absent from
the training structures, more than ``SIZE_FACTOR`` times as many atoms as the
largest training cell, a domain score above the calibration's threshold, predictions at or below 0 W/m/K (which no material has: a
collapsed model; such rows are left out of the summary's rankings), and, starting
with ``error:``, why a structure has no prediction (it could not be turned into a
graph, or the models failed on it).

Graphs are read from the cache a block at a time and rows are streamed to
part files (:mod:`paraisite.screening.files`), so an interrupted scan resumes where
it stopped; under torchrun each process takes a contiguous share of the ids
left. The summary (top table, plots, correlations): :mod:`paraisite.screening.summary`.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch

from megnet_pt.cache import GraphCache
from megnet_pt.elements import ELEMENTS
from megnet_pt.graph import isolated_atoms
from megnet_pt.interrupt import check_interrupted
from megnet_pt.predict import isolated_warning

from .ensemble import Ensemble
from .intervals import Calibration, DomainEmbedding
from ..training.rundir import RunDir
from .files import ScanPaths, append_rows, merge_parts, prepare_parts

STAT_COLUMNS = ["ltc_mean", "ltc_std", "ltc_std_over_mean", "ltc_max", "ltc_max_x_std_over_mean"]
INTERVAL_COLUMNS = ["ltc_lo", "ltc_hi", "domain"]  # with a calibration (paraisite.screening.intervals)
DESCRIPTOR_COLUMNS = ["n_sites", "volume", "density", "atomic_density", "n_elements"]
INPUT_PREFIX = "input_"  # the cache's own per-structure fields, as given
SIZE_FACTOR = 2.0  # "far beyond the training range": more than twice the atoms of the largest training cell
AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660


# --- columns and per-structure quantities ---------------------------------------------------------

def columns(splits: Sequence[int], properties: Sequence[str] = (), fields: Sequence[str] = (),
            with_intervals: bool = False) -> list[str]:
    """The scan's CSV header; ``properties``: the published-MEGNet columns asked for (:mod:`.properties`)."""
    return (["id", "formula"] + [f"ltc_split{k}" for k in splits] + STAT_COLUMNS
            + (INTERVAL_COLUMNS if with_intervals else []) + DESCRIPTOR_COLUMNS
            + list(properties) + [INPUT_PREFIX + f for f in fields] + ["warning"])


def ensemble_statistics(pred: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's columns from predictions ``[B, M]`` (see the module docstring)."""
    m = pred.mean(axis=1)
    s = pred.std(axis=1, ddof=1) if pred.shape[1] > 1 else np.full(len(pred), math.nan)
    top = pred.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = s / m
    return {"ltc_mean": m, "ltc_std": s, "ltc_std_over_mean": rel, "ltc_max": top, "ltc_max_x_std_over_mean": top * rel}


_MASSES: torch.Tensor | None = None


def atomic_masses() -> torch.Tensor:
    """Atomic mass (amu) of every element of the vocabulary, float64."""
    global _MASSES
    if _MASSES is None:
        from pymatgen.core.periodic_table import Element

        _MASSES = torch.tensor([float(Element(s).atomic_mass) for s in ELEMENTS], dtype=torch.float64)
    return _MASSES


def descriptors(batch: Batch) -> dict[str, np.ndarray]:
    r"""Simple descriptors of each crystal of a (CPU) batch, from its cell and atoms.

    .. math::
        V = |\det L|,\quad \rho = \frac{\sum_i m_i}{V} \cdot 1.6605\ \mathrm{g\,cm^{-3}/(amu\,Å^{-3})},\quad
        n/V,\quad \#\{\text{distinct elements}\}
    """
    b = batch.num_graphs
    graph = batch.batch
    volume = torch.linalg.det(batch.lattice.double()).abs()
    n_sites = torch.bincount(graph, minlength=b)
    mass = torch.zeros(b, dtype=torch.float64).index_add_(0, graph, atomic_masses()[batch.node_type])
    pairs = torch.unique(graph * len(ELEMENTS) + batch.node_type)
    n_elements = torch.bincount(pairs // len(ELEMENTS), minlength=b)
    return {
        "n_sites": n_sites.numpy(),
        "volume": volume.numpy(),
        "density": (mass / volume * AMU_PER_A3_TO_G_PER_CM3).numpy(),
        "atomic_density": (n_sites / volume).numpy(),
        "n_elements": n_elements.numpy(),
    }


@dataclass
class TrainingDomain:
    """The elements and cell sizes the models were trained on."""

    elements: frozenset[int]
    max_atoms: int
    source: str

    def describe(self) -> str:
        return (f"{len(self.elements)} elements and cells of up to {self.max_atoms} atoms in {self.source}; "
                f"flagged: other elements, or more than {SIZE_FACTOR:g} x {self.max_atoms} atoms")


def training_domain(run_dir: Path, init: str, dataset: str, cutoff: float) -> tuple[TrainingDomain | None, str]:
    """The domain of the run's training data (its dataset, and AFLOW AGL for the ``+af`` inits), or a note why not."""
    dataset = (RunDir(run_dir).read_config() or {}).get("dataset", dataset)
    names = [dataset] + (["aflow_agl"] if init.endswith("+af") else [])
    try:
        from ..data.datasets import load_dataset

        elements: set[int] = set()
        max_atoms = 0
        for name in names:
            data = load_dataset(name, cutoff=cutoff, progress=False)
            for g in data.graphs:
                elements.update(g.node_type.tolist())
                max_atoms = max(max_atoms, int(g.num_nodes))
    except Exception as exc:  # no data at hand: the other columns do not need it
        return None, f"outside-training-data warnings skipped: cannot load {' + '.join(names)} ({exc})"
    domain = TrainingDomain(frozenset(elements), max_atoms, " + ".join(names))
    return domain, f"training domain: {domain.describe()}"


def batch_warnings(batch: Batch, cutoff: float, domain: TrainingDomain | None) -> list[str]:
    """The ``warning`` text of each structure of a (CPU) batch (empty when nothing is wrong)."""
    b = batch.num_graphs
    lonely = isolated_atoms(batch).tolist()
    n_sites = torch.bincount(batch.batch, minlength=b).tolist()
    notes: list[list[str]] = [[] for _ in range(b)]
    for i in range(b):
        if lonely[i]:
            notes[i].append(isolated_warning(lonely[i], n_sites[i], cutoff))
    if domain is not None:
        limit = SIZE_FACTOR * domain.max_atoms
        ptr = batch.ptr.tolist()
        for i in range(b):
            unseen = sorted(set(batch.node_type[ptr[i] : ptr[i + 1]].tolist()) - domain.elements)
            if unseen:
                notes[i].append(f"element(s) {', '.join(ELEMENTS[t] for t in unseen)} not in the training data")
            if n_sites[i] > limit:
                notes[i].append(f"{n_sites[i]} atoms, far beyond the training cells (at most {domain.max_atoms})")
    return ["; ".join(n) for n in notes]


def impossible_warnings(pred: np.ndarray) -> list[str]:
    """A warning for each row of ``[B, M]`` predictions in which a model predicts <= 0 W/m/K."""
    bad = (pred <= 0).sum(axis=1)
    return [f"{n} of {pred.shape[1]} model(s) predict <= 0 W/m/K (impossible: a collapsed model; not ranked)" if n else ""
            for n in bad.tolist()]


def _number(value: float, digits: int = 7) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else "nan"


def _field(value: float) -> str:
    """An input's own value as given: whole numbers (and booleans, 1/0) without a decimal point, others exactly."""
    if not math.isfinite(value):
        return ""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def format_rows(
    ids: Sequence[str], formulas: Sequence[str], pred: np.ndarray | None, desc: dict[str, np.ndarray] | None,
    props: dict[str, np.ndarray] | None, warnings: Sequence[str], property_names: Sequence[str], n_models: int,
    fields: np.ndarray | None = None, bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    with_intervals: bool = False,
) -> list[list[str]]:
    """CSV rows; ``pred`` None (or a NaN row) leaves the prediction columns empty, a NaN field its cell.

    ``props``: the value of each of ``property_names`` per row (None: empty cells); ``bounds``: (ltc_lo, ltc_hi,
    domain) of each row, with ``with_intervals``."""
    stats = ensemble_statistics(pred) if pred is not None else None
    rows = []
    for i, (sid, formula) in enumerate(zip(ids, formulas)):
        row = [sid, formula]
        if pred is not None and np.isfinite(pred[i]).all():
            row += [_number(v) for v in pred[i]] + [_number(float(stats[c][i])) for c in STAT_COLUMNS]
            if with_intervals:
                row += [_number(float(b[i])) for b in bounds]
        else:
            row += [""] * (n_models + len(STAT_COLUMNS) + (len(INTERVAL_COLUMNS) if with_intervals else 0))
        if desc is not None:
            row += [str(int(desc["n_sites"][i])), _number(float(desc["volume"][i])), _number(float(desc["density"][i])),
                    _number(float(desc["atomic_density"][i])), str(int(desc["n_elements"][i]))]
        else:
            row += [""] * len(DESCRIPTOR_COLUMNS)
        row += [_number(float(props[name][i])) if props is not None else "" for name in property_names]
        if fields is not None:
            row += [_field(float(v)) for v in fields[i]]
        row.append(" ".join(warnings[i].split()))
        rows.append(row)
    return rows



# --- prediction ----------------------------------------------------------------------------------

@dataclass
class ScanReport:
    """What one process did."""

    predicted: int = 0
    failed: int = 0
    skipped: int = 0  # already done by an earlier run
    seconds: float = 0.0


def predict_batch(
    batch: Batch, ensemble: Ensemble, device: torch.device, properties: dict[str, torch.nn.Module] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Predictions ``[B, M]`` (NaN rows where the models failed), the ``properties`` columns (formation energy,
    band gap: :mod:`.properties`), and error notes per structure.

    A batch that fails as a whole is retried one structure at a time, so that
    one bad structure (or one too large for the GPU) costs only its own row.
    """
    b = batch.num_graphs
    errors = [""] * b
    properties = properties or {}
    try:
        on_device = copy.copy(batch).to(device)  # PyG's .to() moves in place: the caller's batch stays on the CPU
        pred = ensemble(on_device).cpu().numpy()
        props = {name: model(on_device).cpu().numpy() for name, model in properties.items()}
    except Exception as exc:
        pred = np.full((b, len(ensemble)), math.nan)
        props = {name: np.full(b, math.nan) for name in properties}
        if b == 1:
            errors[0] = f"error: the models failed on this structure ({type(exc).__name__}: {str(exc).strip()[:200]})"
        else:
            for i in range(b):
                p, one, err = predict_batch(Batch.from_data_list([batch.get_example(i)]), ensemble, device, properties)
                pred[i], errors[i] = p[0], err[0]
                for name in props:
                    props[name][i] = one[name][0]
    splits = ensemble.info.splits if ensemble.info else list(range(1, len(ensemble) + 1))
    for i in np.flatnonzero(~np.isfinite(pred).all(axis=1)):
        if not errors[i]:
            which = [str(splits[k]) for k in np.flatnonzero(~np.isfinite(pred[i]))]
            errors[i] = f"error: non-finite prediction from the model(s) of split(s) {','.join(which)}"
    return pred, props, errors


def shard(positions: np.ndarray, rank: int, world: int) -> np.ndarray:
    """A contiguous share of ``positions`` for each process (sizes differ by at most one)."""
    bounds = np.linspace(0, len(positions), world + 1).round().astype(int)
    return positions[bounds[rank] : bounds[rank + 1]]


@dataclass
class ScanSettings:
    """How to carry out a scan; none of this changes its rows."""

    batch_size: int = 32
    device: torch.device | str = "cpu"
    properties: dict[str, torch.nn.Module] | None = None  # published-MEGNet columns (.properties.property_models)
    domain: TrainingDomain | None = None  # adds the outside-the-training-data warnings
    intervals: Calibration | None = None  # adds ltc_lo, ltc_hi and domain
    level: float | None = None  # of the intervals (None: the calibration's own)
    rank: int = 0
    world: int = 1
    progress: bool = True
    sync: Any = None  # the torch.distributed module under torchrun, None for one process


def run_scan(cache: GraphCache, ensemble: Ensemble, out: str | Path, settings: ScanSettings | None = None) -> ScanReport:
    """Predict every structure of ``cache`` that has no row yet; merge into ``out`` (see the module docstring).

    Under torchrun rank 0 prepares the parts and decides the shares, every
    rank writes its own part, rank 0 merges. Returns this process's report.
    """
    settings = settings or ScanSettings()
    batch_size, properties, domain = settings.batch_size, settings.properties or {}, settings.domain
    rank, world, progress, sync = settings.rank, settings.world, settings.progress, settings.sync
    start = time.perf_counter()
    device = torch.device(settings.device)
    paths = ScanPaths(Path(out))
    field_names = cache.label_names if cache.labels is not None else []
    calibration = settings.intervals
    with_intervals = calibration is not None
    header = columns(ensemble.info.splits if ensemble.info else range(1, len(ensemble) + 1), list(properties),
                     field_names, with_intervals)
    failures = cache.failures
    order = {sid: k for k, sid in enumerate(cache.ids)}
    order.update({sid: len(cache) + k for k, (sid, _) in enumerate(failures)})
    report = ScanReport()

    # Rank 0 checks what is there and decides who does what; the others wait for the plan.
    plan: list[Any] = [None]
    if rank == 0:
        plan[0] = prepare_parts(paths, header, order, ensemble, cache,
                                calibration.describe(settings.level) if with_intervals else None)
    if sync is not None:
        sync.broadcast_object_list(plan, src=0)
    if isinstance(plan[0], Exception):
        raise plan[0]
    todo, failed_todo = plan[0]
    mine = shard(np.asarray(todo, dtype=np.int64), rank, world)
    report.skipped = len(order) - len(todo) - len(failed_todo)

    if rank == 0 and failed_todo:
        rows = format_rows([failures[k][0] for k in failed_todo], ["" for _ in failed_todo], None, None, None,
                           [f"error: could not be turned into a graph: {failures[k][1]}" for k in failed_todo],
                           list(properties), len(ensemble), np.full((len(failed_todo), len(field_names)), math.nan),
                           with_intervals=with_intervals)
        append_rows(paths.part(0), rows, header)
        report.failed += len(rows)

    ensemble.to(device).eval()
    for model in properties.values():
        model.to(device).eval()
    from tqdm import tqdm

    embed = DomainEmbedding.published().to(device) if with_intervals else None
    bar = tqdm(total=len(todo), unit="structure", desc="LTC", disable=not progress or rank != 0 or len(todo) == 0,
               smoothing=0.05)
    if len(mine):
        for batch in cache.iter_batches(batch_size, indices=mine):
            check_interrupted()
            pred, props, errors = predict_batch(batch, ensemble, device, properties)
            warnings = ["; ".join(w for w in pair if w) for pair in
                        zip(batch_warnings(batch, cache.cutoff, domain), impossible_warnings(pred))]
            bounds = None
            if with_intervals:
                domain_score = calibration.domain.score(embed(copy.copy(batch)))
                bounds = (*calibration.interval(pred, domain_score, settings.level), domain_score)
                warnings = ["; ".join(w for w in pair if w) for pair in zip(warnings, calibration.warnings(domain_score))]
            notes = [e + ("; " + w if w else "") if e else w for e, w in zip(errors, warnings)]
            fields = cache.labels[[order[sid] for sid in batch.id]] if field_names else None
            rows = format_rows(batch.id, batch.formula, pred, descriptors(batch), props, notes, list(properties),
                               len(ensemble), fields, bounds, with_intervals)
            append_rows(paths.part(rank), rows, header)
            n_bad = sum(1 for e in errors if e)
            report.failed += n_bad
            report.predicted += batch.num_graphs - n_bad
            bar.update(batch.num_graphs * world)
    bar.close()
    report.seconds = time.perf_counter() - start

    if sync is not None:
        sync.barrier()
    if rank == 0 and paths.parts.is_dir():
        merge_parts(paths, header, order)
        os.replace(paths.running_meta, paths.meta)
        shutil.rmtree(paths.parts)
    return report
