"""HDF5 graph cache: crystal graphs built once, read back fast.

Turning a CIF into a graph (parse, neighbour search) costs more than the model
on small cells, and screening reads the same tens of thousands of structures
many times. ``build_cache`` converts the inputs once into one HDF5 file;
``GraphCache`` reads it back as PyG ``Data`` objects or ready ``Batch``es.

File layout (schema version 1). Root attributes describe the file:

    format, schema_version, complete     what this is, and whether the build finished
    cutoff                               neighbour cutoff (Å) the graphs were built with
    vocabulary                           JSON list of element symbols; node_type indexes it
    label_names                          JSON list, the columns of ``labels``
    sources_sha256                       one checksum over every source file (names + contents)
    tool, tool_versions, created         what wrote it, and when
    n_structures, n_nodes, n_edges, n_failed, ids_sha256, formulas_sha256

Arrays are contiguous, chunked and compressed (gzip + shuffle) with a fletcher32
checksum per chunk, so a damaged chunk fails loudly on read. S structures,
N atoms and E edges in all; structure s owns atoms ``node_ptr[s]:node_ptr[s+1]``
and edges ``edge_ptr[s]:edge_ptr[s+1]``:

    ids, formulas           str [S]
    node_ptr, edge_ptr      int64 [S+1]
    lattice                 float32 [S, 3, 3]
    labels                  float64 [S, k]    (only when the inputs carry labels; NaN = missing)
    node_type               uint8 [N]         index into ``vocabulary``
    pos                     float32 [N, 3]    Cartesian positions (Å)
    edge_source, edge_target int32 [E]        atom indices local to the structure
    edge_image              int16 [E, 3]      periodic image of the target
    edge_dist               float32 [E]       distance (Å)
    failures/ids, failures/reasons  str       inputs that could not be converted
    sources/names, sources/sha256   str       every source file and its checksum

Building writes ``<out>.partial`` in HDF5's single-writer (SWMR) mode, which
orders writes so that the file on disk stays readable after a kill; a
``progress`` array records how many inputs are safely written, and is updated
only after their data has been flushed. Re-running the same build resumes from
there. When all inputs are done the partial file is copied into a compact,
final file under a temporary name, which is renamed to ``<out>``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: builds are not locked against each other
    fcntl = None
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch_geometric.data import Batch, Data
from tqdm import tqdm

from . import paths
from .elements import ELEMENTS
from .graph import DEFAULT_CUTOFF, StructureError, structure_to_graph
from .structures import StructureEntry, StructureInputs, collect_structures

FORMAT = "megnet_pt graph cache"
SCHEMA_VERSION = 1
COMMIT_EVERY = 256  # inputs per flushed chunk: a kill loses at most this much work
IN_MEMORY_BYTES = 512 << 20  # caches up to this size (uncompressed) are loaded whole
BLOCK_BYTES = 64 << 20  # streaming reads about this much at a time
CHUNK_CACHE_BYTES = 4 << 20  # HDF5's cache of decompressed chunks, per open dataset (7 are open)

# name: (dtype, trailing shape, rows per HDF5 chunk)
# Chunks of 16-24 kB: they compress as well as larger ones, and reading one
# structure at random decompresses little (a quarter of the time of 64 kB chunks).
GRAPH_ARRAYS = {"lattice": (np.float32, (3, 3), 512)}
NODE_ARRAYS = {"node_type": (np.uint8, (), 16384), "pos": (np.float32, (3,), 2048)}
EDGE_ARRAYS = {
    "edge_source": (np.int32, (), 4096),
    "edge_target": (np.int32, (), 4096),
    "edge_image": (np.int16, (3,), 4096),
    "edge_dist": (np.float32, (), 4096),
}
STRING_ARRAYS = ("ids", "formulas", "failures/ids", "failures/reasons")


class CacheError(ValueError):
    """A graph cache is unusable, or cannot be built; the message names the file and the reason."""


@dataclass
class BuildReport:
    """What ``build_cache`` did."""

    path: Path
    structures: int  # graphs in the cache
    failures: list[tuple[str, str]]  # (id, reason) of inputs that could not be converted
    resumed: int = 0  # inputs already done by an interrupted build
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {self.structures} structures, {len(self.failures)} failed"
            + (f", resumed after {self.resumed} inputs" if self.resumed else "")
            + f", {self.seconds:.1f} s"
        ]
        lines += [f"  failed {i}: {reason}" for i, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... {len(self.failures) - 20} more (python -m megnet_pt.cache info --failures {self.path})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Building


def build_cache(
    inputs: Iterable[str | Path] | str | Path,
    out: str | Path,
    cutoff: float = DEFAULT_CUTOFF,
    workers: int = 1,
    commit_every: int = COMMIT_EVERY,
    progress: bool = True,
) -> BuildReport:
    """Convert every structure of ``inputs`` into a graph and write them to ``out``.

    ``inputs`` are anything ``megnet_pt.structures.iter_structures`` reads (CIF
    files or folders, ``labels.csv`` dataset folders, pymatgen JSON, extended
    XYZ). Structures that fail to convert are recorded with the reason and the
    build goes on. The file is written as ``<out>.partial`` and renamed when
    complete; if a ``.partial`` of the same build exists (same inputs, cutoff
    and vocabulary), the build resumes after its last flushed chunk. Graphs are
    built in ``workers`` processes and written in input order, so the file's
    content does not depend on ``workers``. An existing ``out`` is replaced.
    """
    out = Path(out)
    with _build_lock(out):
        return _build(inputs, out, cutoff, workers, commit_every, progress)


def _build(
    inputs: Iterable[str | Path] | str | Path, out: Path, cutoff: float, workers: int, commit_every: int, progress: bool
) -> BuildReport:
    start_time = time.perf_counter()
    listed = collect_structures(inputs)
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
    with _converter(workers, cutoff, len(todo)) as convert, _open_for_append(partial_path) as f:
        writer = _Writer(f, header["label_names"])
        pending: list[tuple[str, dict[str, Any] | None, str | None]] = []
        try:
            for result in convert(todo):
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
    return BuildReport(out, n, failures, resumed=len(listed.entries) - len(todo), seconds=time.perf_counter() - start_time)


def ensure_cache(
    inputs: Iterable[str | Path] | str | Path,
    out: str | Path | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    vocabulary: Sequence[str] | None = ELEMENTS,
    workers: int = 1,
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
                "(source files were added, removed or changed since); delete it or rebuild it (rebuild=True)"
            )
        return cache

    if out.exists() and not rebuild:
        return reuse()
    with _build_lock(out):
        if out.exists() and not rebuild:  # another process built it while we waited
            return reuse()
        report = _build(inputs, out, cutoff, workers, COMMIT_EVERY, progress)
    if report.failures and progress:
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


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


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
    duplicates = listed.duplicate_ids()
    if duplicates:
        where = {i: sorted({str(e.source) for e in listed.entries if e.id == i}) for i in duplicates[:10]}
        shown = "; ".join(f"{i} (in {', '.join(files)})" for i, files in where.items())
        more = f"; and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise CacheError(f"{out}: cannot build: {len(duplicates)} duplicate id(s) in the inputs: {shown}{more}")
    if not listed.entries:
        raise CacheError(f"{out}: cannot build: the inputs hold no structures")


def _tool_versions() -> dict[str, str]:
    import pymatgen.core

    try:
        from importlib.metadata import version

        ours = version("paraisite-pt")
    except Exception:
        ours = "source"
    return {
        "paraisite-pt": ours,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "pymatgen": getattr(pymatgen.core, "__version__", "?"),
        "torch": torch.__version__,
    }


def _header(listed: StructureInputs, cutoff: float) -> dict[str, Any]:
    versions = _tool_versions()
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "cutoff": float(cutoff),
        "vocabulary": json.dumps(list(ELEMENTS)),
        "label_names": json.dumps(listed.label_names),
        "sources_sha256": listed.sources_sha256(),
        "tool": f"megnet_pt.cache (paraisite-pt {versions['paraisite-pt']})",
        "tool_versions": json.dumps(versions),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# What must agree between a partial file and the build that wants to resume it.
RESUME_KEYS = ("format", "schema_version", "cutoff", "vocabulary", "label_names", "sources_sha256")


def _create(
    path: Path,
    header: dict[str, Any],
    n_labels: int,
    sources: list[tuple[str, str]],
    resizable: bool,
    libver: str | None = None,
) -> None:
    """An empty cache file: every array at length zero, header written, ``complete`` false."""
    with h5py.File(path, "w", libver=libver, locking=False) as f:
        f.attrs.update(header)
        f.attrs["complete"] = False
        arrays = {**GRAPH_ARRAYS, **NODE_ARRAYS, **EDGE_ARRAYS}
        if n_labels:
            arrays["labels"] = (np.float64, (n_labels,), 2048)
        for name, (dtype, shape, rows) in arrays.items():
            f.create_dataset(
                name, (0, *shape), maxshape=(None, *shape), chunks=(rows, *shape), dtype=dtype,
                compression="gzip", compression_opts=4, shuffle=True, fletcher32=True,
            )
        for name in ("node_ptr", "edge_ptr"):
            f.create_dataset(name, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(8192,),
                             compression="gzip", compression_opts=4, shuffle=True, fletcher32=True)
        for name in STRING_ARRAYS:
            f.create_dataset(name, (0,), maxshape=(None,), chunks=(4096,), dtype=h5py.string_dtype())
        names = [n for n, _ in sources]
        f.create_dataset("sources/names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("sources/sha256", data=np.array([s for _, s in sources], dtype=object), dtype=h5py.string_dtype())
        if resizable:
            # [inputs done, graphs, nodes, edges, failures] safely on disk
            f.create_dataset("progress", data=np.zeros(5, np.int64))


def _open_partial(path: Path) -> h5py.File:
    """A partial file, for reading, while or after a build writes it.

    swmr=True: a writer that was killed leaves its "open for writing" mark
    behind. No HDF5 file lock: a reader (``info`` on a running build) must
    never make the writer fail to open the file; builds exclude each other
    with ``_build_lock`` instead.
    """
    return h5py.File(path, "r", swmr=True, locking=False)


def _open_for_append(path: Path) -> h5py.File:
    f = h5py.File(path, "r+", libver="latest", locking=False)
    f.swmr_mode = True
    return f


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
                complete=True,
            )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    partial_path.unlink()
    return n_graphs


def _read_failures(path: Path) -> list[tuple[str, str]]:
    with _open_partial(path) as f:
        return list(zip(_strings(f["failures/ids"]), _strings(f["failures/reasons"])))


# Conversion runs in worker processes; it returns plain numpy arrays.


def _convert(entry: StructureEntry, cutoff: float) -> tuple[str, dict[str, Any] | None, str | None]:
    """(id, arrays, None) for a structure that converts, (id, None, reason) for one that does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = structure_to_graph(entry.load(), cutoff=cutoff, id=entry.id)
        image = g.edge_image.numpy()
        if image.size and np.abs(image).max() > np.iinfo(np.int16).max:
            raise ValueError(f"{entry.id}: periodic images beyond ±32767 (a degenerate cell)")
        return entry.id, {
            "formula": g.formula,
            "labels": entry.labels,
            "lattice": g.lattice[0].numpy(),
            "node_type": g.node_type.numpy().astype(np.uint8),
            "pos": g.pos.numpy(),
            "edge_source": g.edge_index[0].numpy().astype(np.int32),
            "edge_target": g.edge_index[1].numpy().astype(np.int32),
            "edge_image": image.astype(np.int16),
            "edge_dist": g.edge_dist.numpy(),
        }, None
    except Exception as exc:  # any failure of one structure is reported, not raised
        text = str(exc).strip()
        return entry.id, None, (text.splitlines()[0] if text else type(exc).__name__)


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


class _converter:
    """Context manager giving ``convert(entries) -> ordered results``, in-process or in a pool."""

    def __init__(self, workers: int, cutoff: float, n: int) -> None:
        self.workers, self.cutoff, self.n = max(1, int(workers)), cutoff, n
        self.pool = None

    def __enter__(self):
        work = partial(_convert, cutoff=self.cutoff)
        if self.workers == 1 or self.n < 2:
            return lambda entries: map(work, entries)
        # fork on Linux starts at once (as DataLoader workers do; the work never enters an
        # OpenMP region, so threads held by the parent do not matter). Elsewhere fork is
        # unsafe or absent; forkserver/spawn workers import torch and pymatgen first (seconds).
        methods = multiprocessing.get_all_start_methods()
        method = "fork" if sys.platform.startswith("linux") else "forkserver" if "forkserver" in methods else "spawn"
        self.pool = multiprocessing.get_context(method).Pool(self.workers, initializer=_init_worker)
        chunksize = max(1, min(16, self.n // (self.workers * 8)))
        return lambda entries: self.pool.imap(work, entries, chunksize=chunksize)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------
# Reading


def _attr(f: h5py.File, key: str) -> Any:
    value = f.attrs.get(key)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _strings(d: h5py.Dataset) -> list[str]:
    return list(d.asstr()[:]) if d.shape[0] else []


def _strings_sha256(values: list[str]) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode())
        h.update(b"\0")
    return h.hexdigest()


def _open_h5(path: Path, **kwargs: Any) -> h5py.File:
    if not path.exists():
        partial_path = _partial_path(path)
        hint = f" (an interrupted build left {partial_path}: re-run the build to resume it)" if partial_path.exists() else ""
        raise CacheError(f"{path}: no such graph cache{hint}")
    try:
        return h5py.File(path, "r", locking="best-effort", **kwargs)
    except OSError as exc:
        raise CacheError(
            f"{path}: cannot be opened as HDF5, the file is truncated or corrupt ({exc}); delete it and rebuild"
        ) from exc


@dataclass
class _Block:
    """Arrays of a run of structures, with pointers local to the run."""

    node_ptr: np.ndarray
    edge_ptr: np.ndarray
    lattice: np.ndarray
    node_type: np.ndarray
    pos: np.ndarray
    edge_source: np.ndarray
    edge_target: np.ndarray
    edge_image: np.ndarray
    edge_dist: np.ndarray


@dataclass
class _Index:
    """What a reader keeps in memory whatever the file size."""

    n: int
    ids: list[str]
    formulas: list[str]
    node_ptr: np.ndarray
    edge_ptr: np.ndarray
    labels: np.ndarray | None
    label_names: list[str]
    vocabulary: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


class GraphCache:
    """Graphs of a cache file, as ``Data`` (``cache[i]``) or ``Batch`` (``cache[a:b]``, ``cache.batch(idx)``).

    Opening validates the file (format, schema version, completeness,
    consistent array lengths and pointers, unique ids) and, when given, that
    it was built with ``cutoff`` and ``vocabulary``; any problem raises
    ``CacheError`` naming the file and the reason. Caches up to
    ``IN_MEMORY_BYTES`` (uncompressed) are loaded whole (``in_memory=None``);
    larger ones are read on demand, and ``iter_batches`` streams them a block
    at a time with bounded memory. Instances can be passed to ``DataLoader``
    workers: each process opens the file itself.
    """

    def __init__(
        self,
        path: str | Path,
        cutoff: float | None = None,
        vocabulary: Sequence[str] | None = None,
        in_memory: bool | None = None,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        self.path = Path(path)
        self.block_bytes = block_bytes
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._all: _Block | None = None
        self._datasets: dict[str, h5py.Dataset] | None = None
        with _open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES) as f:
            self._index = self._validate(f, cutoff, vocabulary)
            self.in_memory = self.nbytes <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
            if self.in_memory:
                self._all = self._read(f, [(0, len(self))])

    # -- validation

    def _fail(self, reason: str) -> CacheError:
        return CacheError(f"{self.path}: {reason}")

    def _validate(self, f: h5py.File, cutoff: float | None, vocabulary: Sequence[str] | None) -> _Index:
        try:
            return self._check_file(f, cutoff, vocabulary)
        except CacheError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as exc:  # a missing or malformed attribute, an unreadable array
            raise self._fail(f"corrupt ({type(exc).__name__}: {exc}); delete it and rebuild") from exc

    def _check_file(self, f: h5py.File, cutoff: float | None, vocabulary: Sequence[str] | None) -> _Index:
        if _attr(f, "format") != FORMAT:
            raise self._fail("not a megnet_pt graph cache (no 'format' attribute)")
        version = _attr(f, "schema_version")
        if version != SCHEMA_VERSION:
            raise self._fail(f"schema version {version}, this reader understands {SCHEMA_VERSION}: rebuild the cache")
        if not _attr(f, "complete"):
            raise self._fail("incomplete: the build did not finish; re-run it to resume")
        stored_cutoff = float(_attr(f, "cutoff"))
        if cutoff is not None and not math.isclose(stored_cutoff, float(cutoff), rel_tol=0, abs_tol=1e-9):
            raise self._fail(
                f"built with cutoff {stored_cutoff:g} Å, the model needs {float(cutoff):g} Å: "
                f"build a cache with --cutoff {float(cutoff):g}"
            )
        stored_vocabulary = json.loads(_attr(f, "vocabulary"))
        if vocabulary is not None and list(vocabulary) != stored_vocabulary:
            pairs = enumerate(zip(stored_vocabulary, vocabulary))
            first = next((k for k, (a, b) in pairs if a != b), min(len(vocabulary), len(stored_vocabulary)))
            raise self._fail(
                f"element vocabulary differs from the model's ({len(stored_vocabulary)} vs {len(vocabulary)} elements, "
                f"first difference at index {first}): node types would index the wrong embeddings; rebuild the cache"
            )
        n = int(_attr(f, "n_structures"))
        arrays = {**GRAPH_ARRAYS, **NODE_ARRAYS, **EDGE_ARRAYS}
        missing = [k for k in (*arrays, "node_ptr", "edge_ptr", *STRING_ARRAYS) if k not in f]
        if missing:
            raise self._fail(f"corrupt: missing array(s) {', '.join(missing)}")
        label_names = json.loads(_attr(f, "label_names"))
        for name in ("ids", "formulas", *GRAPH_ARRAYS) + (("labels",) if label_names else ()):
            if name not in f or f[name].shape[0] != n:
                raise self._fail(f"corrupt: array {name} should have {n} rows")
        if label_names and f["labels"].shape[1:] != (len(label_names),):
            raise self._fail(f"corrupt: labels should have {len(label_names)} columns")
        counts = {"node": int(_attr(f, "n_nodes")), "edge": int(_attr(f, "n_edges"))}
        ptrs = {}
        for kind, names in (("node", NODE_ARRAYS), ("edge", EDGE_ARRAYS)):
            ptr = f[f"{kind}_ptr"][:]
            if ptr.shape != (n + 1,) or ptr[0] != 0 or (np.diff(ptr) < 0).any() or ptr[-1] != counts[kind]:
                raise self._fail(
                    f"corrupt: {kind}_ptr is not a valid offset array for {n} structures and {counts[kind]} {kind}s"
                )
            for name in names:
                if f[name].shape[0] != counts[kind]:
                    raise self._fail(f"corrupt: array {name} should have {counts[kind]} rows, it has {f[name].shape[0]}")
            ptrs[kind] = ptr
        ids, formulas = _strings(f["ids"]), _strings(f["formulas"])
        if _strings_sha256(ids) != _attr(f, "ids_sha256") or _strings_sha256(formulas) != _attr(f, "formulas_sha256"):
            raise self._fail("corrupt: the ids or formulas do not match their checksum")
        if len(set(ids)) != n:
            dup = sorted(i for i, k in Counter(ids).items() if k > 1)
            raise self._fail(f"corrupt: duplicate ids {', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''}")
        labels = f["labels"][:] if label_names else None
        attrs = {k: _attr(f, k) for k in f.attrs}
        return _Index(n, ids, formulas, ptrs["node"], ptrs["edge"], labels, label_names, stored_vocabulary, attrs)

    def _check_block(self, block: _Block, first: int) -> None:
        """Values a reader relies on: element indices in the vocabulary, edges within their structure."""
        size = len(self._index.vocabulary)
        if block.node_type.size and int(block.node_type.max()) >= size:
            raise self._fail(f"corrupt: element index beyond the {size}-element vocabulary near structure {first}")
        nodes_of_edge = np.repeat(np.diff(block.node_ptr).astype(np.int32), np.diff(block.edge_ptr))
        for name in ("edge_source", "edge_target"):
            v = getattr(block, name)
            if v.size and ((v < 0).any() or (v >= nodes_of_edge).any()):
                raise self._fail(f"corrupt: {name} points outside its structure near structure {first}")
        if not (np.isfinite(block.edge_dist).all() and np.isfinite(block.pos).all() and np.isfinite(block.lattice).all()):
            raise self._fail(f"corrupt: non-finite distances, positions or lattices near structure {first}")

    # -- file access

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open the file themselves (and reload in-memory arrays lazily).
        state = self.__dict__.copy()
        state.update(_h5=None, _pid=None, _all=None, _datasets=None)
        return state

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            # A handle inherited through fork is not safe to use: open our own.
            f = _open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
            if any(_attr(f, key) != self._index.attrs.get(key) for key in ("ids_sha256", "created")):
                f.close()
                raise self._fail("the file changed since it was opened; open it again")
            self._h5, self._pid = f, os.getpid()
            # Keep the datasets open: HDF5's chunk cache lives and dies with each open dataset.
            self._datasets = {name: f[name] for name in (*GRAPH_ARRAYS, *NODE_ARRAYS, *EDGE_ARRAYS)}
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._datasets = None

    def _read(self, f: h5py.File | dict[str, h5py.Dataset], runs: list[tuple[int, int]]) -> _Block:
        """Structures of the runs ``[(start, stop), ...]``, end to end in one block.

        Each run is one contiguous read per array, copied into place (memory
        stays near the block's size: the only temporary is one run).
        """
        node_ptr, edge_ptr = self._index.node_ptr, self._index.edge_ptr
        counts = {"graph": [b - a for a, b in runs],
                  "node": [int(node_ptr[b] - node_ptr[a]) for a, b in runs],
                  "edge": [int(edge_ptr[b] - edge_ptr[a]) for a, b in runs]}
        starts = {"graph": [a for a, _ in runs], "node": [int(node_ptr[a]) for a, _ in runs],
                  "edge": [int(edge_ptr[a]) for a, _ in runs]}
        local = {kind: np.concatenate([[0]] + [p[a + 1 : b + 1] - p[a] + o for (a, b), o in
                                               zip(runs, np.cumsum([0] + counts[kind][:-1]))])
                 for kind, p in (("node", node_ptr), ("edge", edge_ptr))}
        arrays = {}
        try:
            for kind, names in (("graph", GRAPH_ARRAYS), ("node", NODE_ARRAYS), ("edge", EDGE_ARRAYS)):
                for name, (dtype, shape, _) in names.items():
                    d = f[name]
                    if len(runs) == 1:
                        arrays[name] = d[starts[kind][0] : starts[kind][0] + counts[kind][0]]
                        continue
                    out = np.empty((sum(counts[kind]), *shape), dtype=dtype)
                    offset = 0
                    for start, n in zip(starts[kind], counts[kind]):
                        out[offset : offset + n] = d[start : start + n]
                        offset += n
                    arrays[name] = out
        except OSError as exc:  # e.g. a fletcher32 checksum error
            raise self._fail(f"corrupt: cannot read structures {runs[0][0]}-{runs[-1][1] - 1} ({exc}); "
                             "delete it and rebuild") from exc
        block = _Block(node_ptr=local["node"], edge_ptr=local["edge"], **arrays)
        self._check_block(block, runs[0][0])
        return block

    def _load(self, indices: np.ndarray) -> tuple[_Block, np.ndarray]:
        """A block holding ``indices`` (any order, repeats allowed) and their positions in it."""
        if self._all is None and self.in_memory:
            self._file()
            self._all = self._read(self._datasets, [(0, len(self))])
        if self._all is not None:
            return self._all, indices
        wanted = np.unique(indices)
        # Read runs of nearby structures in one go: a few unwanted ones cost less than another read.
        breaks = np.flatnonzero(np.diff(wanted) > 8) + 1
        starts = wanted[np.r_[0, breaks]]
        stops = wanted[np.r_[breaks - 1, len(wanted) - 1]] + 1
        self._file()
        block = self._read(self._datasets, [(int(a), int(b)) for a, b in zip(starts, stops)])
        offsets = np.r_[0, np.cumsum(stops - starts)]
        run = np.searchsorted(starts, indices, side="right") - 1
        return block, offsets[run] + (indices - starts[run])

    # -- public interface

    def __len__(self) -> int:
        return self._index.n

    @property
    def ids(self) -> list[str]:
        return self._index.ids

    @property
    def formulas(self) -> list[str]:
        return self._index.formulas

    @property
    def labels(self) -> np.ndarray | None:
        """float64 [S, k], columns named by ``label_names``; None when the cache has no labels."""
        return self._index.labels

    @property
    def label_names(self) -> list[str]:
        return self._index.label_names

    @property
    def cutoff(self) -> float:
        return float(self._index.attrs["cutoff"])

    @property
    def vocabulary(self) -> list[str]:
        return list(self._index.vocabulary)

    @property
    def sources_sha256(self) -> str:
        return self._index.attrs["sources_sha256"]

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's root attributes (format, cutoff, tool, created...)."""
        return dict(self._index.attrs)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(id, reason) of the inputs that could not be converted."""
        f = self._file()
        return list(zip(_strings(f["failures/ids"]), _strings(f["failures/reasons"])))

    @property
    def nbytes(self) -> int:
        """Size of the graph arrays once loaded (uncompressed)."""
        per_node = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s, _ in NODE_ARRAYS.values())
        per_edge = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s, _ in EDGE_ARRAYS.values())
        return int(self._index.node_ptr[-1]) * per_node + int(self._index.edge_ptr[-1]) * per_edge + len(self) * 36

    def index_of(self, id: str) -> int:
        if not hasattr(self, "_positions"):
            self._positions = {i: k for k, i in enumerate(self.ids)}
        return self._positions[id]

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> Data | Batch:
        """``cache[i]`` is a ``Data``; a slice, list or array of indices gives a ``Batch``."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for a cache of {len(self)} structures")
            i %= len(self)
            block, local = self._load(np.array([i]))
            return self._data(block, int(local[0]), i)
        if isinstance(key, slice):
            return self.batch(np.arange(len(self))[key])
        return self.batch(key)

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Batch:
        """The structures at ``indices`` collated into one ``Batch`` (as ``Batch.from_data_list`` would)."""
        indices = self._indices(indices)
        if indices.size == 0:
            raise IndexError("batch() needs at least one index")
        block, local = self._load(indices)
        return self._collate(block, local, indices)

    def _indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Indices as int64, negative ones counted from the end; IndexError when out of range."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (indices < -len(self)).any() or (indices >= len(self)).any():
            raise IndexError(f"indices out of range for a cache of {len(self)} structures")
        return np.where(indices < 0, indices + len(self), indices)

    def iter_batches(
        self,
        batch_size: int,
        indices: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` over ``indices`` (default: all), in order or shuffled.

        A cache that is not in memory is read a block (``block_bytes``) at a
        time, so memory stays bounded whatever the file size. Shuffling then
        visits blocks of neighbouring structures in random order and shuffles
        within each: the usual compromise of streaming readers.
        """
        order = np.arange(len(self)) if indices is None else self._indices(indices)
        per_block = self._structures_per_block(batch_size)
        rng = np.random.default_rng(seed)
        if shuffle and self.in_memory:
            order = rng.permutation(order)
        elif shuffle:
            groups = order // per_block
            keys = rng.permutation(int(groups.max()) + 1)[groups] if order.size else groups
            order = order[np.lexsort((rng.random(order.size), keys))]
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        if self.in_memory:
            for k in range(0, end, batch_size):
                yield self.batch(order[k : k + batch_size])
            return
        for w in range(0, end, per_block):
            part = order[w : min(end, w + per_block)]
            block, local = self._load(part)
            for k in range(0, len(part), batch_size):
                yield self._collate(block, local[k : k + batch_size], part[k : k + batch_size])
            del block

    def _structures_per_block(self, batch_size: int) -> int:
        per_structure = max(1, self.nbytes // max(1, len(self)))
        n = max(batch_size, self.block_bytes // per_structure)
        return n - n % batch_size  # whole batches per block

    def loader(self, batch_size: int, shuffle: bool = False, num_workers: int = 0, drop_last: bool = False,
               seed: int | None = None, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` of ready ``Batch``es, collated by ``batch()`` in the workers."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = RandomSampler(self, generator=generator) if shuffle else SequentialSampler(self)
        return DataLoader(self, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None,
                          num_workers=num_workers, collate_fn=_identity, **kwargs)

    def verify(self) -> None:
        """Read every array, checking chunk checksums and values; ``CacheError`` if anything is wrong."""
        f = self._file()
        for start, stop in _spans(len(self), self._structures_per_block(1)):
            self._read(self._datasets, [(start, stop)])
        _strings(f["failures/ids"]), _strings(f["failures/reasons"])

    def __repr__(self) -> str:
        mode = "in memory" if self.in_memory else "streamed"
        return f"GraphCache({str(self.path)!r}, {len(self)} structures, cutoff {self.cutoff:g} Å, {mode})"

    # -- building Data and Batch objects from arrays

    def _data(self, block: _Block, j: int, i: int) -> Data:
        na, nb = block.node_ptr[j], block.node_ptr[j + 1]
        ea, eb = block.edge_ptr[j], block.edge_ptr[j + 1]
        data = Data(
            node_type=torch.from_numpy(block.node_type[na:nb].astype(np.int64)),
            edge_index=torch.from_numpy(np.stack([block.edge_source[ea:eb], block.edge_target[ea:eb]]).astype(np.int64)),
            edge_dist=torch.from_numpy(block.edge_dist[ea:eb].copy()),
            edge_image=torch.from_numpy(block.edge_image[ea:eb].astype(np.float32)),
            pos=torch.from_numpy(block.pos[na:nb].copy()),
            lattice=torch.from_numpy(block.lattice[j : j + 1].copy()),
            state=torch.zeros(1, 2),
            num_nodes=int(nb - na),
            id=self.ids[i],
            formula=self.formulas[i],
        )
        if self.labels is not None:
            data.y = torch.from_numpy(self.labels[i : i + 1].astype(np.float32))
        return data

    def _collate(self, block: _Block, local: np.ndarray, indices: np.ndarray) -> Batch:
        local = np.asarray(local, dtype=np.int64)
        nodes = block.node_ptr[local + 1] - block.node_ptr[local]
        edges = block.edge_ptr[local + 1] - block.edge_ptr[local]
        node_ptr = np.r_[0, np.cumsum(nodes)]
        edge_ptr = np.r_[0, np.cumsum(edges)]
        if len(local) == 1 or (np.diff(local) == 1).all():  # a contiguous run: plain slices
            a, b = local[0], local[-1] + 1
            node_sel = slice(block.node_ptr[a], block.node_ptr[b])
            edge_sel = slice(block.edge_ptr[a], block.edge_ptr[b])
        else:
            node_sel = _ranges(block.node_ptr[local], nodes)
            edge_sel = _ranges(block.edge_ptr[local], edges)
        source = block.edge_source[edge_sel] + np.repeat(node_ptr[:-1], edges)
        target = block.edge_target[edge_sel] + np.repeat(node_ptr[:-1], edges)
        B = len(local)
        node_ptr_t, edge_ptr_t, graph_ptr = torch.from_numpy(node_ptr), torch.from_numpy(edge_ptr), torch.arange(B + 1)
        fields: dict[str, Any] = dict(
            node_type=torch.from_numpy(block.node_type[node_sel].astype(np.int64)),
            edge_index=torch.from_numpy(np.stack([source, target]).astype(np.int64)),
            # Copies, never views: a caller editing a batch in place must not edit the cache.
            edge_dist=torch.from_numpy(np.array(block.edge_dist[edge_sel], copy=True)),
            edge_image=torch.from_numpy(block.edge_image[edge_sel].astype(np.float32)),
            pos=torch.from_numpy(np.array(block.pos[node_sel], copy=True)),
            lattice=torch.from_numpy(block.lattice[local]),
            state=torch.zeros(B, 2),
        )
        slices = dict(node_type=node_ptr_t, edge_index=edge_ptr_t, edge_dist=edge_ptr_t, edge_image=edge_ptr_t,
                      pos=node_ptr_t, lattice=graph_ptr, state=graph_ptr)
        zeros = torch.zeros(B, dtype=torch.long)
        incs: dict[str, Any] = {k: zeros for k in slices}
        incs["edge_index"] = node_ptr_t[:-1]
        if self.labels is not None:
            fields["y"] = torch.from_numpy(self.labels[indices].astype(np.float32))
            slices["y"], incs["y"] = graph_ptr, zeros
        out = Batch(_base_cls=_batch_class(), **fields)
        out.num_nodes = int(node_ptr[-1])
        out._store._num_nodes = nodes.tolist()
        out.id = [self.ids[i] for i in indices]
        out.formula = [self.formulas[i] for i in indices]
        slices.update(id=graph_ptr, formula=graph_ptr)
        incs.update(id=None, formula=None)
        out.batch = torch.from_numpy(np.repeat(np.arange(B), nodes))
        out.ptr = node_ptr_t
        out._num_graphs = B
        out._slice_dict = slices
        out._inc_dict = incs
        return out


_BATCH_CLASS: type | None = None


def _batch_class() -> type:
    """PyG's ``DataBatch`` class, made once (``Batch(_base_cls=Data)`` builds a class per call)."""
    global _BATCH_CLASS
    if _BATCH_CLASS is None:
        _BATCH_CLASS = type(Batch(_base_cls=Data))
    return _BATCH_CLASS


def _identity(x: Any) -> Any:
    return x


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c), without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - counts), counts)


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, max(1, size)):
        yield a, min(n, a + size)


# ---------------------------------------------------------------------------
# Command line


def read_progress(path: str | Path) -> dict[str, int]:
    """How far the build writing ``path`` (or ``path.partial``) has safely got; works while it runs."""
    path = Path(path)
    if not path.name.endswith(".partial"):
        path = _partial_path(path)
    with _open_partial(path) as f:
        values = [int(v) for v in f["progress"][:]]
    return dict(zip(("inputs", "structures", "nodes", "edges", "failures"), values))


def describe(path: str | Path, failures: bool = False) -> str:
    """A human-readable summary of a cache file (or of an interrupted build's partial file)."""
    path = Path(path)
    if not path.exists() and _partial_path(path).exists():
        path = _partial_path(path)
    if path.name.endswith(".partial"):
        p = read_progress(path)
        return (f"{path}: unfinished build, {p['inputs']} inputs done ({p['structures']} graphs, "
                f"{p['failures']} failed); re-run the build to resume it")
    cache = GraphCache(path, in_memory=False)
    a = cache.attrs
    size = path.stat().st_size
    n = len(cache)
    versions = json.loads(a.get("tool_versions", "{}"))
    vocabulary = cache.vocabulary
    lines = [
        f"{path}",
        f"  format          {a['format']}, schema {a['schema_version']}, complete",
        f"  created         {a.get('created')} by {a.get('tool')}",
        "  tools           " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"  cutoff          {cache.cutoff:g} Å",
        f"  vocabulary      {len(vocabulary)} elements ({vocabulary[0]}..{vocabulary[-1]})",
        f"  sources         {a.get('sources_sha256')} (sha256 over the source files)",
        f"  structures      {n}  ({int(a['n_nodes'])} atoms, {int(a['n_edges'])} edges; "
        f"{int(a['n_nodes']) / max(n, 1):.1f} atoms and {int(a['n_edges']) / max(n, 1):.1f} edges per structure)",
        f"  failed          {int(a['n_failed'])}",
        f"  file size       {size / 1e6:.2f} MB, {size / max(n, 1):.0f} bytes per structure "
        f"({cache.nbytes / 1e6:.1f} MB uncompressed)",
    ]
    if cache.labels is not None:
        for k, name in enumerate(cache.label_names):
            v = cache.labels[:, k]
            ok = v[np.isfinite(v)]
            stats = f"min {ok.min():.4g}, median {np.median(ok):.4g}, max {ok.max():.4g}" if ok.size else "all missing"
            lines.append(f"  label {name:<9} {stats} ({v.size - ok.size} missing)")
    else:
        lines.append("  labels          none")
    if failures:
        lines += [f"  failed {i}: {reason}" for i, reason in cache.failures]
    cache.close()
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megnet_pt.cache",
        description="Build MEGNet crystal graphs once into an HDF5 file, and inspect such files.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="convert structures into a graph cache",
        description=(
            "Convert structures into graphs and write them to one HDF5 file. INPUTS may be CIF files, folders "
            "of *.cif, dataset folders (labels.csv with an id column and numeric label columns, plus cif/<id>.cif; "
            "the labels are stored too), pymatgen JSON files (a list of Structure.as_dict(), or of "
            "{'material_id', 'structure'} records as the Materials Project API returns them) or extended-XYZ files "
            "(read with ASE). Structures that fail to convert are listed and the build goes on. The file is written "
            "as OUT.partial and renamed when complete; re-running an interrupted build resumes it."
        ),
    )
    b.add_argument("inputs", nargs="+", type=Path, help="structure files or folders")
    b.add_argument("-o", "--out", type=Path, required=True, help="the cache file to write (e.g. graphs.h5)")
    b.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF, help="neighbour cutoff in Å (default %(default)s)")
    b.add_argument("--workers", type=int, default=1, help="processes building graphs (default %(default)s)")
    b.add_argument("--commit-every", type=int, default=COMMIT_EVERY,
                   help="inputs per flushed chunk; an interrupted build loses at most this many (default %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print what a graph cache holds",
                       description="Print what a graph cache holds and check that it is sound.")
    i.add_argument("path", type=Path)
    i.add_argument("--failures", action="store_true", help="list every input that could not be converted")
    i.add_argument("--verify", action="store_true", help="also read every array, checking chunk checksums")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            report = build_cache(args.inputs, args.out, cutoff=args.cutoff, workers=args.workers,
                                 commit_every=args.commit_every, progress=not args.quiet)
            print(report)
        else:
            print(describe(args.path, failures=args.failures))
            if args.verify:
                GraphCache(args.path, in_memory=False).verify()
                print("  verify          every array read back, checksums and values sound")
    except (CacheError, StructureError, FileNotFoundError) as exc:  # unusable inputs or cache: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so that worker processes
    # unpickle megnet_pt.cache._convert rather than __main__._convert.
    from megnet_pt import cache as _cache

    raise SystemExit(_cache.main())
