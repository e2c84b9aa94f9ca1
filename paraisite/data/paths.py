"""Where ParAIsite's inputs live: the one ``PARAISITE_HOME`` setting (and its mirror, ``PARAISITE_BASE_URL``).

``PARAISITE_HOME`` (default ``~/.cache/paraisite``) holds the inputs, laid out as

    $PARAISITE_HOME/data/<dataset>/labels.csv, cif/<id>.cif
    $PARAISITE_HOME/weights/<model name>/state.pt, model.json
    $PARAISITE_HOME/raw/                   the upstream files they were built from

The folder may be read-only (tests point it at ``../shared``). Build outputs
(converted checkpoints, graph caches, runs) go to the current folder
(``weights/``, ``data/``, ``runs/``). megnet_pt has settings of its own; these
folders are passed down to it.
"""
from __future__ import annotations

from pathlib import Path

from megnet_pt import download
from megnet_pt.download import resolve_base_url
from megnet_pt.paths import home_folder

ENV_VAR = "PARAISITE_HOME"
BASE_URL_ENV = "PARAISITE_BASE_URL"


def home() -> Path:
    """The folder that holds the input data and published weights."""
    return home_folder(ENV_VAR, "paraisite")


def data_dir(name: str | None = None) -> Path:
    d = home() / "data"
    return d / name if name else d


def weights_dir(name: str | None = None) -> Path:
    d = home() / "weights"
    return d / name if name else d


def raw_dir() -> Path:
    """Downloaded upstream files, kept as a mirror: ``$PARAISITE_HOME/raw``."""
    return home() / "raw"


def base_url(value: str | None = None) -> str | None:
    """The mirror to download from: ``value``, else ``$PARAISITE_BASE_URL``, else None (GitHub)."""
    return resolve_base_url(value, env_var=BASE_URL_ENV)


def use_base_url(value: str | None) -> None:
    """An entry point's ``--base-url``: the mirror for everything this process downloads (``$PARAISITE_BASE_URL``)."""
    download.use_base_url(value, BASE_URL_ENV)


def download_advice() -> str:
    """What to do when a download fails, in this package's settings."""
    return (f"pass --base-url (train.py, scan.py and python -m paraisite.data fetch take it) or set ${BASE_URL_ENV} "
            "to a mirror of the upstream files, "
            f"or set ${ENV_VAR} to a folder that already holds the data and weights (data/<dataset>/labels.csv + "
            f"cif/, weights/<model>/state.pt + model.json; now {home()})")
