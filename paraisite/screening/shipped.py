"""The trained LTC ensemble shipped in the repository's ``weights/`` folder: scan.py's and load_ltc_model's default.

A shipped ensemble is a run folder cut down to what screening needs, plus the digest of every file::

    weights/<name>/
        ensemble.json        {"format": "paraisite.shipped", "version": 1, "name", "selection",
                              "files": {relative path: sha256}}
        config.json          the run's config.json, as train.py wrote it
        split<k>/final.pt    the split-k model of that run, byte for byte (paraisite.checkpoint format)
        intervals.json       its interval calibration (scripts/calibrate_intervals.py), once made
        README.md            its model card (scripts/model_card.py), not a digested input

:func:`write_shipped` copies a finished run into that form (``scripts/ship_ensemble.py``);
:func:`check_shipped` checks every digest before anything is read, so a changed byte in a shipped file
is refused, not half-read. :func:`paraisite.screening.ensemble.load_ensemble` loads a shipped folder as
it loads a run folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megnet_pt.checkpoint import CheckpointError
from megnet_pt.download import sha256_file

from ..training.rundir import RunDir

FORMAT = "paraisite.shipped"
VERSION = 1
MANIFEST = "ensemble.json"
WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_NAME = "ltc_fe_togo15_log10_clip10"


def default_models() -> Path:
    """The shipped ensemble scan.py and :func:`paraisite.load_ltc_model` use unless told otherwise."""
    return WEIGHTS / DEFAULT_NAME


def is_shipped(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def check_shipped(folder: str | Path) -> dict[str, Any]:
    """The manifest of the shipped ensemble in ``folder``, once every file it lists has the sha256 it lists."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); take the file again from the repository") from exc
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION
            or not isinstance(manifest.get("files"), dict) or manifest.get("selection") not in ("best", "final")):
        raise CheckpointError(f"{path}: not a shipped ParAIsite ensemble (format {FORMAT} v{VERSION})")
    for name, expected in manifest["files"].items():
        member = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: lists {name!r}, outside its folder")
        if not member.is_file():
            raise CheckpointError(f"{member}: missing from the shipped ensemble; take it again from the repository")
        if sha256_file(member) != expected:
            raise CheckpointError(f"{member}: sha256 differs from the one {MANIFEST} lists: the file was changed "
                                  "or damaged; take it again from the repository (git checkout -- weights/)")
    models = sorted(n for n in manifest["files"] if n.endswith(".pt"))
    if not models:
        raise CheckpointError(f"{path}: lists no model files")
    return manifest


def write_shipped(run_dir: str | Path, out: str | Path, selection: str = "final") -> dict[str, Any]:
    """Copy the ``selection`` models of every split of the finished run ``run_dir`` into ``out`` (a new folder)."""
    run, out = RunDir(run_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first (a shipped ensemble is written whole, never merged)")
    checkpoints = run.finished_checkpoints(selection)
    if not run.config_path.is_file():
        raise CheckpointError(f"{run.path}: no config.json; a shipped ensemble carries the config of its run")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {"config.json": run.config_path}
    files |= {f"split{k}/{selection}.pt": path for k, path in checkpoints}
    for name, source in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / name)
    manifest = {"format": FORMAT, "version": VERSION, "name": out.name, "selection": selection,
                "files": {name: sha256_file(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out)
    return manifest


def list_file(folder: str | Path, name: str) -> None:
    """Add ``folder/name`` (made after the ensemble was shipped, e.g. intervals.json) to the manifest, digested."""
    folder = Path(folder)
    manifest = check_shipped(folder)
    manifest["files"][name] = sha256_file(folder / name)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
