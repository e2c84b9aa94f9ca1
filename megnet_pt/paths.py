"""Where megnet_pt finds published weights, and where it writes what it builds.

``MEGNET_PT_HOME`` (default ``~/.cache/megnet_pt``) holds the published files:

    $MEGNET_PT_HOME/weights/<model name>/state.pt, model.json

The folder may be read-only. Build outputs (converted checkpoints, graph
caches) are never written there: they go to the current folder (``weights/``,
``data/``) unless a path is given. Code that embeds megnet_pt passes its own
folders to ``load_pretrained`` instead of setting this variable.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MEGNET_PT_HOME"


def home_folder(env_var: str, name: str) -> Path:
    """``$<env_var>``, else ``$XDG_CACHE_HOME/<name>`` (default ``~/.cache/<name>``)."""
    value = os.environ.get(env_var)
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / name


def home() -> Path:
    """The folder that holds the published weights."""
    return home_folder(ENV_VAR, "megnet_pt")


def weights_dir(name: str | None = None) -> Path:
    d = home() / "weights"
    return d / name if name else d


def local_weights_dir() -> Path:
    """Where converted checkpoints are written: ``./weights``."""
    return Path("weights")


def local_data_dir() -> Path:
    """Where graph caches are written: ``./data``."""
    return Path("data")
