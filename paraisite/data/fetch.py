"""Fetch the datasets and the published weights ahead of time (training does it on first use).

    python -m paraisite.data fetch [--dataset NAME ...] [--base-url URL] [--force] [--no-weights]
    python -m paraisite.data info [--base-url URL]

What is fetched from where, and how each dataset is rebuilt: :mod:`paraisite.data.sources`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megnet_pt.download import DownloadError

from . import paths
from .sources import DATASETS, fetch, fetch_weights, info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paraisite.data",
        description=(
            "Download the datasets (togo15, miyazaki21, aflow_agl) and the published MEGNet weights from their "
            "public sources at pinned commits, verify every file's sha256, and rebuild the datasets as "
            "labels.csv + cif/ under $PARAISITE_HOME (default ~/.cache/paraisite). Training does this by itself "
            "on first use; this command does it ahead of time."
        ),
        epilog=(
            "Without internet: set PARAISITE_HOME to a folder that already holds data/ and weights/, or point "
            "--base-url (or $PARAISITE_BASE_URL) at a mirror laid out as <base>/<ParAIsite|CrabNet|matgl>/<path in "
            "repository>, e.g. --base-url ../shared/upstream."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser(
        "fetch",
        help="download and rebuild what is missing",
        description=(
            "Download the upstream files (reusing verified copies), rebuild the datasets that are missing, "
            "and download the published MEGNet weights if they are missing."
        ),
    )
    fetch_cmd.add_argument("--dataset", action="append", choices=list(DATASETS), metavar="NAME",
                           help=f"a dataset to fetch ({', '.join(DATASETS)}); repeat for several; default: all")
    fetch_cmd.add_argument("--base-url", metavar="URL",
                           help=f"mirror to download from instead of GitHub: http(s)://, file:// or a folder "
                                f"(default: ${paths.BASE_URL_ENV}, else raw.githubusercontent.com at the pinned commits)")
    fetch_cmd.add_argument("--force", action="store_true",
                           help="rebuild datasets even if present (verified downloads are still reused)")
    fetch_cmd.add_argument("--no-weights", action="store_true", help="do not fetch the published MEGNet weights")
    info_cmd = commands.add_parser("info", help="show where the data and weights are and where they come from",
                                   description="Show where the data and weights are, and the URLs they come from.")
    info_cmd.add_argument("--base-url", metavar="URL", help="show the URLs for this mirror")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(info(args.base_url))
        return 0
    try:
        folders = fetch(args.dataset, base_url=args.base_url, force=args.force)
        if not args.no_weights:
            folders["weights"] = fetch_weights(base_url=args.base_url)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


