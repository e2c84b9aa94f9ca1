"""Build docs/results.md from finished run folders (and copy the CSVs it is built from).

    python scripts/make_results.py [--runs runs] [--out docs/results.md] [--scan scan/aflow_ltc.csv]
                                   [--intro intro.md] [--outro outro.md]

Reads ``<runs>/<init>_<dataset>/`` folders (results.csv, split*/curve.csv,
config.json), writes the tables beside the paper's numbers, the validation
curves of the three steps on one plot (the paper's Fig. 6), the wall time of
each stage, and copies each run's results.csv and curves into docs/results/.
``--scan`` adds a finished ``scan.py`` output: its summary (top table,
correlations), plots and metadata are copied into docs/results/scan/.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paraisite.report import COLUMN_NAMES, aggregate, paper_name, paper_value  # noqa: E402

METRIC_DIGITS = {"mape": 2, "r2": 2, "mae": 2, "rmse": 2}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_run(folder: Path) -> dict | None:
    if not (folder / "results.csv").is_file():
        return None
    config = json.loads((folder / "config.json").read_text())
    curves = {int(d.name[5:]): read_csv(d / "curve.csv") for d in sorted(folder.glob("split*")) if (d / "curve.csv").is_file()}
    return {"folder": folder, "config": config, "results": read_csv(folder / "results.csv"), "curves": curves,
            "name": paper_name(config["init"], config["dataset"])}


def fmt(v: tuple[float, float, int] | None, digits: int) -> str:
    return "" if v is None else f"{v[0]:.{digits}f} ({v[1]:.{digits}f})"


def paper_fmt(p, metric: str) -> str:
    if not p:
        return ""
    return f"{p[0]:.2f} ({p[1]:.2f})" if p[1] is not None else f"{p[0]:g}"


def run_table(run: dict) -> list[str]:
    """Rows for one run: best / final / paper per test set and metric."""
    stats = aggregate(run["results"])
    tests = [t for t in COLUMN_NAMES if any(r["test_dataset"] == t for r in run["results"])]
    cfg = run["config"]
    lines = []
    for metric in ("mape", "r2", "mae", "rmse"):
        for selection in ("best", "final"):
            cells = [fmt(stats.get((selection, t, metric)), METRIC_DIGITS[metric]) for t in tests]
            lines.append(f"| {run['name']} | {metric.upper() if metric != 'r2' else 'R²'} | {selection} | " + " | ".join(cells) + " |")
        paper = [paper_value(cfg["init"], cfg["dataset"], t, metric) for t in tests]
        if any(paper):
            lines.append(f"| {run['name']} | {metric.upper() if metric != 'r2' else 'R²'} | paper | "
                         + " | ".join(paper_fmt(p, metric) for p in paper) + " |")
    header = ["| model | metric | selection | " + " | ".join(COLUMN_NAMES[t] for t in tests) + " |",
              "|---|---|---|" + "---|" * len(tests)]
    return header + lines


def plot_steps(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        curves = list(run["curves"].values())
        n = min(len(c) for c in curves)
        v = np.array([[float(r["val_loss"]) for r in c[:n]] for c in curves])
        epochs = np.arange(1, n + 1)
        # median and quartiles: one diverging split would otherwise hide the other eight on a log axis
        q1, median, q3 = np.quantile(v, [0.25, 0.5, 0.75], axis=0)
        ax.plot(epochs, median, label=f"{run['name']} ({len(curves)} splits)")
        ax.fill_between(epochs, q1, q3, alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation MAPE (median, quartiles)", yscale="log",
           title="Togo15: validation loss of the three steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def wall_time(run: dict) -> str:
    seconds = sum(float(r["seconds"]) for c in run["curves"].values() for r in c)
    epochs = sum(len(c) for c in run["curves"].values())
    return f"{seconds / 60:.1f} min training ({epochs} split-epochs, {seconds / max(epochs, 1):.2f} s per epoch)"


def scan_section(csv_path: Path, dest: Path) -> list[str]:
    """The scan's summary, plots and metadata, copied beside results.md, as markdown lines."""
    base = csv_path.with_suffix("")
    files = {suffix: base.with_name(base.name + suffix) for suffix in (".summary.md", ".ltc.png", ".spread.png", ".scan.json")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        sys.exit(f"--scan {csv_path}: not a finished scan ({', '.join(missing)} missing)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        shutil.copy(f, dest / f.name)
    summary = files[".summary.md"].read_text().rstrip().splitlines()
    rel = dest.relative_to(dest.parent.parent)
    # one heading level below ours; the summary's images sit beside it, now in ``rel``
    summary = ["#" + line if line.startswith("#") else re.sub(r"^(!\[[^]]*\]\()([^/)]+\))", rf"\g<1>{rel}/\g<2>", line)
               for line in summary]
    return summary + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder holding the run folders")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--intro", default=None, help="markdown file whose text opens results.md (setup, differences)")
    parser.add_argument("--outro", default=None, help="markdown file whose text closes results.md (screening, what remains)")
    parser.add_argument("--scan", default=None, help="the CSV a finished scan.py wrote; its summary and plots are included")
    args = parser.parse_args()

    out = Path(args.out)
    data_dir = out.parent / "results"
    data_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in (load_run(f) for f in sorted(Path(args.runs).iterdir()) if f.is_dir()) if r]
    order = ["FEAF", "RWAF", "RWTG15", "FETG15", "FEAFTG15", "RWAFTG15"]
    runs.sort(key=lambda r: (order.index(r["name"]) if r["name"] in order else 99, r["name"]))
    lines = [Path(args.intro).read_text().rstrip() + "\n"] if args.intro else ["# Results\n"]
    lines += ["## Tables (validation, mean (std) over splits)", ""]
    for run in runs:
        cfg = run["config"]
        n_splits = len({r["split"] for r in run["results"]})
        lines += [f"### {run['name']}: `--init {cfg['init']} --dataset {cfg['dataset']}`, "
                  f"{cfg['epochs']} epochs, {n_splits} splits (`{run['folder'].name}`)", ""]
        lines += run_table(run) + ["", f"Wall time: {wall_time(run)}.", ""]
        dest = data_dir / run["folder"].name
        dest.mkdir(exist_ok=True)
        shutil.copy(run["folder"] / "results.csv", dest / "results.csv")
        shutil.copy(run["folder"] / "config.json", dest / "config.json")
        with open(dest / "curves.csv", "w", newline="") as f:
            rows = [{"split": k, **r} for k, c in run["curves"].items() for r in c]
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    steps = [r for r in runs if r["name"] in ("RWTG15", "FETG15", "FEAFTG15")]
    if steps:
        plot_steps(steps, data_dir / "fig6_validation_curves.png")
        lines += ["## Validation curves of the three steps (the paper's Fig. 6)", "",
                  "![validation curves](results/fig6_validation_curves.png)", ""]
    if args.scan:
        lines += scan_section(Path(args.scan), data_dir / "scan")
    if args.outro:
        lines += [Path(args.outro).read_text().rstrip(), ""]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} from {len(runs)} run(s); CSVs in {data_dir}")


if __name__ == "__main__":
    main()
