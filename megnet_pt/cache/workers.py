"""Structures to graphs in worker processes, in input order: each returns plain numpy arrays, or why it failed."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import warnings
from functools import partial
from typing import Any

import numpy as np
import torch

from ..graph import structure_to_graph
from ..interrupt import die_with_parent
from ..structures import StructureEntry


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


def cpu_cores() -> int:
    """The cores this process may run on: the default number of workers.

    Parsing CIFs with pymatgen (about 100-400 structures/s a core) is what
    bounds a build; graph building from parsed structures is several times faster.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # a forked worker inherits the parent's handlers (stop_on_signals raises in them): here SIGTERM, which the pool
    # sends on shutdown, ends it as the pool expects; Ctrl-C is the parent's to handle; and it dies with the parent
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class converter:
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


