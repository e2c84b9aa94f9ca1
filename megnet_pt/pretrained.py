"""Find, convert and load published MEGNet models by name.

``load_pretrained("MEGNet-MP-2018.6.1-Eform")`` looks, in order, for

1. a converted checkpoint ``weights/<name>.pt`` (in the current folder) whose
   recorded source hashes still match the published files, if those are present;
2. the published files ``<published_dir>/{state.pt,model.json}`` (default
   ``$MEGNET_PT_HOME/weights/<name>/``), converted on the fly and the result
   saved to ``weights/<name>.pt``;
3. the published files in a local mirror (``base_url`` or ``$MEGNET_PT_BASE_URL`` a folder or ``file://``
   URL), read in place and checked by sha256, then step 2;
4. a download of the published files into that folder (see
   ``megnet_pt.download``), then step 2.

Two models are published (``megnet_pt.download.PUBLISHED_WEIGHTS``): ``MEGNet-MP-2018.6.1-Eform``
(formation energy, eV/atom) and ``MEGNet-MP-2019.4.1-BandGap-mfi`` (band gap, eV, at a fidelity:
``model(graphs, state=k)``, k in 0 PBE, 1 GLLB-SC, 2 HSE, 3 SCAN, ``model.config.state_names``).

The converted file always goes to ``weights_dir`` (default ``./weights``),
never beside the published files, which may be read-only.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import paths
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .download import sha256_file
from .model import MEGNet

DEFAULT_MODEL = "MEGNet-MP-2018.6.1-Eform"


def converted_path(name: str, weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir or paths.local_weights_dir()) / f"{name}.pt"


def _sources_match(checkpoint: Path, published: Path) -> bool:
    recorded = read_checkpoint(checkpoint).get("sources", {})
    return all(
        recorded.get(f) == sha256_file(published / f) for f in ("state.pt", "model.json") if (published / f).is_file()
    )


def load_pretrained(name: str = DEFAULT_MODEL, weights_dir: str | Path | None = None, download: bool = True,
                    published_dir: str | Path | None = None, base_url: str | None = None,
                    advice: str | None = None) -> MEGNet:
    """The published model ``name`` as a ``MEGNet`` in eval mode (see the module docstring).

    ``name`` may also be the path of a folder of published files. ``base_url``
    and ``advice`` are passed to the download (a mirror, and what to tell the
    user if it fails).
    """
    if Path(name).name != name:  # a path to a folder of published files: its name names the model
        published_dir, name = published_dir or Path(name), Path(name).name
    checkpoint = converted_path(name, weights_dir)
    published = Path(published_dir) if published_dir is not None else paths.weights_dir(name)
    have_published = (published / "state.pt").is_file() and (published / "model.json").is_file()
    if not have_published:
        from .download import mirrored_weights

        mirrored = mirrored_weights(name, base_url)  # a local mirror is read in place, never copied
        if mirrored is not None:
            published, have_published = mirrored, True
    if checkpoint.is_file():
        try:
            if not have_published or _sources_match(checkpoint, published):
                return load_checkpoint(checkpoint)
            print(f"{checkpoint}: converted from other files than {published}; converting again", file=sys.stderr)
        except CheckpointError as exc:
            print(f"{exc}; converting again", file=sys.stderr)
    if not have_published:
        if not download:
            raise CheckpointError(
                f"published weights {name!r} not found in {published} and no converted checkpoint at {checkpoint}; "
                f"pass the folder of the published files, or allow the download"
            )
        from .download import fetch_published_weights

        published = fetch_published_weights(name, base_url=base_url, folder=published, advice=advice)
    from .convert import convert_published  # here, so that python -m megnet_pt.convert finds no copy of itself

    model, sources = convert_published(published)
    try:
        save_checkpoint(model, checkpoint, name, sources)
    except OSError as exc:  # read-only project folder: use the model, keep going
        print(f"note: could not save {checkpoint} ({exc}); the model was converted in memory", file=sys.stderr)
    return model


def load_model(spec: str | Path) -> MEGNet:
    """A model from a registered name, a converted checkpoint file, or a folder of published files."""
    p = Path(spec)
    if p.is_file():
        return load_checkpoint(p)
    if p.is_dir():
        from .convert import convert_published

        return convert_published(p)[0]
    if str(spec).endswith(".pt"):
        raise CheckpointError(f"{spec}: no such checkpoint file")
    return load_pretrained(str(spec))
