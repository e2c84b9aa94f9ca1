"""The three lattice-thermal-conductivity datasets: fetched from their public sources, rebuilt, cached.

Each dataset lives in ``$PARAISITE_HOME/data/<name>/`` (see ``paraisite.data.paths``)
as ``labels.csv`` (``id,formula,ltc``, LTC at 300 K in W/m/K) and
``cif/<id>.cif``, one structure per row:

    togo15       95   rocksalt, zinc-blende and wurtzite compounds (Togo/Seko et al. 2015)
    miyazaki21  143   half-Heusler compounds (Miyazaki et al. 2021)
    aflow_agl  3269   AFLOW ICSD entries with their AGL (Debye-Grueneisen) LTC

When a dataset is missing, ``fetch`` (or ``ensure_dataset``, which training
calls) obtains it the way torchvision and PyG datasets do: it downloads the
public upstream files once, at pinned commits, each checked against a pinned
sha256 (``megnet_pt.download``), keeps them in ``$PARAISITE_HOME/raw/`` laid out
as a mirror (``raw/<repository folder>/<path in repository>``), rebuilds the
dataset in a temporary folder and renames it into place only when complete.

How each dataset is rebuilt from the upstream files:

* togo15, miyazaki21: ParAIsite's ``Dataset1.pkl`` and ``Dataset2.pkl`` are
  pickled pandas tables (``mpd_id, TC, formula, structure``) of objects from an
  old pymatgen that no longer work with a current one. They are read by a
  restricted unpickler that builds inert placeholders for the few pandas and
  pymatgen classes involved (and refuses every other class, so unpickling runs
  no code), then each structure is built afresh from its raw lattice matrix
  and each site's species and fractional coordinates, and written with
  pymatgen's ``CifWriter``. The id is the MP id (togo15) or ``hh-<n>``
  (miyazaki21); the formula is the table's; the label is the float as Python
  writes it (``repr``), row order is the table's.
* aflow_agl: ParAIsite stores the AGL labels (``TC_AFLOW.pkl``, a list of 5578
  floats in AFLOW API response order) and the CIFs (``aflow_cif/``, named by
  AFLOW entry) with nothing linking the two. A label is pinned to a CIF when
  its value occurs once in ``TC_AFLOW.pkl``, the same value occurs for exactly
  one formula in CrabNet's AFLOW AGL benchmark table, and exactly one CIF is
  named by that formula (``<formula>_ICSD_<n>``); only those entries are kept,
  sorted by id. The CIFs are copied unchanged; the formula is the reduced
  formula of the structure read from the CIF. GitHub's raw-file server cannot
  list a folder, so the CIF names and the sha256 of each CIF that is
  downloaded come from ``aflow_manifest.csv`` beside this file, made from a
  mirror by ``scripts/make_aflow_manifest.py``.

The command line is ``python -m paraisite.data`` (``paraisite/data/fetch.py``).
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pymatgen.io.cif import CifWriter

from megnet_pt.download import (
    UMASK,
    Repository,
    download,
    download_all,
    fetch_published_weights,
    published_weights_urls,
)
from megnet_pt.structures import read_structure

from . import paths
from .upstream_pickle import load_pickle, rebuild_structure, table_columns

# --------------------------------------------------------------------------
# Upstream sources, pinned

PARAISITE = Repository("ParAIsite", "liudakl", "ParAIsite", "cc0c1ff578cbed186ba930784db2909b0066a80e")
CRABNET = Repository("CrabNet", "anthony-wang", "CrabNet", "457b4d4835737ecbe4dd33e53174bd818bd82143")


@dataclass(frozen=True)
class UpstreamFile:
    """One file of a pinned repository, with the sha256 of its bytes."""

    repo: Repository
    path: str
    sha256: str

    def url(self, base_url: str | None = None) -> str:
        return self.repo.url(self.path, base_url)

    def local(self) -> Path:
        """Where the downloaded copy is kept: ``$PARAISITE_HOME/raw/<folder>/<path>``."""
        return paths.raw_dir() / self.repo.folder / self.path

    def get(self, base_url: str | None = None) -> Path:
        """The verified local copy, downloaded if it is not there yet."""
        dest = self.local()
        if not dest.is_file():
            print(f"downloading {self.url(base_url)}", file=sys.stderr)
        return download(self.url(base_url), dest, self.sha256, advice=paths.download_advice())


TOGO15_PICKLE = UpstreamFile(
    PARAISITE, "main/src/structures_scalers/Dataset1.pkl",
    "5dc07c3eb514883233d87ecc1d23cac7a21546b07e3aabe1543af7fd4091179e",
)
MIYAZAKI21_PICKLE = UpstreamFile(
    PARAISITE, "main/src/structures_scalers/Dataset2.pkl",
    "908616cf2fcf05cdf9b6c6a9f63949f27ba2e24d33c3f55f77a7a0abdb42b66b",
)
AFLOW_LABELS_PICKLE = UpstreamFile(
    PARAISITE, "main/src/structures_scalers/TC_AFLOW.pkl",
    "840047722dc6cb02bd981950f40912235398d2b45e54e809180e794a5849ce42",
)
AFLOW_CIF_FOLDER = "main/src/aflow_cif"
CRABNET_AGL_TABLES = tuple(
    UpstreamFile(CRABNET, f"data/benchmark_data/aflow__agl_thermal_conductivity_300K/{split}.csv", sha)
    for split, sha in (
        ("train", "88e5ccaf4e16ad52c2bc5eff41f19bb97222cf34dc447278fd5a2696bed428a6"),
        ("val", "f09e073ee63bc4c913d6b5d5c44a324385f0ebd84324c9cb5f789ce62e63f36e"),
        ("test", "b3884dcde4ea164d061ffb4b22172d68cedc0777f0dc3ada81d1f81e3a9b4cde"),
    )
)
MANIFEST = "aflow_manifest.csv"

DATASETS: dict[str, str] = {
    "togo15": "95 rocksalt, zinc-blende and wurtzite compounds, phono3py LTC (Togo/Seko et al. 2015)",
    "miyazaki21": "143 half-Heusler compounds (Miyazaki et al., Sci. Rep. 11, 13410, 2021)",
    "aflow_agl": "3269 AFLOW ICSD entries with the AGL (Debye-Grueneisen) LTC, for intermediate pre-training",
}


# --------------------------------------------------------------------------
# Building the datasets


def _write_labels(folder: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate ids in the rebuilt dataset: {dup[:5]}")
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "formula", "ltc"])
        writer.writerows(rows)


def _build_from_pickle(source: UpstreamFile, id_prefix: str, folder: Path, base_url: str | None) -> None:
    """togo15 / miyazaki21: one CIF per table row, rebuilt from the raw lattice and sites."""
    path = source.get(base_url)
    columns = table_columns(load_pickle(path), str(path))
    (folder / "cif").mkdir()
    rows = []
    for key, formula, ltc, obj in zip(columns["mpd_id"], columns["formula"], columns["TC"], columns["structure"]):
        id = f"{id_prefix}{int(key)}" if id_prefix else str(key)
        structure = rebuild_structure(obj, f"{path}: {id}")
        (folder / "cif" / f"{id}.cif").write_text(str(CifWriter(structure)))
        rows.append((id, str(formula), repr(float(ltc))))
    _write_labels(folder, rows)


def _build_togo15(folder: Path, base_url: str | None) -> None:
    _build_from_pickle(TOGO15_PICKLE, "", folder, base_url)


def _build_miyazaki21(folder: Path, base_url: str | None) -> None:
    _build_from_pickle(MIYAZAKI21_PICKLE, "hh-", folder, base_url)


def _value_key(value: float) -> float:
    """A label compared at 12 significant digits.

    CrabNet's table holds the same AFLOW numbers as ``TC_AFLOW.pkl`` after a
    float round trip (5.0435300000000005 for 5.04353), so exact equality would
    miss them; AFLOW reports 6 significant digits, far coarser than 12.
    """
    return float(f"{float(value):.12g}")


def cif_formula(name: str) -> str:
    """The formula an AFLOW CIF is named by: ``Ag1Al1S2`` for ``Ag1Al1S2_ICSD_25356``."""
    return name.split("_ICSD_")[0]


def pin_aflow_labels(
    labels: Sequence[float], table: Iterable[tuple[str, float]], cif_names: Iterable[str]
) -> dict[str, float]:
    """``{CIF name: label}`` for the labels that can be pinned to exactly one CIF.

    ``labels`` is ``TC_AFLOW.pkl``, ``table`` CrabNet's ``(formula, value)`` rows,
    ``cif_names`` the names in ``aflow_cif/`` without ``.cif``. A label is kept
    when its value occurs once in ``labels``, for exactly one formula in
    ``table``, and that formula names exactly one CIF.
    """
    count = Counter(_value_key(v) for v in labels)
    formulas: dict[float, set[str]] = defaultdict(set)
    for formula, value in table:
        formulas[_value_key(value)].add(formula)
    cifs: dict[str, list[str]] = defaultdict(list)
    for name in cif_names:
        cifs[cif_formula(name)].append(name)
    pinned: dict[str, float] = {}
    for value in labels:
        key = _value_key(value)
        if count[key] != 1 or len(formulas.get(key, ())) != 1:
            continue
        (formula,) = formulas[key]
        if len(cifs.get(formula, ())) == 1:
            pinned[cifs[formula][0]] = float(value)
    return pinned


def read_manifest() -> dict[str, str]:
    """``{CIF name: sha256}`` for every CIF in upstream ``aflow_cif/`` (sha256 empty for those never downloaded)."""
    text = resources.files("paraisite.data").joinpath(MANIFEST).read_text()
    return {row["name"]: row["sha256"] for row in csv.DictReader(io.StringIO(text))}


def read_crabnet_table(files: Iterable[str | Path]) -> list[tuple[str, float]]:
    """CrabNet's AFLOW AGL rows ``(formula, value)``, all splits together."""
    rows = []
    for path in files:
        with open(path, newline="") as f:
            rows += [(r["formula"], float(r["target"])) for r in csv.DictReader(f)]
    return rows


def read_aflow_labels(path: str | Path) -> list[float]:
    labels = load_pickle(path)
    if not isinstance(labels, list) or not all(isinstance(v, float) for v in labels):
        raise ValueError(f"{path}: expected a list of floats")
    return labels


def aflow_cif_file(name: str, sha256: str) -> UpstreamFile:
    return UpstreamFile(PARAISITE, f"{AFLOW_CIF_FOLDER}/{name}.cif", sha256)


def _build_aflow_agl(folder: Path, base_url: str | None) -> None:
    """aflow_agl: pin labels to CIFs, download only the pinned CIFs, copy them unchanged."""
    labels = read_aflow_labels(AFLOW_LABELS_PICKLE.get(base_url))
    table = read_crabnet_table(t.get(base_url) for t in CRABNET_AGL_TABLES)
    manifest = read_manifest()
    pinned = pin_aflow_labels(labels, table, manifest)
    unhashed = [n for n in pinned if not manifest[n]]
    if unhashed:
        raise ValueError(
            f"{MANIFEST} has no sha256 for {len(unhashed)} pinned CIFs (e.g. {unhashed[0]}); "
            "regenerate it with scripts/make_aflow_manifest.py"
        )
    names = sorted(pinned)
    files = [aflow_cif_file(n, manifest[n]) for n in names]
    missing = sum(1 for f in files if not f.local().is_file())
    if missing:
        where = base_url or f"github.com/{PARAISITE.owner}/{PARAISITE.name} at {PARAISITE.commit[:12]}"
        print(f"downloading {missing} AFLOW CIFs from {where}", file=sys.stderr)
    # Verifies the copies already there, downloads the rest.
    download_all(((f.url(base_url), f.local(), f.sha256) for f in files), desc="AFLOW CIFs", advice=paths.download_advice())
    (folder / "cif").mkdir()
    rows = []
    for name, file in zip(names, files):
        cif = folder / "cif" / f"{name}.cif"
        shutil.copyfile(file.local(), cif)
        formula = read_structure(cif).composition.reduced_formula
        rows.append((name, formula, repr(pinned[name])))
    _write_labels(folder, rows)


_BUILDERS = {"togo15": _build_togo15, "miyazaki21": _build_miyazaki21, "aflow_agl": _build_aflow_agl}


# --------------------------------------------------------------------------
# Fetching


def _check_names(names: str | Iterable[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    return names


def _install(built: Path, dest: Path) -> None:
    """Put a complete dataset folder at ``dest`` by renaming, replacing what was there."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        os.replace(dest, old / dest.name)
    os.replace(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch(names: str | Iterable[str] | None = None, base_url: str | None = None, force: bool = False) -> dict[str, Path]:
    """Obtain the datasets ``names`` (default: all three); return ``{name: folder}``.

    A dataset whose ``labels.csv`` is already in place is reused unless
    ``force``; otherwise its upstream files are downloaded (verified copies in
    ``paths.raw_dir()`` are reused, so ``force`` only rebuilds), the dataset is built
    in a temporary folder beside its destination, then renamed into place.
    ``base_url`` names a mirror (default ``$PARAISITE_BASE_URL``, else GitHub).
    """
    names = _check_names(DATASETS if names is None else names)
    base = paths.base_url(base_url)
    folders: dict[str, Path] = {}
    for name in names:
        dest = paths.data_dir(name)
        if (dest / "labels.csv").is_file() and not force:
            folders[name] = dest
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}.", suffix=".partial"))
        try:
            print(f"building {name} in {dest}", file=sys.stderr)
            _BUILDERS[name](build, base)
            os.chmod(build, 0o777 & ~UMASK)  # mkdtemp makes a private folder
            _install(build, dest)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        folders[name] = dest
    return folders


def ensure_dataset(name: str, base_url: str | None = None) -> Path:
    """The folder of dataset ``name``, fetched first if it is not there (what training calls)."""
    (name,) = _check_names([name])
    dest = paths.data_dir(name)
    if (dest / "labels.csv").is_file():
        return dest
    return fetch([name], base_url=base_url)[name]


def sources(name: str, base_url: str | None = None) -> list[str]:
    """The URLs dataset ``name`` is built from (the AFLOW CIFs as their folder)."""
    base = paths.base_url(base_url)
    if name == "togo15":
        return [TOGO15_PICKLE.url(base)]
    if name == "miyazaki21":
        return [MIYAZAKI21_PICKLE.url(base)]
    return [AFLOW_LABELS_PICKLE.url(base), *(t.url(base) for t in CRABNET_AGL_TABLES),
            PARAISITE.url(f"{AFLOW_CIF_FOLDER}/<name>.cif", base)]


def info(base_url: str | None = None) -> str:
    """Where the data and weights are, whether they are there, and where they come from."""
    base = paths.base_url(base_url)
    source = base or "raw.githubusercontent.com at the pinned commits"
    if base and base_url is None:
        source += f" (from ${paths.BASE_URL_ENV})"
    lines = [f"{paths.ENV_VAR} = {paths.home()}", f"source: {source}", ""]
    for name, what in DATASETS.items():
        folder = paths.data_dir(name)
        labels = folder / "labels.csv"
        if labels.is_file():
            with open(labels, newline="") as f:
                state = f"{sum(1 for _ in f) - 1} rows in {folder}"
        else:
            state = f"not fetched (python -m paraisite.data fetch --dataset {name})"
        lines += [f"{name}: {state}", f"  {what}", *(f"  from {u}" for u in sources(name, base))]
    from megnet_pt.download import PUBLISHED_WEIGHTS

    for model in PUBLISHED_WEIGHTS:
        folder = paths.weights_dir(model)
        there = all((folder / f).is_file() for f in PUBLISHED_WEIGHTS[model])
        state = f"in {folder}" if there else "not fetched (python -m paraisite.data fetch)"
        lines += ["", f"weights {model}: {state}",
                  *(f"  from {u}" for u in published_weights_urls(model, base).values())]
    return "\n".join(lines)


def fetch_weights(base_url: str | None = None) -> Path:
    """The published MEGNet weights in ``$PARAISITE_HOME/weights/<name>/``, downloaded when missing."""
    from ..model import PRETRAINED

    return fetch_published_weights(PRETRAINED, base_url=paths.base_url(base_url), folder=paths.weights_dir(PRETRAINED),
                                   advice=paths.download_advice())
