"""Write ``paraisite/data/aflow_manifest.csv`` from a mirror of the upstream files.

GitHub's raw-file server serves files by path but cannot list a folder, so the
dataset fetch cannot discover the 5578 CIF names in ParAIsite's
``main/src/aflow_cif/``. This script reads them from a mirror of the pinned
commit (laid out as ``<mirror>/ParAIsite/<path in repository>``, like
``../shared/upstream``) and writes one row per CIF, ``name,sha256``, sorted by
name: the sha256 for each CIF the AFLOW pinning keeps (the ones the fetch
downloads), empty for the rest, which are listed only because the pinning needs
to know how many CIFs each formula names.

The label files it reads (``TC_AFLOW.pkl``, CrabNet's tables) must match their
pinned sha256, so the manifest always describes the pinned commits.

    python scripts/make_aflow_manifest.py [MIRROR] [--output paraisite/data/aflow_manifest.csv] [--check]
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megnet_pt.download import sha256_file  # noqa: E402
from paraisite.data import sources as data  # noqa: E402


def _pinned_file(mirror: Path, file: data.UpstreamFile) -> Path:
    path = mirror / file.repo.folder / file.path
    if sha256_file(path) != file.sha256:
        raise SystemExit(f"{path}: not the pinned file (sha256 differs from {file.sha256})")
    return path


def make_manifest(mirror: str | Path) -> str:
    """The manifest text for the mirror at ``mirror``."""
    mirror = Path(mirror)
    labels = data.read_aflow_labels(_pinned_file(mirror, data.AFLOW_LABELS_PICKLE))
    table = data.read_crabnet_table(_pinned_file(mirror, t) for t in data.CRABNET_AGL_TABLES)
    folder = mirror / data.PARAISITE.folder / data.AFLOW_CIF_FOLDER
    names = sorted(p.name[: -len(".cif")] for p in folder.glob("*.cif"))
    if not names:
        raise SystemExit(f"{folder}: no CIFs")
    pinned = data.pin_aflow_labels(labels, table, names)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "sha256"])
    for name in names:
        writer.writerow([name, sha256_file(folder / f"{name}.cif") if name in pinned else ""])
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mirror", nargs="?", default=str(ROOT.parent / "shared" / "upstream"),
                        help="mirror of the upstream files (default: ../shared/upstream)")
    parser.add_argument("--output", default=str(ROOT / "paraisite" / "data" / data.MANIFEST))
    parser.add_argument("--check", action="store_true", help="only check that the output is up to date")
    args = parser.parse_args()
    text = make_manifest(args.mirror)
    output = Path(args.output)
    if args.check:
        same = output.is_file() and output.read_text() == text
        print(f"{output}: {'up to date' if same else 'out of date'}")
        return 0 if same else 1
    output.write_text(text)
    rows = text.count("\n") - 1
    print(f"wrote {output}: {rows} CIFs, {sum(1 for l in text.splitlines()[1:] if l.split(',')[1])} with sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
