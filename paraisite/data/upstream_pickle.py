"""Reading ParAIsite's old pickles without running them.

ParAIsite's ``Dataset1.pkl``/``Dataset2.pkl`` are pickled pandas tables of
objects from an old pymatgen that no longer load with a current one. A
restricted unpickler builds inert placeholders for the few pandas and pymatgen
classes involved and refuses every other class, so unpickling runs no code;
the tables' columns and each structure's lattice and sites are then read from
the placeholders.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure


class _Stub:
    """Stand-in for a class named in an old pickle: keeps its arguments and state, runs nothing."""

    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


# The classes ParAIsite's pickles name, stubbed: pandas' table and pymatgen's structure.
_STUBBED = {
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pymatgen.core.structure", "Structure"),
    ("pymatgen.core.lattice", "Lattice"),
    ("pymatgen.core.sites", "PeriodicSite"),
    ("pymatgen.core.composition", "Composition"),
    ("pymatgen.core.periodic_table", "Element"),
}


def _numpy_builders() -> dict[tuple[str, str], Any]:
    """numpy's own array rebuilders (they only copy bytes into arrays), under old and new module names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("builtins", "slice"): slice}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtins; stubs the listed pandas/pymatgen classes; refuses the rest."""

    _numpy = _numpy_builders()

    def __init__(self, file: io.BufferedIOBase, name: str) -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._numpy:
            return self._numpy[(module, name)]
        if (module, name) in _STUBBED:
            return type(name, (_Stub,), {"qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(
            f"{self.name}: the pickle names {module}.{name}, which is not one of the classes this reader "
            f"allows (numpy arrays and {', '.join(sorted(m + '.' + n for m, n in _STUBBED))}); refusing to load it"
        )


def load_pickle(path: str | Path) -> Any:
    """Load an upstream pickle with the restricted unpickler (see ``_RestrictedUnpickler``)."""
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, str(path)).load()


def _expect(obj: Any, qualname: str, where: str) -> Any:
    if not (isinstance(obj, _Stub) and obj.qualname == qualname):
        raise ValueError(f"{where}: expected a {qualname}, found {obj!r}")
    return obj


def table_columns(frame: Any, where: str = "pickle") -> dict[str, list[Any]]:
    """The columns of a stubbed pandas ``DataFrame``: ``{name: values in row order}``.

    A pickled DataFrame holds a block manager: the column index and, per block,
    a 2-D array of values (one row per column) with the column positions it fills.
    """
    state = _expect(frame, "pandas.core.frame.DataFrame", where).state
    manager = _expect(state["_mgr"], "pandas.core.internals.managers.BlockManager", where)
    blocks, axes = manager.args[0], manager.args[1]
    names = [str(n) for n in _expect(axes[0], "pandas.core.indexes.base._new_Index", where).args[1]["data"]]
    columns: dict[str, list[Any]] = {}
    for block in blocks:
        values, placement = _expect(block, "pandas._libs.internals._unpickle_block", where).args[:2]
        positions = range(*placement.indices(len(names))) if isinstance(placement, slice) else np.asarray(placement)
        for position, row in zip(positions, np.asarray(values).reshape(len(positions), -1)):
            columns[names[int(position)]] = list(row)
    lengths = {len(v) for v in columns.values()}
    if set(columns) != set(names) or len(lengths) != 1:
        raise ValueError(f"{where}: the table's blocks do not cover its columns {names}")
    return columns


def rebuild_structure(obj: Any, where: str = "structure") -> Structure:
    """A current pymatgen ``Structure`` from a stubbed old one: lattice matrix, species, fractional coordinates."""
    state = _expect(obj, "pymatgen.core.structure.Structure", where).state
    matrix = np.asarray(_expect(state["_lattice"], "pymatgen.core.lattice.Lattice", where).state["_matrix"], float)
    species, frac = [], []
    for site in state["_sites"]:
        site_state = _expect(site, "pymatgen.core.sites.PeriodicSite", where).state
        composition = _expect(site_state["_species"], "pymatgen.core.composition.Composition", where).state["_data"]
        occupancies = {
            _expect(el, "pymatgen.core.periodic_table.Element", where).args[0]: float(occupancy)
            for el, occupancy in composition.items()
        }
        if len(occupancies) == 1 and list(occupancies.values()) == [1.0]:
            species.append(next(iter(occupancies)))  # fully occupied: the bare element, as first written
        else:
            species.append(occupancies)
        frac.append(np.asarray(site_state["_frac_coords"], float))
    return Structure(Lattice(matrix.reshape(3, 3)), species, np.asarray(frac).reshape(-1, 3))
