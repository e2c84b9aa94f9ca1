"""HDF5 graph cache: crystal graphs built once, read back fast.

Turning a CIF into a graph (parse, neighbour search) costs more than the model
on small cells, and screening reads the same tens of thousands of structures
many times. ``build_cache`` converts the inputs once into one HDF5 file;
``GraphCache`` reads it back as PyG ``Data`` objects or ``Batch``es.
This file is the format; ``writer``, ``reader`` and ``cli`` beside it use it.

File layout (schema version 1). Root attributes describe the file:

    format, schema_version, complete     what this is, and whether the build finished
    cutoff                               neighbour cutoff (Å) the graphs were built with
    vocabulary                           JSON list of element symbols; node_type indexes it
    label_names                          JSON list, the columns of ``labels``
    sources_sha256                       one checksum over every source file (names + contents)
    tool, tool_versions, created         what wrote it, and when
    n_structures, n_nodes, n_edges, n_failed, ids_sha256, formulas_sha256
    arrays_sha256                        JSON {array: sha256 of its values}, checked by GraphCache.verify
    header_sha256                        sha256 of the attributes above (HEADER_KEYS), checked on open

Arrays are contiguous, chunked and compressed (gzip + shuffle) with a fletcher32
checksum per chunk, so a damaged chunk fails loudly on read; the sha256 of
every numeric array catches what the chunk checksums cannot (a damaged chunk
index), and every read checks the values a model relies on (element indices,
edges within their structure, and each distance against the one its
positions, lattice and periodic image give). S structures,
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

A build writes ``<out>.partial`` first, with a ``progress`` array, and renames
the compacted file to ``<out>`` when complete (``writer.py``).
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .. import __version__
from ..elements import ELEMENTS

if TYPE_CHECKING:
    from ..structures import StructureInputs

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
# Every numeric array has its sha256 in the ``arrays_sha256`` attribute (JSON): fletcher32 covers each chunk's
# bytes, not HDF5's index of the chunks, so a damaged index could read other bytes undetected.
DIGESTED_ARRAYS = (*GRAPH_ARRAYS, *NODE_ARRAYS, *EDGE_ARRAYS, "node_ptr", "edge_ptr", "labels")
# ... and the attributes a reader relies on have theirs, in ``header_sha256``
HEADER_KEYS = ("format", "schema_version", "cutoff", "vocabulary", "label_names", "sources_sha256", "n_structures",
               "n_nodes", "n_edges", "n_failed", "ids_sha256", "formulas_sha256", "arrays_sha256")
DISTANCE_TOLERANCE = 1e-3  # Å: a stored distance against the one its positions, lattice and image give


class CacheError(ValueError):
    """A graph cache is unusable, or cannot be built; the message names the file and the reason."""



def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")



def _tool_versions() -> dict[str, str]:
    import pymatgen.core

    import torch

    return {
        "megnet_pt": __version__,
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
        "tool": f"megnet_pt.cache (megnet_pt {versions['megnet_pt']})",
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


def array_sha256(values: np.ndarray | h5py.Dataset, rows: int = 1 << 20) -> str:
    """sha256 of an array's values (C order, little-endian), read a slice of ``rows`` at a time."""
    digest = hashlib.sha256()
    for a in range(0, values.shape[0], rows):
        part = np.asarray(values[a : a + rows])
        digest.update(np.ascontiguousarray(part.astype(part.dtype.newbyteorder("<"), copy=False)))
    return digest.hexdigest()


def header_sha256(attrs: dict[str, Any]) -> str:
    """sha256 of the ``HEADER_KEYS`` attributes, as JSON (numbers as Python numbers)."""
    values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items() if k in HEADER_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


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
    if path.is_file() and not h5py.is_hdf5(path):
        with open(path, "rb") as f:
            start = f.read(8)
        if start != b"\x89HDF\r\n\x1a\n"[: len(start)] or not start:  # not even the start of an HDF5 file
            hint = ("damaged, or written by something else" if path.suffix.lower() in (".h5", ".hdf5") else
                    f"to cache structure files: python -m megnet_pt.cache build {path} -o graphs.h5")
            raise CacheError(f"{path}: not a graph cache (not an HDF5 file; {hint})")
    try:
        return h5py.File(path, "r", locking="best-effort", **kwargs)
    except OSError as exc:
        raise CacheError(
            f"{path}: cannot be opened as HDF5, the file is truncated or corrupt ({exc}); delete it and rebuild"
        ) from exc


