"""Where data and published weights are found: the one ``PARAISITE_HOME`` setting.

``PARAISITE_HOME`` (default ``~/.cache/paraisite``) holds the inputs, laid out as

    $PARAISITE_HOME/data/<dataset>/labels.csv, cif/<id>.cif
    $PARAISITE_HOME/weights/<model name>/state.pt, model.json

The folder may be read-only (tests point it at ``../shared``). Build outputs
(converted checkpoints, graph caches, runs) are never written there: they go to
the current project folder (``weights/``, ``data/``, ``runs/``) unless a path is
given explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PARAISITE_HOME"


def home() -> Path:
    """The folder that holds the input data and published weights."""
    value = os.environ.get(ENV_VAR)
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "paraisite"


def data_dir(name: str | None = None) -> Path:
    d = home() / "data"
    return d / name if name else d


def weights_dir(name: str | None = None) -> Path:
    d = home() / "weights"
    return d / name if name else d


def local_weights_dir() -> Path:
    """Where converted checkpoints are written: ``./weights``."""
    return Path("weights")


def local_data_dir() -> Path:
    """Where graph caches are written: ``./data``."""
    return Path("data")
