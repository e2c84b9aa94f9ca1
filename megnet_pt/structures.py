"""Reading crystal structures from files, with errors that name the file.

``read_structure`` reads one file. ``iter_structures`` / ``collect_structures``
read the inputs of a batch conversion (graph caches): CIF files and folders,
``labels.csv`` dataset folders, pymatgen JSON and extended XYZ.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from .download import sha256_file
from .graph import StructureError, as_structure


def read_structure(path: str | Path) -> Structure:
    """Read one structure file (CIF, POSCAR, pymatgen JSON...) with pymatgen.

    Raises ``StructureError`` naming the file when it is missing, empty,
    malformed or holds no structure.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            target = path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 names the loop this way
            raise StructureError(f"{path}: a symbolic link in a loop (it points back at itself)") from None
        except OSError as exc:
            raise StructureError(f"{path}: a symbolic link to {exc.filename or 'nothing'} ({exc.strerror or 'unreadable'})") from None
        raise StructureError(f"{path}: a symbolic link to {target}, which cannot be read")
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: the file is empty")
    if path.name.lower().endswith(".cif"):
        with open(path, errors="replace") as f:
            blocks = sum(1 for line in f if line[:5].lower() == "data_")
        if blocks > 1:  # pymatgen would silently read the first
            raise StructureError(f"{path}: holds {blocks} structures (data_ blocks); give one structure per file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = Structure.from_file(path)
        except Exception as exc:  # pymatgen raises many kinds on bad input
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # pymatgen says why it dropped a structure in a warning (e.g. occupancies above 1 from overlapping atoms)
            lines = list(dict.fromkeys(line.strip() for w in caught for line in str(w.message).splitlines() if line.strip()))
            why = [line for line in lines if any(k in line.lower() for k in ("occupanc", "exceed", "overlap", "close"))]
            why = why[-1:] or lines[-1:]
            hint = cif_problem(path) if path.name.lower().endswith(".cif") else None
            if hint:  # pymatgen's own words ("integer modulo by zero") do not say what is wrong with the file
                raise StructureError(f"{path}: cannot read a structure: {hint} (pymatgen: {reason})") from exc
            raise StructureError(f"{path}: cannot read a structure ({'; '.join([reason, *why])}"
                                 + ("; atoms on the same site?" if any("occupanc" in w.lower() for w in why) else "")
                                 + ")") from exc
    if len(structure) == 0:
        raise StructureError(f"{path}: the file holds no atomic sites")
    return structure


def cif_problem(path: Path) -> str | None:
    """What is plainly wrong with a CIF that pymatgen could not read: a cell length that is not positive, a
    coordinate that is not a number, no atom sites; None when none of these."""
    text = path.read_text(errors="replace")
    for axis in "abc":
        m = re.search(rf"^\s*_cell_length_{axis}\s+(\S+)", text, flags=re.M | re.I)
        if m:
            try:
                value = float(m.group(1).split("(")[0])
            except ValueError:
                return f"the cell length {axis} is {m.group(1)!r}, not a number"
            if not (math.isfinite(value) and value > 0):
                return f"the cell length {axis} is {m.group(1)} (a cell of zero volume)"
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip().lower().startswith("_atom_site_")]
    if heads:
        rows = [line for line in lines[heads[-1] + 1 :] if line.strip() and not line.strip().startswith(("_", "#", "loop_"))]
        rows = [r for r in rows if not r.strip().lower().startswith("data_")]
        if not rows:
            return "no atom sites"
        if any(re.search(r"(^|\s)[-+]?(nan|inf)(\s|$)", r, flags=re.I) for r in rows):
            return "an atom site has a coordinate that is not a number (nan or inf)"
    return None


def find_structure_files(inputs: Iterable[str | Path], suffix: str = ".cif") -> list[Path]:
    """Files named directly, plus every ``*.cif`` (any case: ``A.CIF`` too) in named folders (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # a symbolic link that leads nowhere (or in a loop) is kept: its row says why it has no structure
            found = sorted(f for f in p.rglob("*") if f.name.lower().endswith(suffix) and (f.is_file() or f.is_symlink()))
            if not found:
                raise FileNotFoundError(f"{p}: no *{suffix} files in this folder")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def printable_name(name: str) -> str:
    r"""A file name that is not valid UTF-8 (``\udcff`` from the file system) written as ``\xff``: one can store it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def structure_id(path: str | Path) -> str:
    """The id of a structure file: its name without the extension (bytes that are not UTF-8 as ``\\xNN``)."""
    name = printable_name(Path(path).name)
    for ext in (".cif.gz", ".cif", ".json", ".vasp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


# ---------------------------------------------------------------------------
# Structure inputs for batch conversion (graph caches).
#
# An input is a CIF file, a folder of CIFs, a dataset folder (``labels.csv`` +
# ``cif/<id>.cif``), a pymatgen JSON file or an extended-XYZ file. Inputs are
# first *listed* (ids, labels, where each structure lives) without parsing any
# CIF, so that duplicate ids are found before work starts and entries can be
# shipped to worker processes; ``StructureEntry.load`` does the parsing.

DATASET_LABELS = "labels.csv"
JSON_SUFFIXES = (".json", ".json.gz")
XYZ_SUFFIXES = (".xyz", ".extxyz")
ID_KEYS = ("material_id", "id", "task_id")
NOT_LABELS = {"id", "formula", "material_id", "task_id", "structure", "reason"}


@dataclass
class StructureEntry:
    """One structure of the inputs: its id, labels, and where to read it from.

    ``data`` is the in-memory record for structures that come from a
    multi-structure file (a ``Structure.as_dict()`` dict or an ASE ``Atoms``);
    it is ``None`` when ``source`` is a file holding just this structure.
    """

    id: str
    source: Path
    data: Any = None
    labels: dict[str, float] = field(default_factory=dict)
    missing: str = ""  # why a record of a multi-structure file holds no structure

    def load(self) -> Structure:
        """Parse the structure; ``StructureError`` (naming id or file) when that fails."""
        if self.missing:
            raise StructureError(f"{self.id}: {self.missing} ({self.source})")
        if self.data is None:
            return read_structure(self.source)
        if isinstance(self.data, dict):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    structure = Structure.from_dict(self.data)
            except Exception as exc:
                raise StructureError(f"{self.id}: not a pymatgen structure dict in {self.source} ({_reason(exc)})") from exc
            if len(structure) == 0:
                raise StructureError(f"{self.id}: the structure has no sites ({self.source})")
            return structure
        return as_structure(self.data, self.id)


@dataclass
class StructureInputs:
    """Everything the inputs hold, listed but not parsed."""

    entries: list[StructureEntry]
    label_names: list[str]
    files: list[tuple[str, Path]]  # (name, path) of every source file, for checksums
    _checksums: list[tuple[str, str]] | None = field(default=None, repr=False)

    def file_checksums(self) -> list[tuple[str, str]]:
        """(name, sha256) of every source file; "missing" for a file that does not exist."""
        if self._checksums is None:
            self._checksums = [(printable_name(name), _sha256(path)) for name, path in self.files]
        return self._checksums

    def sources_sha256(self) -> str:
        """One checksum over the names and contents of every source file, in input order."""
        h = hashlib.sha256()
        for name, digest in self.file_checksums():
            h.update(f"{name}\t{digest}\n".encode())
        return h.hexdigest()

    def duplicate_ids(self) -> list[str]:
        counts = Counter(e.id for e in self.entries)
        return sorted(i for i, n in counts.items() if n > 1)

    def duplicates_message(self) -> str:
        """``""``, or how many ids repeat and where (the first ten)."""
        duplicates = self.duplicate_ids()
        if not duplicates:
            return ""
        where = {i: sorted({str(e.source) for e in self.entries if e.id == i}) for i in duplicates[:10]}
        shown = "; ".join(f"{i} (in {' and '.join(files)})" for i, files in where.items())
        return f"{len(duplicates)} duplicate id(s) in the inputs: {shown}" + (
            f"; and {len(duplicates) - 10} more" if len(duplicates) > 10 else "")


def collect_structures(inputs: Iterable[str | Path] | str | Path, fields: Sequence[str] | None = None) -> StructureInputs:
    """List the structures of the inputs (see ``iter_structures``), in input order.

    Label columns (per-structure properties) are the numeric and boolean
    fields of the inputs, their union in order of first appearance, or just
    ``fields`` when given (each must be found in some input); an entry lacking
    a column gets NaN for it in the cache.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    entries: list[StructureEntry] = []
    files: list[tuple[str, Path]] = []
    label_names: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and (p / DATASET_LABELS).is_file():
            found, names, found_files = _dataset_folder(p)
        elif p.is_file() and p.name == DATASET_LABELS:
            found, names, found_files = _dataset_folder(p.parent)
        elif p.is_dir():
            cifs = find_structure_files([p])
            found = [StructureEntry(structure_id(f), f) for f in cifs]
            names, found_files = [], [(str(f.relative_to(p)), f) for f in cifs]
        elif not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        elif p.name.lower().endswith((".h5", ".hdf5")):
            raise StructureError(f"{p}: is a graph cache (HDF5), not a structure file; scan it with scan.py, or read it "
                                 "with megnet_pt.cache.GraphCache")
        elif p.name.lower().endswith(JSON_SUFFIXES):
            found, names = _pymatgen_json(p)
            found_files = [(p.name, p)]
        elif p.name.lower().endswith(XYZ_SUFFIXES):
            found, names = _extxyz(p)
            found_files = [(p.name, p)]
        else:
            found, names, found_files = [StructureEntry(structure_id(p), p)], [], [(p.name, p)]
        entries.extend(found)
        files.extend(found_files)
        label_names.extend(n for n in names if n not in label_names)
    if fields is not None:
        absent = [f for f in fields if f not in label_names]
        if absent:
            raise StructureError(f"no input has a numeric or boolean field named {', '.join(map(repr, absent))} "
                                 f"(fields found: {', '.join(label_names) or 'none'})")
        label_names = list(dict.fromkeys(fields))
        for e in entries:
            e.labels = {n: v for n, v in e.labels.items() if n in label_names}
    return StructureInputs(entries, label_names, files)


def iter_structures(
    inputs: Iterable[str | Path] | str | Path,
) -> Iterator[tuple[str, Structure | Exception, dict[str, float]]]:
    """Yield ``(id, structure, labels)`` for every structure of the inputs.

    Inputs may be CIF (or other pymatgen-readable) files, folders of ``*.cif``,
    dataset folders holding ``labels.csv`` (an ``id`` column, optionally
    ``formula``, and numeric label columns) and ``cif/<id>.cif``, pymatgen JSON
    files (a list of ``Structure.as_dict()``, a list of
    ``{"material_id", "structure", ...}`` records as the Materials Project API
    returns them, or a ``{id: structure dict}`` mapping) and extended-XYZ files
    (read with ASE; ids from an ``id``/``material_id`` info key, else
    ``<file stem>-<frame>``). A structure that cannot be read is yielded as the
    exception in place of the structure, so one bad file does not stop a scan.
    """
    for entry in collect_structures(inputs).entries:
        try:
            yield entry.id, entry.load(), entry.labels
        except Exception as exc:  # reported to the caller, not raised
            yield entry.id, exc, entry.labels


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return "missing"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_label(value: Any) -> float | None:
    """A label value: a number, a boolean as 1.0 / 0.0; None for anything else (text, containers, null)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def plain_id(name: str) -> bool:
    """Whether ``name`` can name ``<name>.cif`` inside a folder: not empty, one line, no separators, no '..', no outer spaces."""
    return (bool(name) and name.isprintable() and name == name.strip() and name not in (".", "..")
            and "/" not in name and "\\" not in name)


def _dataset_folder(folder: Path) -> tuple[list[StructureEntry], list[str], list[tuple[str, Path]]]:
    """``labels.csv`` rows in file order; every numeric column but id/formula is a label."""
    labels_csv = folder / DATASET_LABELS
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is not part of "id"
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "id" not in columns:
        raise StructureError(f"{labels_csv}: no 'id' column (expected id,formula,<labels...>)")

    def numeric(column: str) -> bool:
        try:
            [float(r[column]) for r in rows if (r[column] or "").strip()]
        except (TypeError, ValueError):
            return False
        return True

    names = [c for c in columns if c not in NOT_LABELS and numeric(c)]
    cif_dir = folder / "cif" if (folder / "cif").is_dir() else folder
    odd = [f"line {line} ({r['id']!r})" for line, r in enumerate(rows, start=2) if not plain_id(r["id"] or "")]
    if odd:
        raise StructureError(f"{labels_csv}: {len(odd)} id(s) are not plain file names (an id names cif/<id>.cif: no path "
                             f"separators, no '..', no white space around it, not empty): {', '.join(odd[:10])}")
    entries, files = [], [(DATASET_LABELS, labels_csv)]
    for r in rows:
        sid = r["id"]
        path = cif_dir / f"{sid}.cif"
        labels = {n: float(r[n]) if (r[n] or "").strip() else math.nan for n in names}
        entries.append(StructureEntry(sid, path, None, labels))
        files.append((str(path.relative_to(folder)), path))
    return entries, names, files


def _pymatgen_json(path: Path) -> tuple[list[StructureEntry], list[str]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise StructureError(f"{path}: cannot read JSON ({_reason(exc)})") from exc
    if isinstance(doc, dict) and ("lattice" in doc or "structure" in doc or any(k in doc for k in ID_KEYS)):
        records = [doc]  # one structure, or one {"material_id", "structure", ...} record
    elif isinstance(doc, dict):
        records = [{"material_id": k, "structure": v} for k, v in doc.items()]
    elif isinstance(doc, list):
        records = doc
    else:
        raise StructureError(f"{path}: expected a list of structures or of {{'material_id', 'structure'}} records")
    entries: list[StructureEntry] = []
    names: list[str] = []
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            entries.append(StructureEntry(f"{structure_id(path)}-{k}", path, missing=f"record {k} is not a structure "
                                          f"or a {{'material_id', 'structure'}} record: {repr(record)[:80]}"))
            continue
        sid = next((str(record[key]) for key in ID_KEYS if record.get(key) is not None), None)
        missing = ""
        if "structure" in record:
            structure = record["structure"]
            labels = {key: _as_label(v) for key, v in record.items() if key not in NOT_LABELS and _as_label(v) is not None}
            if not isinstance(structure, dict):
                missing = str(record.get("reason") or "the record has no structure" if structure is None else
                              f"the record's structure is not a Structure.as_dict() dict ({type(structure).__name__})")
        else:  # a bare Structure.as_dict()
            structure, labels = record, {}
            props = record.get("properties") or {}
            sid = sid or next((str(props[key]) for key in ID_KEYS if props.get(key) is not None), None)
        names.extend(n for n in labels if n not in names)
        entries.append(StructureEntry(sid or f"{structure_id(path)}-{k}", path, structure, labels, missing))
    return entries, names


def _extxyz(path: Path) -> tuple[list[StructureEntry], list[str]]:
    try:
        import ase.io
    except ImportError as exc:
        raise StructureError(f"{path}: reading extended XYZ needs ASE (pip install ase)") from exc
    try:
        frames = ase.io.read(path, index=":", format="extxyz")
    except Exception as exc:
        raise StructureError(f"{path}: cannot read extended XYZ ({_reason(exc)})") from exc
    entries: list[StructureEntry] = []
    names: list[str] = []
    stem = Path(path).name.rsplit(".", 1)[0]
    for k, atoms in enumerate(frames):
        info = dict(atoms.info)
        sid = next((str(info[key]) for key in ID_KEYS if info.get(key) is not None), f"{stem}-{k}")
        labels = {key: _as_label(v) for key, v in info.items() if key not in NOT_LABELS and _as_label(v) is not None}
        # Calculator results (energy, ...) ride on atoms.calc; numeric scalars among them are labels too.
        if atoms.calc is not None:
            for key, v in getattr(atoms.calc, "results", {}).items():
                if key not in labels and _as_label(v) is not None:
                    labels[key] = _as_label(v)
        names.extend(n for n in labels if n not in names)
        atoms.calc = None
        entries.append(StructureEntry(sid, path, atoms, labels))
    return entries, names
