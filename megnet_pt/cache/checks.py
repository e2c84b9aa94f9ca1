"""What a reader checks: the header and index on open, the values of every block read, the recorded sha256."""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .format import (
    DISTANCE_TOLERANCE, EDGE_ARRAYS, FORMAT, GRAPH_ARRAYS, NODE_ARRAYS, SCHEMA_VERSION, STRING_ARRAYS, CacheError,
    _attr, _partial_path, _strings, _strings_sha256, array_sha256, header_sha256,
)


def _fail(path: Path, reason: str) -> CacheError:
    return CacheError(f"{path}: {reason}")


@dataclass
class Block:
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
class Index:
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


def check_file(path: Path, f: h5py.File, cutoff: float | None, vocabulary: Sequence[str] | None) -> Index:
    """The header and index of an open cache file, checked (format, version, completeness, counts, pointers, ids)."""
    if _attr(f, "format") != FORMAT:
        raise _fail(path, "not a megnet_pt graph cache (no 'format' attribute)")
    version = _attr(f, "schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(path, f"schema version {version}, this reader understands {SCHEMA_VERSION}: rebuild the cache")
    if not _attr(f, "complete"):
        # a finished build renames its file only once complete: an incomplete one under this name was damaged
        partial = _partial_path(path)
        hint = (f"the interrupted build is in {partial}: re-run it to resume" if partial.exists()
                else "no interrupted build of it is left to resume: delete it and build it again")
        raise _fail(path, f"marked incomplete ({hint})")
    recorded = _attr(f, "header_sha256")
    if recorded is not None and recorded != header_sha256({k: _attr(f, k) for k in f.attrs}):
        raise _fail(path, "corrupt: its attributes (cutoff, vocabulary, counts, checksums) do not match their sha256 "
                         "recorded at build time; delete it and rebuild")
    stored_cutoff = float(_attr(f, "cutoff"))
    if cutoff is not None and not math.isclose(stored_cutoff, float(cutoff), rel_tol=0, abs_tol=1e-9):
        raise _fail(path, 
            f"built with cutoff {stored_cutoff:g} Å, the model needs {float(cutoff):g} Å: "
            f"build a cache with --cutoff {float(cutoff):g}"
        )
    stored_vocabulary = json.loads(_attr(f, "vocabulary"))
    if vocabulary is not None and list(vocabulary) != stored_vocabulary:
        pairs = enumerate(zip(stored_vocabulary, vocabulary))
        first = next((k for k, (a, b) in pairs if a != b), min(len(vocabulary), len(stored_vocabulary)))
        raise _fail(path, 
            f"element vocabulary differs from the model's ({len(stored_vocabulary)} vs {len(vocabulary)} elements, "
            f"first difference at index {first}): node types would index the wrong embeddings; rebuild the cache"
        )
    n = int(_attr(f, "n_structures"))
    arrays = {**GRAPH_ARRAYS, **NODE_ARRAYS, **EDGE_ARRAYS}
    missing = [k for k in (*arrays, "node_ptr", "edge_ptr", *STRING_ARRAYS) if k not in f]
    if missing:
        raise _fail(path, f"corrupt: missing array(s) {', '.join(missing)}")
    label_names = json.loads(_attr(f, "label_names"))
    for name in ("ids", "formulas", *GRAPH_ARRAYS) + (("labels",) if label_names else ()):
        if name not in f or f[name].shape[0] != n:
            raise _fail(path, f"corrupt: array {name} should have {n} rows")
    if label_names and f["labels"].shape[1:] != (len(label_names),):
        raise _fail(path, f"corrupt: labels should have {len(label_names)} columns")
    counts = {"node": int(_attr(f, "n_nodes")), "edge": int(_attr(f, "n_edges"))}
    ptrs = {}
    for kind, names in (("node", NODE_ARRAYS), ("edge", EDGE_ARRAYS)):
        ptr = f[f"{kind}_ptr"][:]
        if ptr.shape != (n + 1,) or ptr[0] != 0 or (np.diff(ptr) < 0).any() or ptr[-1] != counts[kind]:
            raise _fail(path, 
                f"corrupt: {kind}_ptr is not a valid offset array for {n} structures and {counts[kind]} {kind}s"
            )
        for name in names:
            if f[name].shape[0] != counts[kind]:
                raise _fail(path, f"corrupt: array {name} should have {counts[kind]} rows, it has {f[name].shape[0]}")
        ptrs[kind] = ptr
    ids, formulas = _strings(f["ids"]), _strings(f["formulas"])
    if _strings_sha256(ids) != _attr(f, "ids_sha256") or _strings_sha256(formulas) != _attr(f, "formulas_sha256"):
        raise _fail(path, "corrupt: the ids or formulas do not match their checksum")
    if len(set(ids)) != n:
        dup = sorted(i for i, k in Counter(ids).items() if k > 1)
        raise _fail(path, f"corrupt: duplicate ids {', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''}")
    labels = f["labels"][:] if label_names else None
    attrs = {k: _attr(f, k) for k in f.attrs}
    return Index(n, ids, formulas, ptrs["node"], ptrs["edge"], labels, label_names, stored_vocabulary, attrs)

def check_block(path: Path, index: Index, block: Block, first: int) -> None:
    """Values a reader relies on: element indices in the vocabulary, edges within their structure."""
    size = len(index.vocabulary)
    if block.node_type.size and int(block.node_type.max()) >= size:
        raise _fail(path, f"corrupt: element index beyond the {size}-element vocabulary near structure {first}")
    nodes_of_edge = np.repeat(np.diff(block.node_ptr).astype(np.int32), np.diff(block.edge_ptr))
    for name in ("edge_source", "edge_target"):
        v = getattr(block, name)
        if v.size and ((v < 0).any() or (v >= nodes_of_edge).any()):
            raise _fail(path, f"corrupt: {name} points outside its structure near structure {first}")
    if not (np.isfinite(block.edge_dist).all() and np.isfinite(block.pos).all() and np.isfinite(block.lattice).all()):
        raise _fail(path, f"corrupt: non-finite distances, positions or lattices near structure {first}")
    d, cutoff = block.edge_dist.astype(np.float64), float(index.attrs["cutoff"])
    if d.size and (d.min() <= 0 or d.max() > cutoff + DISTANCE_TOLERANCE):
        raise _fail(path, f"corrupt: edge distances outside (0, {cutoff:g}] Å near structure {first}")
    # each edge's distance as its positions, lattice and periodic image give it
    graph_of_edge = np.repeat(np.arange(len(block.node_ptr) - 1), np.diff(block.edge_ptr))
    offset = block.node_ptr[:-1][graph_of_edge]
    shift = np.einsum("ei,eij->ej", block.edge_image.astype(np.float64), block.lattice.astype(np.float64)[graph_of_edge])
    vector = block.pos[block.edge_target + offset].astype(np.float64) + shift - block.pos[block.edge_source + offset]
    if d.size and np.abs(np.linalg.norm(vector, axis=1) - d).max() > DISTANCE_TOLERANCE:
        raise _fail(path, f"corrupt: edge distances disagree with the positions, lattices and images near structure "
                         f"{first}; delete it and rebuild")

def check_digests(path: Path, index: Index, arrays: Block | dict[str, Any]) -> None:
    """Whole arrays against the sha256 recorded at build time (caches built before it was recorded pass)."""
    try:
        recorded = dict(json.loads(index.attrs.get("arrays_sha256") or "{}"))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"corrupt: its record of the arrays' sha256 is damaged ({exc}); delete it and rebuild") from exc
    values = {"node_ptr": index.node_ptr, "edge_ptr": index.edge_ptr, "labels": index.labels}
    values.update(vars(arrays) if isinstance(arrays, Block) else arrays)
    for name, digest in recorded.items():
        if name in values and values[name] is not None and array_sha256(values[name]) != digest:
            raise _fail(path, f"corrupt: array {name} does not match its sha256 recorded at build time; "
                             "delete it and rebuild")
