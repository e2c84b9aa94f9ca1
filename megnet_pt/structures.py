"""Reading crystal structures from files, with errors that name the file."""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from pymatgen.core import Structure

from .graph import StructureError


def read_structure(path: str | Path) -> Structure:
    """Read one structure file (CIF, POSCAR, pymatgen JSON...) with pymatgen.

    Raises ``StructureError`` naming the file when it is missing, empty,
    malformed or holds no structure.
    """
    path = Path(path)
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many kinds on bad input
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StructureError(f"{path}: cannot read a structure ({reason})") from exc
    if len(structure) == 0:
        raise StructureError(f"{path}: the file holds no atomic sites")
    return structure


def find_structure_files(inputs: Iterable[str | Path], pattern: str = "*.cif") -> list[Path]:
    """CIF files named directly, plus every ``*.cif`` in named folders (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob(pattern))
            if not found:
                raise FileNotFoundError(f"{p}: no {pattern} files in this folder")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def structure_id(path: str | Path) -> str:
    """The id of a structure file: its name without the extension."""
    name = Path(path).name
    for ext in (".cif.gz", ".cif", ".json", ".vasp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem
