"""Building a graph cache: structures converted (in worker processes), appended, flushed, resumable.

Building writes ``<out>.partial`` in HDF5's single-writer (SWMR) mode, which
orders writes so that the file on disk stays readable after a kill; a
``progress`` array records how many inputs are safely written, and is updated
only after their data has been flushed. Re-running the same build resumes from
there. When all inputs are done the partial file is copied into a compact,
final file under a temporary name, which is renamed to ``<out>``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: builds are not locked against each other
    fcntl = None
from tqdm import tqdm

from .. import paths
from ..elements import ELEMENTS
from ..graph import DEFAULT_CUTOFF, check_cutoff
from ..interrupt import check_interrupted
from ..structures import StructureInputs, collect_structures, printable_name
from .format import (
    COMMIT_EVERY, DIGESTED_ARRAYS, EDGE_ARRAYS, GRAPH_ARRAYS, NODE_ARRAYS, RESUME_KEYS, CacheError, _attr, _create,
    _header, array_sha256, header_sha256,
    _open_for_append, _open_partial, _partial_path, _strings, _strings_sha256,
)
from .reader import GraphCache
from .workers import converter, cpu_cores


@dataclass
class BuildReport:
    """What ``build_cache`` did."""

    path: Path
    structures: int  # graphs in the cache
    failures: list[tuple[str, str]]  # (id, reason) of inputs that could not be converted
    resumed: int = 0  # inputs already done by an interrupted build
    seconds: float = 0.0
    workers: int = 1

    def __str__(self) -> str:
        done = self.structures + len(self.failures) - self.resumed
        rate = f", {done / self.seconds:.0f} structures/s" if self.seconds > 0 and done > 0 else ""
        lines = [
            f"{self.path}: {self.structures} structures, {len(self.failures)} failed"
            + (f", resumed after {self.resumed} inputs" if self.resumed else "")
            + f", {self.seconds:.1f} s{rate} ({self.workers} process{'es' if self.workers > 1 else ''} parsing)"
        ]
        lines += [f"  failed {i}: {reason}" for i, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... {len(self.failures) - 20} more (python -m megnet_pt.cache info --failures {self.path})")
        return "\n".join(lines)



def build_cache(
    inputs: Iterable[str | Path] | str | Path,
    out: str | Path,
    cutoff: float = DEFAULT_CUTOFF,
    workers: int | None = None,
    commit_every: int = COMMIT_EVERY,
    progress: bool = True,
    fields: Sequence[str] | None = None,
) -> BuildReport:
    """Convert every structure of ``inputs`` into a graph and write them to ``out``.

    ``inputs`` are anything ``megnet_pt.structures.iter_structures`` reads (CIF
    files or folders, ``labels.csv`` dataset folders, pymatgen JSON, extended
    XYZ). Structures that fail to convert are recorded with the reason and the
    build goes on. ``workers`` processes parse and convert (default: every
    core). The file is written as ``<out>.partial`` and renamed when
    complete; if a ``.partial`` of the same build exists (same inputs, cutoff
    and vocabulary), the build resumes after its last flushed chunk. The
    inputs' numeric and boolean fields are stored as labels (``fields``: only
    those named). Graphs are
    built in ``workers`` processes and written in input order, so the file's
    content does not depend on ``workers``. An existing ``out`` is replaced.
    """
    out = Path(out)
    check_output(out, cutoff)
    with _build_lock(out):
        return _build(inputs, out, cutoff, workers or cpu_cores(), commit_every, progress, fields)


def check_output(out: Path, cutoff: float) -> None:
    """Refuse, before any work, a cutoff that makes no graph or an ``out`` that cannot be a file."""
    try:
        check_cutoff(cutoff)
    except ValueError as exc:
        raise CacheError(f"{out}: cannot build: {exc}") from None
    if out.is_dir():
        raise CacheError(f"{out}: is a folder; give the name of the cache file to write (e.g. {out / 'graphs.h5'})")


def _build(
    inputs: Iterable[str | Path] | str | Path, out: Path, cutoff: float, workers: int, commit_every: int, progress: bool,
    fields: Sequence[str] | None = None,
) -> BuildReport:
    start_time = time.perf_counter()
    listed = collect_structures(inputs, fields)
    _check_duplicates(listed, out)
    header = _header(listed, cutoff)
    partial_path = _partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    done = _resume(partial_path, header) if partial_path.exists() else None
    if done is None:
        n_labels = len(json.loads(header["label_names"]))
        _create(partial_path, header, n_labels, listed.file_checksums(), resizable=True, libver="latest")
        done = 0
    failures = _read_failures(partial_path) if done else []

    todo = listed.entries[done:]
    bar = tqdm(total=len(listed.entries), initial=done, unit="structure", desc=f"graphs -> {out.name}", disable=not progress)
    # Workers are forked before the file is opened, so that they hold no HDF5 handle.
    with converter(workers, cutoff, len(todo)) as convert, _open_for_append(partial_path) as f:
        writer = _Writer(f, header["label_names"])
        pending: list[tuple[str, dict[str, Any] | None, str | None]] = []
        try:
            for result in convert(todo):
                check_interrupted()
                pending.append(result)
                if result[1] is None:
                    failures.append((result[0], result[2]))
                bar.update()
                if len(pending) >= commit_every:
                    done += len(pending)
                    writer.commit(pending, done)
                    pending = []
            done += len(pending)
            writer.commit(pending, done)
        except BaseException:
            # Keep what is converted (it is complete and in order); the next run resumes after it.
            if pending and writer.healthy:
                writer.commit(pending, done + len(pending))
            bar.close()
            raise
    bar.close()
    n = _finalize(partial_path, out)
    return BuildReport(out, n, failures, resumed=len(listed.entries) - len(todo), seconds=time.perf_counter() - start_time,
                       workers=workers)


def ensure_cache(
    inputs: Iterable[str | Path] | str | Path,
    out: str | Path | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    vocabulary: Sequence[str] | None = ELEMENTS,
    workers: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> GraphCache:
    """The cache of ``inputs``: built if missing, resumed if partial, reused if complete.

    ``out`` defaults to ``./data/<name>_cutoff<cutoff>.h5``. An existing cache
    is reused only if it was built from the same sources (checksums), with the
    same cutoff and vocabulary; otherwise ``CacheError`` says what differs
    (pass ``rebuild=True``, or delete the file, to build it again).
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out = Path(out) if out is not None else default_cache_path(inputs, cutoff)
    if vocabulary is not None and tuple(vocabulary) != ELEMENTS:
        raise CacheError(
            f"{out}: the model's vocabulary ({len(vocabulary)} elements) differs from the "
            f"{len(ELEMENTS)}-element vocabulary graphs are built with; node_type would index the wrong embeddings"
        )

    def reuse() -> GraphCache:
        cache = GraphCache(out, cutoff=cutoff, vocabulary=vocabulary)
        if cache.sources_sha256 != collect_structures(inputs).sources_sha256():
            raise CacheError(
                f"{out}: built from other sources than {', '.join(map(str, inputs))} "
                "(source files were added, removed or changed since); delete it to build it again"
            )
        return cache

    if out.exists() and not rebuild:
        return reuse()
    with _build_lock(out):
        if out.exists() and not rebuild:  # another process built it while we waited
            return reuse()
        report = _build(inputs, out, cutoff, workers or cpu_cores(), COMMIT_EVERY, progress)
    if progress:
        print(report, file=sys.stderr)
    return GraphCache(out, cutoff=cutoff, vocabulary=vocabulary)


def default_cache_path(inputs: Sequence[str | Path], cutoff: float = DEFAULT_CUTOFF) -> Path:
    """``./data/<name>_cutoff<cutoff>.h5``; name is the input's name, or a hash of several."""
    if len(inputs) == 1:
        p = Path(inputs[0])
        name = p.parent.name if p.name == "labels.csv" else p.name.split(".")[0]
    else:
        name = "inputs-" + hashlib.sha256("\n".join(str(Path(p).resolve()) for p in inputs).encode()).hexdigest()[:12]
    return paths.local_data_dir() / f"{name}_cutoff{cutoff:g}.h5"


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build of ``out`` at a time (several training runs may start at once).

    An exclusive ``flock`` on ``<out>.lock``, removed afterwards; a waiter that
    finds the lock file replaced under it tries again. No-op without fcntl.
    """
    if fcntl is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(out.name + ".lock")
    told = False
    while True:
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                print(f"{out}: another process is building this cache; waiting for it", file=sys.stderr)
                told = True
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fh.close()


def _check_duplicates(listed: StructureInputs, out: Path) -> None:
    if listed.duplicates_message():
        raise CacheError(f"{out}: cannot build: {listed.duplicates_message()}")
    if not listed.entries:
        raise CacheError(f"{out}: cannot build: the inputs hold no structures")
    odd = [e for e in listed.entries if not e.id.isprintable() or not e.id.strip()]
    if odd:  # a line break in an id would split a row of every CSV written from the cache
        shown = "; ".join(f"{e.id!r} (in {printable_name(str(e.source))})" for e in odd[:10])
        raise CacheError(f"{out}: cannot build: {len(odd)} id(s) are empty or hold line breaks or other control "
                         f"characters: {shown}")


class _Writer:
    """Appends converted structures to an open partial file, one flushed chunk at a time."""

    def __init__(self, f: h5py.File, label_names: str) -> None:
        self.f = f
        self.label_names = json.loads(label_names)
        self.healthy = True

    def _append(self, name: str, values: np.ndarray | list) -> None:
        d = self.f[name]
        n = d.shape[0]
        d.resize((n + len(values), *d.shape[1:]))
        if len(values):
            d[n:] = values

    def commit(self, results: list[tuple[str, dict[str, Any] | None, str | None]], inputs_done: int) -> None:
        self.healthy = False  # until this commit is through
        graphs = [(i, a) for i, a, _ in results if a is not None]
        failed = [(i, reason) for i, a, reason in results if a is None]
        progress = self.f["progress"]
        _, n_graphs, n_nodes, n_edges, n_failed = (int(v) for v in progress[:])
        if graphs:
            arrays = [a for _, a in graphs]
            self._append("ids", [i for i, _ in graphs])
            self._append("formulas", [a["formula"] for a in arrays])
            self._append("lattice", np.stack([a["lattice"] for a in arrays]))
            if "labels" in self.f:
                self._append("labels", np.array([[a["labels"].get(k, math.nan) for k in self.label_names] for a in arrays]))
            nodes = np.array([len(a["node_type"]) for a in arrays], np.int64)
            edges = np.array([len(a["edge_dist"]) for a in arrays], np.int64)
            self._append("node_ptr", n_nodes + np.cumsum(nodes))
            self._append("edge_ptr", n_edges + np.cumsum(edges))
            for name in (*NODE_ARRAYS, *EDGE_ARRAYS):
                self._append(name, np.concatenate([a[name] for a in arrays]))
            n_graphs += len(graphs)
            n_nodes += int(nodes.sum())
            n_edges += int(edges.sum())
        if failed:
            self._append("failures/ids", [i for i, _ in failed])
            self._append("failures/reasons", [r for _, r in failed])
            n_failed += len(failed)
        # Data first, then the progress that vouches for it.
        self.f.flush()
        progress[:] = [inputs_done, n_graphs, n_nodes, n_edges, n_failed]
        self.f.flush()
        self.healthy = True


def _resume(partial_path: Path, header: dict[str, Any]) -> int | None:
    """Carry the flushed part of an interrupted build into a fresh partial file.

    Returns the number of inputs already done, or None (after a warning) when
    the partial file belongs to another build or cannot be read, in which
    case the build starts over.
    """
    fresh = partial_path.with_name(partial_path.name.removesuffix(".partial") + ".tmp")
    try:
        with _open_partial(partial_path) as src:
            for key in RESUME_KEYS:
                if _attr(src, key) != header[key]:
                    warnings.warn(f"{partial_path}: left by a build with another {key}; starting over", stacklevel=3)
                    return None
            inputs_done, n_graphs, n_nodes, n_edges, n_failed = (int(v) for v in src["progress"][:])
            label_names = json.loads(src.attrs["label_names"])
            sources = list(zip(_strings(src["sources/names"]), _strings(src["sources/sha256"])))
            _create(fresh, header, len(label_names), sources, resizable=True, libver="latest")
            with h5py.File(fresh, "r+", libver="latest", locking=False) as dst:
                _copy_arrays(src, dst, n_graphs, n_nodes, n_edges, n_failed)
                dst["progress"][:] = [inputs_done, n_graphs, n_nodes, n_edges, n_failed]
    except (OSError, KeyError, ValueError) as exc:
        warnings.warn(f"{partial_path}: cannot resume from it ({exc}); starting over", stacklevel=3)
        fresh.unlink(missing_ok=True)
        return None
    os.replace(fresh, partial_path)
    return inputs_done


def _copy_arrays(src: h5py.File, dst: h5py.File, n_graphs: int, n_nodes: int, n_edges: int, n_failed: int,
                 rows: int = 1 << 20) -> None:
    """Copy the first n rows of every array, a slice at a time (bounded memory)."""
    lengths = {"ids": n_graphs, "formulas": n_graphs, "node_ptr": n_graphs + 1, "edge_ptr": n_graphs + 1,
               "failures/ids": n_failed, "failures/reasons": n_failed}
    lengths.update({name: n_graphs for name in (*GRAPH_ARRAYS, "labels")})
    lengths.update({name: n_nodes for name in NODE_ARRAYS})
    lengths.update({name: n_edges for name in EDGE_ARRAYS})
    for name, n in lengths.items():
        if name not in dst:
            continue
        s, d = src[name], dst[name]
        if s.shape[0] < n:
            raise ValueError(f"array {name} has {s.shape[0]} rows, the progress record promises {n}")
        d.resize((n, *d.shape[1:]))
        for a in range(0, n, rows):
            d[a : a + rows] = s[a : min(n, a + rows)]


def _finalize(partial_path: Path, out: Path) -> int:
    """Copy the finished partial file into a compact final file; rename it to ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    with _open_partial(partial_path) as src:
        header = {key: src.attrs[key] for key in src.attrs if key != "complete"}
        inputs_done, n_graphs, n_nodes, n_edges, n_failed = (int(v) for v in src["progress"][:])
        label_names = json.loads(header["label_names"])
        sources = list(zip(_strings(src["sources/names"]), _strings(src["sources/sha256"])))
        _create(tmp, header, len(label_names), sources, resizable=False)
        with h5py.File(tmp, "r+", locking=False) as dst:
            _copy_arrays(src, dst, n_graphs, n_nodes, n_edges, n_failed)
            dst.attrs.update(
                n_structures=n_graphs, n_nodes=n_nodes, n_edges=n_edges, n_failed=n_failed,
                ids_sha256=_strings_sha256(_strings(dst["ids"])),
                formulas_sha256=_strings_sha256(_strings(dst["formulas"])),
                arrays_sha256=json.dumps({name: array_sha256(dst[name]) for name in DIGESTED_ARRAYS if name in dst}),
                complete=True,
            )
            dst.attrs["header_sha256"] = header_sha256({k: _attr(dst, k) for k in dst.attrs})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    partial_path.unlink()
    return n_graphs


def _read_failures(path: Path) -> list[tuple[str, str]]:
    with _open_partial(path) as f:
        return list(zip(_strings(f["failures/ids"]), _strings(f["failures/reasons"])))
