"""``python -m megnet_pt.cache``: build a graph cache, or say what one holds (and check it)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..graph import DEFAULT_CUTOFF, StructureError
from ..interrupt import Interrupted, os_error, stop_on_signals
from ..materials_project import PAPER_FIELDS, MaterialsProjectError, download
from ..predict import positive_int
from .format import COMMIT_EVERY, CacheError, _open_partial, _partial_path
from .reader import GraphCache
from .workers import cpu_cores
from .writer import build_cache, check_output


def comma_list(text: str) -> list[str]:
    """``"a,b,"`` -> ``["a", "b"]``: a command-line list of names."""
    return [name for name in text.split(",") if name]


def mp_folder(out: Path) -> Path:
    """Where ``--from-mp`` keeps the records it downloads for the cache ``out``."""
    return out.with_name(out.name + ".mp")


def read_progress(path: str | Path) -> dict[str, int]:
    """How far the build writing ``path`` (or ``path.partial``) has safely got; works while it runs."""
    path = Path(path)
    if not path.name.endswith(".partial"):
        path = _partial_path(path)
    with _open_partial(path) as f:
        values = [int(v) for v in f["progress"][:]]
    return dict(zip(("inputs", "structures", "nodes", "edges", "failures"), values))


def describe(path: str | Path, failures: bool = False) -> str:
    """A human-readable summary of a cache file (or of an interrupted build's partial file)."""
    path = Path(path)
    if not path.exists() and _partial_path(path).exists():
        path = _partial_path(path)
    if path.name.endswith(".partial"):
        p = read_progress(path)
        return (f"{path}: unfinished build, {p['inputs']} inputs done ({p['structures']} graphs, "
                f"{p['failures']} failed); re-run the build to resume it")
    cache = GraphCache(path, in_memory=False)
    a = cache.attrs
    size = path.stat().st_size
    n = len(cache)
    versions = json.loads(a.get("tool_versions", "{}"))
    vocabulary = cache.vocabulary
    lines = [
        f"{path}",
        f"  format          {a['format']}, schema {a['schema_version']}, complete",
        f"  created         {a.get('created')} by {a.get('tool')}",
        "  tools           " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"  cutoff          {cache.cutoff:g} Å",
        f"  vocabulary      {len(vocabulary)} elements ({vocabulary[0]}..{vocabulary[-1]})",
        f"  sources         {a.get('sources_sha256')} (sha256 over the source files)",
        f"  structures      {n}  ({int(a['n_nodes'])} atoms, {int(a['n_edges'])} edges; "
        f"{int(a['n_nodes']) / max(n, 1):.1f} atoms and {int(a['n_edges']) / max(n, 1):.1f} edges per structure)",
        f"  failed          {int(a['n_failed'])}",
        f"  file size       {size / 1e6:.2f} MB, {size / max(n, 1):.0f} bytes per structure "
        f"({cache.nbytes / 1e6:.1f} MB uncompressed)",
    ]
    if cache.labels is not None:
        for k, name in enumerate(cache.label_names):
            v = cache.labels[:, k]
            ok = v[np.isfinite(v)]
            stats = f"min {ok.min():.4g}, median {np.median(ok):.4g}, max {ok.max():.4g}" if ok.size else "all missing"
            lines.append(f"  field {name:<9} {stats} ({v.size - ok.size} missing)")
    else:
        lines.append("  fields          none (no numeric or boolean field in the inputs)")
    if failures:
        lines += [f"  failed {i}: {reason}" for i, reason in cache.failures]
    cache.close()
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megnet_pt.cache",
        description="Build MEGNet crystal graphs once into an HDF5 file, and inspect such files.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="convert structures into a graph cache",
        description=(
            "Convert structures into graphs and write them to one HDF5 file. INPUTS may be CIF files, folders "
            "of *.cif, dataset folders (labels.csv with an id column and numeric label columns, plus cif/<id>.cif; "
            "the labels are stored too), pymatgen JSON files (a list of Structure.as_dict(), or of "
            "{'material_id', 'structure'} records as the Materials Project API returns them) or extended-XYZ files "
            "(read with ASE); their numeric and boolean fields are stored beside each structure (booleans as 1/0; "
            "--fields keeps only those named). With --from-mp the structures and their fields come from the "
            "Materials Project (mp-api client, key from MP_API_KEY or --api-key), downloaded first into OUT.mp/. "
            "Structures that fail to convert are listed and the build goes on. The file is written as OUT.partial "
            "and renamed when complete; re-running an interrupted build or download resumes it."
        ),
        epilog=(
            "examples:\n"
            "  python -m megnet_pt.cache build ../shared/data/togo15 -o togo15.h5\n"
            "  python -m megnet_pt.cache build --from-mp \"is_stable=true\" -o mp_stable.h5 --workers 4\n"
            "  python -m megnet_pt.cache build --from-mp \"chemsys=Si-O energy_above_hull=0,0.05\" -o si_o.h5\n"
            "  python -m megnet_pt.cache build records.json -o records.h5 --fields band_gap,is_stable"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("inputs", nargs="*", type=Path, help="structure files or folders (none with --from-mp alone)")
    b.add_argument("-o", "--out", type=Path, required=True, help="the cache file to write (e.g. graphs.h5)")
    b.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF, help="neighbour cutoff in Å (default %(default)s)")
    b.add_argument("--workers", type=positive_int, default=cpu_cores(),
                   help="processes parsing structures and building graphs (default: every core, %(default)s here)")
    b.add_argument("--commit-every", type=positive_int, default=COMMIT_EVERY,
                   help="inputs per flushed chunk; an interrupted build loses at most this many (default %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--fields", type=comma_list, default=None,
                   help="comma-separated fields of the inputs to store (default: every numeric or boolean field)")
    mp = b.add_argument_group("Materials Project (needs pip install mp-api)")
    mp.add_argument("--from-mp", nargs="+", action="extend", metavar="CRITERION",
                    help="download the materials matching these criteria of the client's summary search, name=value: "
                    "is_stable=true, energy_above_hull=0,0.05 (min,max), elements=Si,O, chemsys=Li-Fe-O, "
                    "material_ids=mp-149,mp-13, ...")
    mp.add_argument("--mp-fields", type=comma_list, default=list(PAPER_FIELDS),
                    help="the record fields to download beside each structure (default: %(default)s)")
    mp.add_argument("--api-key", default=None, help="Materials Project API key (default: $MP_API_KEY); never written anywhere")
    mp.add_argument("--mp-endpoint", default=None,
                    help="the API server (default: $MP_API_ENDPOINT, else the official https://api.materialsproject.org)")
    i = sub.add_parser("info", help="print what a graph cache holds",
                       description="Print what a graph cache holds and check that it is sound.")
    i.add_argument("path", type=Path)
    i.add_argument("--failures", action="store_true", help="list every input that could not be converted")
    i.add_argument("--verify", action="store_true",
                   help="also read every array, checking chunk checksums, values and the sha256 recorded at build time")
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            if args.command == "build":
                inputs = list(args.inputs)
                if not inputs and not args.from_mp:
                    parser.error("build: give structure files or folders, or --from-mp CRITERIA")
                if args.from_mp:
                    check_output(args.out, args.cutoff)  # before a download that could take hours
                    folder = mp_folder(args.out)
                    inputs += download(args.from_mp, folder, args.mp_fields, args.api_key, args.mp_endpoint,
                                       progress=not args.quiet)
                    print(f"{folder}: the downloaded records (kept: a rebuild reads them again; delete when done)")
                report = build_cache(inputs, args.out, cutoff=args.cutoff, workers=args.workers,
                                     commit_every=args.commit_every, progress=not args.quiet, fields=args.fields)
                print(report)
            else:
                print(describe(args.path, failures=args.failures))
                if args.verify:
                    GraphCache(args.path, in_memory=False).verify()
                    print("  verify          every array read back, checksums and values sound")
    except (CacheError, StructureError, MaterialsProjectError, FileNotFoundError) as exc:  # unusable inputs or cache: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: one line, what was committed is kept
        print(f"error: {os_error(exc, 'building the graph cache' if args.command == 'build' else 'reading the cache')}",
              file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({exc if isinstance(exc, Interrupted) else 'SIGINT'}): what was committed is kept; re-run "
              "the same command to resume", file=sys.stderr)
        return getattr(exc, "code", 130)
    return 0
