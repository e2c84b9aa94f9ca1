"""Run one small protocol on two commits and compare what they write (a redesign must change no result).

    python scripts/check_equivalence.py BEFORE AFTER [--workdir /tmp/equivalence] [--rtol 1e-5] [--allow-added-columns]

Each commit is checked out into ``<workdir>/<commit>`` (``git worktree``) and runs, on the CPU with one
thread (the two commits run side by side):

    train.py --init fe --dataset aflow_agl --splits 2 --epochs 2
    train.py --init fe+af --dataset togo15 --splits 2 --epochs 3 --aflow-run runs/fe_aflow_agl
    train.py --init rw --dataset togo15 --splits 3 --epochs 3 --ensemble
    scan.py $PARAISITE_HOME/data/togo15/cif --models runs/fe+af_togo15 --out scan/togo15_ltc.csv

then every ``results.csv``, ``predictions.csv``, ``split<k>/curve.csv`` (its ``seconds`` column aside) and
the scan CSV are compared, numbers to ``--rtol`` relative, text exactly. A commit whose outputs are
already complete in the workdir is not run again. Exit 0 when everything agrees.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED_COLUMNS = {"seconds"}


def protocol(home: str) -> list[list[str]]:
    return [
        ["train.py", "--init", "fe", "--dataset", "aflow_agl", "--splits", "2", "--epochs", "2", "--no-progress"],
        ["train.py", "--init", "fe+af", "--dataset", "togo15", "--splits", "2", "--epochs", "3",
         "--aflow-run", "runs/fe_aflow_agl", "--no-progress"],
        ["train.py", "--init", "rw", "--dataset", "togo15", "--splits", "3", "--epochs", "3", "--ensemble",
         "--no-progress"],
        ["scan.py", f"{home}/data/togo15/cif", "--models", "runs/fe+af_togo15", "--out", "scan/togo15_ltc.csv",
         "--no-progress"],
    ]


def outputs(folder: Path) -> list[Path]:
    files = sorted(folder.glob("runs/*/results.csv")) + sorted(folder.glob("runs/*/predictions.csv"))
    files += sorted(folder.glob("runs/*/split*/curve.csv")) + [folder / "scan" / "togo15_ltc.csv"]
    return [f.relative_to(folder) for f in files]


def start(commit: str, workdir: Path, home: str) -> subprocess.Popen | None:
    folder = workdir / commit
    if (folder / "DONE").is_file():
        return None
    if not folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True,
                       stdout=subprocess.DEVNULL)
    env = dict(os.environ, PARAISITE_HOME=home, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = " && ".join(" ".join([sys.executable, *cmd]) for cmd in protocol(home)) + " && touch DONE"
    log = open(folder / "protocol.log", "w")
    return subprocess.Popen(["bash", "-c", script], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def close(a: str, b: str, rtol: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) and math.isnan(y):
        return True
    return abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-12


def compare(before: Path, after: Path, rtol: float, allow_added: bool = False) -> list[str]:
    """Problems found; with ``allow_added``, columns only AFTER writes (new metrics) are listed, not counted."""
    problems = []
    files_a, files_b = outputs(before), outputs(after)
    if files_a != files_b:
        problems.append(f"different files: {sorted(set(files_a) ^ set(files_b))}")
    for rel in sorted(set(files_a) & set(files_b)):
        rows_a, rows_b = read(before / rel), read(after / rel)
        if len(rows_a) != len(rows_b):
            problems.append(f"{rel}: {len(rows_a)} rows before, {len(rows_b)} after")
            continue
        worst = 0.0
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
            added = set(rb) - set(ra)
            if set(ra) - IGNORED_COLUMNS != set(rb) - IGNORED_COLUMNS and not (allow_added and set(ra) <= set(rb)):
                problems.append(f"{rel}: columns differ ({sorted(set(ra) ^ set(rb))})")
                break
            if added and i == 0:
                print(f"  {rel}: columns added after: {', '.join(sorted(added))}")
            for key in set(ra) - IGNORED_COLUMNS:
                if not close(ra[key], rb[key], rtol):
                    problems.append(f"{rel} row {i + 2} {key}: {ra[key]!r} before, {rb[key]!r} after")
                try:
                    x, y = float(ra[key]), float(rb[key])
                    if math.isfinite(x) and math.isfinite(y) and x != y:
                        worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
                except ValueError:
                    pass
        print(f"  {rel}: {len(rows_a)} rows, largest relative difference {worst:.2g}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/equivalence"))
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--allow-added-columns", action="store_true",
                        help="AFTER may write more columns (e.g. new metrics); the columns both write are compared")
    args = parser.parse_args()
    home = os.path.abspath(os.environ.get("PARAISITE_HOME", ROOT.parent / "shared"))
    commits = [subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", c], check=True, capture_output=True,
                              text=True).stdout.strip() for c in (args.before, args.after)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(c, start(c, args.workdir, home)) for c in commits]
    for commit, job in jobs:
        if job is not None and job.wait() != 0:
            print(f"{commit}: the protocol failed; see {args.workdir / commit / 'protocol.log'}", file=sys.stderr)
            return 2
    print(f"{commits[0]} against {commits[1]}:")
    problems = compare(args.workdir / commits[0], args.workdir / commits[1], args.rtol, args.allow_added_columns)
    for p in problems[:50]:
        print("DIFFERENT:", p)
    print("same results" if not problems else f"{len(problems)} difference(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
