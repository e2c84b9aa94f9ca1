"""Reading a graph cache: validated on open, graphs as PyG ``Data``, batches by PyG's ``Batch.from_data_list``."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch_geometric.data import Batch, Data

from .checks import Block, Index, check_block, check_digests, check_file
from .format import (
    BLOCK_BYTES, CHUNK_CACHE_BYTES, EDGE_ARRAYS, GRAPH_ARRAYS, IN_MEMORY_BYTES, NODE_ARRAYS, CacheError, _attr, _open_h5,
    _strings,
)


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
        self._all: Block | None = None
        self._datasets: dict[str, h5py.Dataset] | None = None
        with _open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES) as f:
            self._index = self._validate(f, cutoff, vocabulary)
            self.in_memory = self.nbytes <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
            if self.in_memory:
                self._all = self._read(f, [(0, len(self))])
                self._check_digests(self._all)

    # -- validation

    def _fail(self, reason: str) -> CacheError:
        return CacheError(f"{self.path}: {reason}")

    def _validate(self, f: h5py.File, cutoff: float | None, vocabulary: Sequence[str] | None) -> Index:
        try:
            return check_file(self.path, f, cutoff, vocabulary)
        except CacheError:
            raise
        except Exception as exc:  # a damaged file can make h5py raise anything: a missing attribute, an unreadable array
            raise self._fail(f"corrupt ({type(exc).__name__}: {exc}); delete it and rebuild") from exc

    def _check_block(self, block: Block, first: int) -> None:
        check_block(self.path, self._index, block, first)

    def _check_digests(self, arrays: Block | dict[str, Any]) -> None:
        check_digests(self.path, self._index, arrays)

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

    def _read(self, f: h5py.File | dict[str, h5py.Dataset], runs: list[tuple[int, int]]) -> Block:
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
        except Exception as exc:  # e.g. a fletcher32 checksum error, a damaged chunk index
            raise self._fail(f"corrupt: cannot read structures {runs[0][0]}-{runs[-1][1] - 1} ({exc}); "
                             "delete it and rebuild") from exc
        block = Block(node_ptr=local["node"], edge_ptr=local["edge"], **arrays)
        self._check_block(block, runs[0][0])
        return block

    def _load(self, indices: np.ndarray) -> tuple[Block, np.ndarray]:
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
        """Read every array, checking chunk checksums, values and each array's sha256; ``CacheError`` if anything is wrong."""
        f = self._file()
        for start, stop in _spans(len(self), self._structures_per_block(1)):
            self._read(self._datasets, [(start, stop)])
        try:
            self._check_digests({name: f[name] for name in (*GRAPH_ARRAYS, *NODE_ARRAYS, *EDGE_ARRAYS)})
            _strings(f["failures/ids"]), _strings(f["failures/reasons"])
        except CacheError:
            raise
        except Exception as exc:
            raise self._fail(f"corrupt ({type(exc).__name__}: {exc}); delete it and rebuild") from exc

    def __repr__(self) -> str:
        mode = "in memory" if self.in_memory else "streamed"
        return f"GraphCache({str(self.path)!r}, {len(self)} structures, cutoff {self.cutoff:g} Å, {mode})"

    # -- building Data and Batch objects from arrays

    def _data(self, block: Block, j: int, i: int) -> Data:
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

    def _collate(self, block: Block, local: np.ndarray, indices: np.ndarray) -> Batch:
        return Batch.from_data_list([self._data(block, int(j), int(i)) for j, i in zip(local, indices)])


def _identity(x: Any) -> Any:
    return x


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, max(1, size)):
        yield a, min(n, a + size)


