"""What the benchmarks share: the machine's load, and the AFLOW set repeated into a large dataset."""
from __future__ import annotations

import csv
from pathlib import Path


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them ("?" where there is none)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def repeated_dataset(folder: Path, work: Path, repeat: int) -> Path:
    """A dataset folder holding the AFLOW set ``repeat`` times, ids suffixed ``__r<k>`` (CIFs are symlinks)."""
    out = work / f"aflow_x{repeat}"
    (out / "cif").mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "formula", "ltc"])
        for k in range(repeat):
            for r in rows:
                new = f"{r['id']}__r{k}"
                writer.writerow([new, r["formula"], r["ltc"]])
                link = out / "cif" / f"{new}.cif"
                if not link.exists():
                    link.symlink_to((folder / "cif" / f"{r['id']}.cif").resolve())
    return out
