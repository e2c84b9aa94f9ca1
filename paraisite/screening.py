"""Screening: the LTC of every structure of a graph cache by the nine models of a run.

As in the paper's screening of the ~34k stable Materials Project materials
(section 3.2, supplement Table S6), each material gets the predictions
:math:`y_1..y_M` of the M = 9 split models and

    ltc_mean                  m = (1/M) sum_k y_k                      (the paper's mTC)
    ltc_std                   s = sqrt( sum_k (y_k - m)^2 / (M - 1) )  (sample std, as pandas upstream)
    ltc_std_over_mean         s / m
    ltc_max                   max_k y_k
    ltc_max_x_std_over_mean   max_k y_k * s / m

Output CSV columns, one row per input structure:

    id, formula, ltc_split<k> (one per model), the five statistics above,
    n_sites, volume (Å^3), density (g/cm^3), atomic_density (atoms/Å^3), n_elements,
    [eform_ev_per_atom: the published MEGNet formation energy, with --with-eform],
    warning

``warning`` is empty, or lists (separated by "; "): atoms without a neighbour
within the cutoff (``megnet_pt.predict.graph_warning``), elements absent from
the training structures, more than ``SIZE_FACTOR`` times as many atoms as the
largest training cell, and, starting with ``error:``, why a structure has no
prediction (it could not be turned into a graph, or the models failed on it).

Streaming and resuming: rows are appended to ``<out>.parts/rank<r>.csv`` and
flushed after every batch; graphs are read from the cache a block at a time.
A re-run first repairs the part files (a row cut by a kill is dropped), then
predicts only the ids that have no row yet; under torchrun each process takes
a contiguous share of those. At the end the parts are merged into ``<out>`` in
cache order (structures that failed to convert last), every input id exactly
once. ``<out>.parts/scan.json`` (then ``<base>.scan.json``) records the
models, the cache and the columns, so that a re-run with other settings
refuses to mix rows.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import heapq
import io
import json
import math
import os
import shutil
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch

from megnet_pt.cache import GraphCache
from megnet_pt.elements import ELEMENTS
from megnet_pt.predict import graph_warning

from .ensemble import Ensemble, StackedEform

FORMAT = "paraisite scan"
VERSION = 1
STAT_COLUMNS = ["ltc_mean", "ltc_std", "ltc_std_over_mean", "ltc_max", "ltc_max_x_std_over_mean"]
DESCRIPTOR_COLUMNS = ["n_sites", "volume", "density", "atomic_density", "n_elements"]
EFORM_COLUMN = "eform_ev_per_atom"
SIZE_FACTOR = 2.0  # "far beyond the training range": more than twice the atoms of the largest training cell
AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660


# --- columns and per-structure quantities ---------------------------------------------------------

def columns(splits: Sequence[int], with_eform: bool) -> list[str]:
    return (["id", "formula"] + [f"ltc_split{k}" for k in splits] + STAT_COLUMNS + DESCRIPTOR_COLUMNS
            + ([EFORM_COLUMN] if with_eform else []) + ["warning"])


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
    config = Path(run_dir) / "config.json"
    if config.is_file():
        dataset = json.loads(config.read_text()).get("dataset", dataset)
    names = [dataset] + (["aflow_agl"] if init.endswith("+af") else [])
    try:
        from .datasets import load_dataset

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
    has_neighbor = torch.zeros(batch.num_nodes, dtype=torch.bool)
    has_neighbor[batch.edge_index[0]] = True
    lonely = torch.bincount(batch.batch[~has_neighbor], minlength=b).tolist()
    notes: list[list[str]] = [[] for _ in range(b)]
    for i in range(b):
        if lonely[i]:
            notes[i].append(graph_warning(batch.get_example(i), cutoff))
    if domain is not None:
        n_sites = torch.bincount(batch.batch, minlength=b).tolist()
        limit = SIZE_FACTOR * domain.max_atoms
        ptr = batch.ptr.tolist()
        for i in range(b):
            unseen = sorted(set(batch.node_type[ptr[i] : ptr[i + 1]].tolist()) - domain.elements)
            if unseen:
                notes[i].append(f"element(s) {', '.join(ELEMENTS[t] for t in unseen)} not in the training data")
            if n_sites[i] > limit:
                notes[i].append(f"{n_sites[i]} atoms, far beyond the training cells (at most {domain.max_atoms})")
    return ["; ".join(n) for n in notes]


def _number(value: float, digits: int = 7) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else "nan"


def format_rows(
    ids: Sequence[str], formulas: Sequence[str], pred: np.ndarray | None, desc: dict[str, np.ndarray] | None,
    eform: np.ndarray | None, warnings: Sequence[str], with_eform: bool, n_models: int,
) -> list[list[str]]:
    """CSV rows; ``pred`` None (or a NaN row) leaves the prediction columns empty."""
    stats = ensemble_statistics(pred) if pred is not None else None
    rows = []
    for i, (sid, formula) in enumerate(zip(ids, formulas)):
        row = [sid, formula]
        if pred is not None and np.isfinite(pred[i]).all():
            row += [_number(v) for v in pred[i]] + [_number(float(stats[c][i])) for c in STAT_COLUMNS]
        else:
            row += [""] * (n_models + len(STAT_COLUMNS))
        if desc is not None:
            row += [str(int(desc["n_sites"][i])), _number(float(desc["volume"][i])), _number(float(desc["density"][i])),
                    _number(float(desc["atomic_density"][i])), str(int(desc["n_elements"][i]))]
        else:
            row += [""] * len(DESCRIPTOR_COLUMNS)
        if with_eform:
            row.append(_number(float(eform[i])) if eform is not None else "")
        row.append(" ".join(warnings[i].split()))
        rows.append(row)
    return rows


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# --- files ---------------------------------------------------------------------------------------

@dataclass
class ScanPaths:
    """Where a scan writes: the CSV, its parts while running, and the summary files beside it."""

    out: Path

    @property
    def parts(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    def part(self, rank: int) -> Path:
        return self.parts / f"rank{rank}.csv"

    @property
    def base(self) -> Path:
        return self.out.with_suffix("") if self.out.suffix else self.out

    def sidecar(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    @property
    def running_meta(self) -> Path:
        return self.parts / "scan.json"

    @property
    def meta(self) -> Path:
        return self.sidecar(".scan.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_meta(ensemble: Ensemble, cache: GraphCache, header: list[str]) -> dict[str, Any]:
    """What must agree between a scan and the one that resumes it."""
    info = ensemble.info
    return {
        "format": FORMAT,
        "version": VERSION,
        "models": str(info.run_dir.resolve()) if info else None,
        "selection": info.selection if info else None,
        "checkpoints": ({str(k): _sha256(info.run_dir / f"split{k}" / f"{info.selection}.pt") for k in info.splits}
                        if info else None),
        "cache_ids_sha256": cache.attrs.get("ids_sha256"),
        "cache_sources_sha256": cache.attrs.get("sources_sha256"),
        "cutoff": cache.cutoff,
        "columns": header,
    }


class ScanError(ValueError):
    """An output that cannot be written or resumed (the message says which file and why)."""


def _check_meta(stored: dict[str, Any], current: dict[str, Any], where: Path, out: Path) -> None:
    differ = [k for k in ("format", "version", "checkpoints", "cache_ids_sha256", "cutoff", "columns")
              if stored.get(k) != current.get(k)]
    if differ:
        what = {"checkpoints": "other models (--models/--selection, or retrained)", "cache_ids_sha256": "another input",
                "columns": "other columns (--with-eform?)", "cutoff": "another cutoff"}
        reasons = ", ".join(what.get(k, k) for k in differ)
        raise ScanError(f"{out}: a scan with {reasons} is recorded in {where}; use another --out, or delete "
                        f"{out} and its .parts/.scan.json to start over")


def repair_parts(paths: ScanPaths, header: list[str], known: dict[str, int]) -> int:
    """Make every part file hold only whole, valid, distinct rows; returns the number of rows kept.

    A process killed while writing leaves its last line cut short; a row
    whose id is unknown, whose field count is wrong or that repeats an id of
    an earlier row is dropped too. Files that change are rewritten atomically.
    """
    seen: set[str] = set()
    for part in sorted(paths.parts.glob("rank*.csv")):
        with open(part, newline="") as f:
            text = f.read()
        keep_text = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        lines = keep_text.splitlines(keepends=True)
        kept, changed = [], keep_text != text
        if not lines or next(csv.reader([lines[0]])) != header:
            raise ScanError(f"{part}: not a part of this scan (its header differs); delete {paths.parts} to start over")
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            if len(fields) != len(header) or fields[0] not in known or fields[0] in seen:
                changed = True
                continue
            seen.add(fields[0])
            kept.append(line)
        if changed:
            tmp = part.with_name(part.name + ".tmp")
            tmp.write_text(lines[0] + "".join(kept))
            os.replace(tmp, part)
    return len(seen)


def done_ids(paths: ScanPaths) -> set[str]:
    ids: set[str] = set()
    for part in sorted(paths.parts.glob("rank*.csv")):
        with open(part, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            ids.update(row[0] for row in reader if row)
    return ids


def merge_parts(paths: ScanPaths, header: list[str], order: dict[str, int]) -> int:
    """Write ``out`` from the parts, rows in input order (``order[id]``); every id must appear exactly once."""
    positions, files, offsets = [], [], []
    parts = sorted(paths.parts.glob("rank*.csv"))
    for n, part in enumerate(parts):
        with open(part, "rb") as f:
            f.readline()
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    break
                sid = next(csv.reader([line.decode()]))[0]
                positions.append(order[sid])
                files.append(n)
                offsets.append(offset)
    positions_a = np.asarray(positions, dtype=np.int64)
    sort = np.argsort(positions_a, kind="stable")
    if len(positions_a) != len(order) or (len(sort) > 1 and (np.diff(positions_a[sort]) == 0).any()):
        have = set(positions)
        missing = [sid for sid, p in order.items() if p not in have]
        raise ScanError(f"{paths.parts}: {len(missing)} id(s) have no row (e.g. {', '.join(missing[:5])}) or some "
                        "repeat; re-run the same command to complete the scan")
    tmp = paths.out.with_name(paths.out.name + ".tmp")
    handles = [open(p, "rb") for p in parts]
    try:
        with open(tmp, "wb") as out:
            out.write(csv_text([header]).encode())
            for k in sort:
                f = handles[files[k]]
                f.seek(offsets[k])
                out.write(f.readline())
    finally:
        for f in handles:
            f.close()
    os.replace(tmp, paths.out)
    return len(sort)


# --- prediction ----------------------------------------------------------------------------------

@dataclass
class ScanReport:
    """What one process did."""

    predicted: int = 0
    failed: int = 0
    skipped: int = 0  # already done by an earlier run
    seconds: float = 0.0


RUN_LOG_FIELDS = ["started_utc", "processes", "device", "structures", "seconds", "structures_per_s", "already_done"]


def record_run(out: str | Path, row: dict[str, Any]) -> list[dict[str, str]]:
    """Log a run that predicted something in ``<base>.runs.csv`` and return the log.

    A run that found nothing already done predicted the whole file, so it
    starts the log anew; a resumed run adds its row. A re-run with nothing left
    to do logs nothing, so the summary keeps the throughput of the runs that
    did the work.
    """
    path = ScanPaths(Path(out)).sidecar(".runs.csv")
    if int(row["structures"]) > 0:
        fresh = int(row["already_done"]) == 0 or not path.is_file()
        with open(path, "w" if fresh else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RUN_LOG_FIELDS)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predict_batch(
    batch: Batch, ensemble: Ensemble, device: torch.device, eform_model: StackedEform | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Predictions ``[B, M]`` (NaN rows where the models failed), formation energies, and error notes per structure.

    A batch that fails as a whole is retried one structure at a time, so that
    one bad structure (or one too large for the GPU) costs only its own row.
    """
    b = batch.num_graphs
    errors = [""] * b
    try:
        on_device = copy.copy(batch).to(device)  # PyG's .to() moves in place: the caller's batch stays on the CPU
        pred = ensemble(on_device).cpu().numpy()
        eform = eform_model(on_device).cpu().numpy() if eform_model is not None else None
    except Exception as exc:
        pred = np.full((b, len(ensemble)), math.nan)
        eform = np.full(b, math.nan) if eform_model is not None else None
        if b == 1:
            errors[0] = f"error: the models failed on this structure ({type(exc).__name__}: {str(exc).strip()[:200]})"
        else:
            for i in range(b):
                p, e, err = predict_batch(Batch.from_data_list([batch.get_example(i)]), ensemble, device, eform_model)
                pred[i], errors[i] = p[0], err[0]
                if eform is not None:
                    eform[i] = e[0]
    splits = ensemble.info.splits if ensemble.info else list(range(1, len(ensemble) + 1))
    for i in np.flatnonzero(~np.isfinite(pred).all(axis=1)):
        if not errors[i]:
            which = [str(splits[k]) for k in np.flatnonzero(~np.isfinite(pred[i]))]
            errors[i] = f"error: non-finite prediction from the model(s) of split(s) {','.join(which)}"
    return pred, eform, errors


def shard(positions: np.ndarray, rank: int, world: int) -> np.ndarray:
    """A contiguous share of ``positions`` for each process (sizes differ by at most one)."""
    bounds = np.linspace(0, len(positions), world + 1).round().astype(int)
    return positions[bounds[rank] : bounds[rank + 1]]


def _append(path: Path, rows: list[list[str]], header: list[str]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        f.write(csv_text(([header] if new else []) + rows))
        f.flush()


def run_scan(
    cache: GraphCache,
    ensemble: Ensemble,
    out: str | Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    eform_model: StackedEform | None = None,
    domain: TrainingDomain | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    sync: Any = None,
) -> ScanReport:
    """Predict every structure of ``cache`` that has no row yet; merge into ``out`` (see the module docstring).

    ``sync`` is the torch.distributed module under torchrun (None for one
    process): rank 0 prepares the parts and decides the shares, every rank
    writes its own part, rank 0 merges. Returns this process's report.
    """
    start = time.perf_counter()
    device = torch.device(device)
    paths = ScanPaths(Path(out))
    with_eform = eform_model is not None
    header = columns(ensemble.info.splits if ensemble.info else range(1, len(ensemble) + 1), with_eform)
    failures = cache.failures
    order = {sid: k for k, sid in enumerate(cache.ids)}
    order.update({sid: len(cache) + k for k, (sid, _) in enumerate(failures)})
    report = ScanReport()

    # Rank 0 checks what is there and decides who does what; the others wait for the plan.
    plan: list[Any] = [None]
    if rank == 0:
        plan[0] = _prepare(paths, header, order, ensemble, cache)
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
                           with_eform, len(ensemble))
        _append(paths.part(0), rows, header)
        report.failed += len(rows)

    ensemble.to(device).eval()
    if eform_model is not None:
        eform_model.to(device).eval()
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="structure", desc="LTC", disable=not progress or rank != 0 or len(todo) == 0,
               smoothing=0.05)
    if len(mine):
        for batch in cache.iter_batches(batch_size, indices=mine):
            pred, eform, errors = predict_batch(batch, ensemble, device, eform_model)
            warnings = batch_warnings(batch, cache.cutoff, domain)
            notes = [e + ("; " + w if w else "") if e else w for e, w in zip(errors, warnings)]
            rows = format_rows(batch.id, batch.formula, pred, descriptors(batch), eform, notes, with_eform, len(ensemble))
            _append(paths.part(rank), rows, header)
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


def _prepare(paths: ScanPaths, header: list[str], order: dict[str, int], ensemble: Ensemble,
             cache: GraphCache) -> tuple[list[int], list[int]] | Exception:
    """Rank 0: check or create the parts; returns (cache positions to predict, failure rows to write)."""
    try:
        meta = scan_meta(ensemble, cache, header)
        if paths.out.exists() and not paths.parts.exists():
            if not paths.meta.is_file():
                raise ScanError(f"{paths.out} exists and was not written by this scan (no {paths.meta.name}); "
                                "use another --out or delete it")
            _check_meta(json.loads(paths.meta.read_text()), meta, paths.meta, paths.out)
            return [], []  # finished earlier: only the summary is redone
        paths.parts.mkdir(parents=True, exist_ok=True)
        if paths.running_meta.is_file():
            _check_meta(json.loads(paths.running_meta.read_text()), meta, paths.running_meta, paths.out)
            repair_parts(paths, header, order)
        else:
            for stale in paths.parts.glob("rank*.csv"):
                stale.unlink()
            tmp = paths.running_meta.with_name("scan.json.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, paths.running_meta)
        done = done_ids(paths)
        todo = [k for k, sid in enumerate(cache.ids) if sid not in done]
        failed = [k for k, (sid, _) in enumerate(cache.failures) if sid not in done]
        return todo, failed
    except Exception as exc:  # handed to every rank, so that all stop with the same message
        return exc


# --- summary: top-N, distributions, correlations -------------------------------------------------

def incomplete_beta(a: float, b: float, x: float) -> float:
    r"""Regularised incomplete beta function :math:`I_x(a, b)` (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, eps: float = 1e-15, iterations: int = 10000) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return h


def pearson_p_value(r: float, n: int) -> float:
    r"""Two-sided p-value of Pearson's r under no correlation (normal data), from Student's t:

    .. math::
        t = r \sqrt{\frac{n - 2}{1 - r^2}},\qquad
        p = P(|T_{n-2}| \ge |t|) = I_{\frac{\nu}{\nu + t^2}}\!\left(\tfrac{\nu}{2}, \tfrac12\right),\quad \nu = n - 2

    (the same value as ``scipy.stats.pearsonr``).
    """
    if n < 3 or not math.isfinite(r):
        return math.nan
    if abs(r) >= 1.0:
        return 0.0
    nu = n - 2
    t2 = r * r * nu / (1.0 - r * r)
    return incomplete_beta(nu / 2.0, 0.5, nu / (nu + t2))


class PearsonAccumulator:
    r"""Pearson's r of (x, y) pairs added in chunks, in bounded memory (pairs with a NaN are skipped).

    Chunks are merged with the pairwise update of Chan, Golub & LeVeque:
    :math:`C = C_a + C_b + \delta_x \delta_y n_a n_b / n`, and likewise for the
    sums of squares; :math:`r = C / \sqrt{S_{xx} S_{yy}}`.
    """

    def __init__(self) -> None:
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = np.asarray(x, dtype=np.float64)[ok], np.asarray(y, dtype=np.float64)[ok]
        nb = len(x)
        if nb == 0:
            return
        mxb, myb = x.mean(), y.mean()
        dx, dy = x - mxb, y - myb
        n = self.n + nb
        ddx, ddy = mxb - self.mx, myb - self.my
        w = self.n * nb / n
        self.sxx += float(dx @ dx) + ddx * ddx * w
        self.syy += float(dy @ dy) + ddy * ddy * w
        self.sxy += float(dx @ dy) + ddx * ddy * w
        self.mx += ddx * nb / n
        self.my += ddy * nb / n
        self.n = n

    def result(self) -> tuple[float, float, int]:
        """(r, two-sided p, n); r is NaN when a variable is constant or n < 2."""
        if self.n < 2 or self.sxx <= 0 or self.syy <= 0:
            return math.nan, math.nan, self.n
        r = max(-1.0, min(1.0, self.sxy / math.sqrt(self.sxx * self.syy)))
        return r, pearson_p_value(r, self.n), self.n


def read_rows(path: Path, chunk: int = 4096) -> Iterator[list[dict[str, str]]]:
    """The rows of a scan CSV, a chunk at a time."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            rows.append(row)
            if len(rows) == chunk:
                yield rows
                rows = []
        if rows:
            yield rows


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows])


HIST_EDGES = np.logspace(-3, 6, 181)  # LTC bins (W/m/K): 10^-3..10^6, the back-transform's ceiling
SPREAD_EDGES = np.logspace(-5, 2, 141)  # std/mean bins


@dataclass
class Summary:
    rows: int = 0
    predicted: int = 0
    errors: int = 0
    warned: int = 0
    top: list[dict[str, str]] = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) + 1, dtype=np.int64))
    hist_models: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) + 1, dtype=np.int64))
    spread: np.ndarray = field(default_factory=lambda: np.zeros((len(HIST_EDGES) + 1, len(SPREAD_EDGES) + 1), dtype=np.int64))
    correlations: list[dict[str, Any]] = field(default_factory=list)


CORRELATION_TARGETS = {"ltc_mean": "mean prediction (mTC)", "ltc_variance": "variance of the predictions"}
CORRELATION_DESCRIPTORS = {
    "volume": "volume (Å^3)", "n_sites": "number of sites", "density": "density (g/cm^3)",
    "atomic_density": "atomic density (atoms/Å^3)", "n_elements": "number of elements",
    EFORM_COLUMN: "predicted formation energy (eV/atom)",
}


def summarize(out: str | Path, top: int = 30, correlations: bool = False) -> Summary:
    """One pass over a finished scan CSV: top-N by lowest max, histograms, and (optionally) correlations."""
    summary = Summary()
    heap: list[tuple[float, int, dict[str, str]]] = []  # the N lowest maxima, as a max-heap on -max
    accumulators: dict[tuple[str, str], PearsonAccumulator] = {}
    for chunk in read_rows(Path(out)):
        mean, std, top_max = _column(chunk, "ltc_mean"), _column(chunk, "ltc_std"), _column(chunk, "ltc_max")
        for k, row in enumerate(chunk):
            position = summary.rows + k
            if row["warning"].startswith("error:"):
                summary.errors += 1
            elif row["warning"]:
                summary.warned += 1
            if math.isfinite(top_max[k]) and top > 0:
                item = (-top_max[k], -position, row)
                if len(heap) < top:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        ok = np.isfinite(mean)
        summary.predicted += int(ok.sum())
        summary.rows += len(chunk)
        summary.hist += np.bincount(np.digitize(mean[ok], HIST_EDGES), minlength=len(HIST_EDGES) + 1)
        each = np.concatenate([_column(chunk, c) for c in chunk[0] if c.startswith("ltc_split")])
        summary.hist_models += np.bincount(np.digitize(each[np.isfinite(each)], HIST_EDGES), minlength=len(HIST_EDGES) + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = std / mean
        both = ok & np.isfinite(rel)
        np.add.at(summary.spread, (np.digitize(mean[both], HIST_EDGES), np.digitize(rel[both], SPREAD_EDGES)), 1)
        if correlations:
            targets = {"ltc_mean": mean, "ltc_variance": std**2}
            for name in CORRELATION_DESCRIPTORS:
                if name not in chunk[0]:
                    continue
                x = _column(chunk, name)
                for target, y in targets.items():
                    accumulators.setdefault((target, name), PearsonAccumulator()).add(x, y)
    summary.top = [row for _, _, row in sorted(heap, reverse=True)]
    for (target, name), acc in accumulators.items():
        r, p, n = acc.result()
        summary.correlations.append({"target": target, "descriptor": name, "pearson_r": r, "p_value": p, "n": n})
    return summary


def top_table(rows: list[dict[str, str]]) -> str:
    """Markdown table in the layout of the paper's Table S6."""
    lines = ["| # | id | formula | mean | std | std/mean | max | max x std/mean | warning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rows, start=1):
        cells = [r["ltc_mean"], r["ltc_std"], r["ltc_std_over_mean"], r["ltc_max"], r["ltc_max_x_std_over_mean"]]
        shown = [f"{float(c):.3g}" if c not in ("", "nan") else c for c in cells]
        lines.append(f"| {k} | {r['id']} | {r['formula']} | " + " | ".join(shown) + f" | {r['warning']} |")
    return "\n".join(lines)


def correlation_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| predicted | descriptor | Pearson r | p-value | n |", "|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {CORRELATION_TARGETS[c['target']]} | {CORRELATION_DESCRIPTORS[c['descriptor']]} | "
                     f"{c['pearson_r']:.3f} | {c['p_value']:.3g} | {c['n']} |")
    return "\n".join(lines)


def _occupied(counts: np.ndarray, edges: np.ndarray, margin: int = 3) -> tuple[float, float]:
    """Axis limits around the non-empty bins of ``counts`` (which has under- and overflow cells at its ends)."""
    full = np.flatnonzero(counts[1:-1])
    if not len(full):
        return float(edges[0]), float(edges[-1])
    lo, hi = float(edges[max(0, full[0] - margin)]), float(edges[min(len(edges) - 1, full[-1] + 1 + margin)])
    if hi < 10 * lo:  # at least a decade, centred, so that a narrow spread still has labelled ticks
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return lo, hi


def _wrapped(title: str, width: int = 64) -> str:
    """A plot title on as many lines as it needs (a long cache name used to run off the figure)."""
    return "\n".join(textwrap.wrap(title, width)) or title


def plot_distribution(summary: Summary, path: Path, title: str) -> None:
    """Histogram of the mean prediction per material, and of every model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stairs(summary.hist[1:-1], HIST_EDGES, fill=True, alpha=0.6, label="mean of the models (mTC)")
    n_models = summary.hist_models.sum() / max(1, summary.hist.sum())
    ax.stairs(summary.hist_models[1:-1] / max(1.0, n_models), HIST_EDGES, color="k", lw=1,
              label="each model's prediction (count / models)")
    ax.set_xscale("log")
    ax.set_xlim(*_occupied(summary.hist + summary.hist_models, HIST_EDGES))
    ax.set_xlabel("predicted LTC (W/m/K)")
    ax.set_ylabel("materials")
    ax.set_title(_wrapped(title), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spread(summary: Summary, path: Path, title: str) -> None:
    """2-D histogram of std/mean of the models' predictions against their mean (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as colors
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    counts = summary.spread[1:-1, 1:-1].T.astype(float)
    top = float(counts.max()) if counts.size else 0.0
    counts[counts == 0] = np.nan
    mesh = ax.pcolormesh(HIST_EDGES, SPREAD_EDGES, counts, norm=colors.LogNorm(vmin=1, vmax=max(1.0, top)), cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="materials")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*_occupied(summary.spread.sum(axis=1), HIST_EDGES))
    ax.set_ylim(*_occupied(summary.spread.sum(axis=0), SPREAD_EDGES))
    ax.set_xlabel("mean predicted LTC, mTC (W/m/K)")
    ax.set_ylabel("std / mean of the models' predictions")
    ax.set_title(_wrapped(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: str | Path, summary: Summary, top: int, notes: Sequence[str], title: str) -> Path:
    """``<base>.summary.md``, ``<base>.ltc.png``, ``<base>.spread.png`` (and ``<base>.correlations.csv``)."""
    paths = ScanPaths(Path(out))
    plot_distribution(summary, paths.sidecar(".ltc.png"), f"{title}: {summary.predicted} materials")
    plot_spread(summary, paths.sidecar(".spread.png"), f"{title}: spread of the predictions")
    lines = [f"# LTC screening: {title}", "",
             f"{summary.rows} structures in {paths.out.name}: {summary.predicted} predicted, {summary.errors} without "
             f"a prediction (warning starts with 'error:'), {summary.warned} predicted with a warning.", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"## The {len(summary.top)} materials with the lowest max prediction (as Table S6)", "",
              "LTC in W/m/K; std is the sample standard deviation of the models' predictions.", "",
              top_table(summary.top), ""]
    if summary.correlations:
        lines += ["## Correlations with simple descriptors (as Tables 1-4)", "",
                  "Pearson r over the materials with a prediction; two-sided p-value from Student's t.", "",
                  correlation_table(summary.correlations), ""]
        with open(paths.sidecar(".correlations.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["target", "descriptor", "pearson_r", "p_value", "n"])
            writer.writeheader()
            writer.writerows(summary.correlations)
    lines += ["## Plots", "", f"![distribution]({paths.sidecar('.ltc.png').name})",
              f"![spread]({paths.sidecar('.spread.png').name})", ""]
    path = paths.sidecar(".summary.md")
    path.write_text("\n".join(lines))
    return path
