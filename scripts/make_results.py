"""Build docs/results.md from finished run folders (and copy the CSVs it is built from).

    python scripts/make_results.py [--runs docs/results runs] [--out docs/results.md] [--scan scan/aflow_ltc.csv]
                                   [--intro intro.md] [--outro outro.md] [--intervals intervals.md]

Reads the run folders in each ``--runs`` folder: ``<init>_<dataset>/`` as
train.py writes it (results.csv, config.json, split*/curve.csv), or its copy
in docs/results/ (curves in one curves.csv), so that runs of earlier sessions
or machines, kept only as those copies, stay in the tables. A run folder's
name met again in a later ``--runs`` folder is merged with the earlier one
split by split (the later wins), so that splits trained on different machines
add up to one run; with other settings it replaces the earlier one.
Writes the tables beside the paper's numbers, the validation curves of the
three steps on one plot (the paper's Fig. 6), the wall time of each stage,
split-by-split tables wherever two runs of one model share splits (e.g. after
a 30- and a 300-epoch AFLOW stage), and copies each run's results.csv and
curves into docs/results/. ``--scan`` adds a finished ``scan.py`` output: its
summary (top table, correlations), plots and metadata are copied into
docs/results/scan/.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paraisite.evaluation.report import (  # noqa: E402
    COLUMN_NAMES, METRIC_TITLES, aggregate, collapsed, paper_name, paper_value, read_csv, write_csv,
)
from paraisite.training.rundir import RunDir, config_differences  # noqa: E402

METRIC_DIGITS = {"mape": 2, "mape_paper_scale": 2, "r2": 2, "mae": 2, "rmse": 2, "sre": 2, "log10_mae": 2, "spearman": 2}


def load_run(folder: Path) -> dict | None:
    """A finished run folder, or its copy made by this script; None for anything else."""
    run = RunDir(folder)
    config = run.read_config()
    if not run.results().is_file() or config is None:
        return None
    if (folder / "curves.csv").is_file():  # the copy: one file, a split column
        curves: dict[int, list[dict[str, str]]] = {}
        for row in read_csv(folder / "curves.csv"):
            curves.setdefault(int(row.pop("split")), []).append(row)
    else:
        curves = {k: read_csv(run.curve(k)) for k in run.splits() if run.curve(k).is_file()}
    return {"folder": folder, "config": config, "results": read_csv(run.results()), "curves": curves,
            "name": paper_name(config["init"], config["dataset"])}


def merge_runs(earlier: dict, later: dict) -> dict:
    """One run from two folders of the same name: split by split, the later wins.

    Splits trained on different machines (runs/ does not outlive one) add up
    to one run when their settings agree; otherwise the later run replaces
    the earlier whole.
    """
    if config_differences(earlier["config"], later["config"]):
        print(f"{later['folder']} replaces {earlier['folder']}: other settings", file=sys.stderr)
        return later
    mine = {int(r["split"]) for r in later["results"]}
    results = [r for r in earlier["results"] if int(r["split"]) not in mine] + later["results"]
    results.sort(key=lambda r: int(r["split"]))  # stable: each split keeps its own row order
    curves = {k: c for k, c in earlier["curves"].items() if k not in mine} | later["curves"]
    return {**later, "results": results, "curves": dict(sorted(curves.items()))}


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
    for metric in ("mape", "mape_paper_scale", "sre", "log10_mae", "spearman", "r2", "mae", "rmse"):
        if not any(key[2] == metric for key in stats):  # runs evaluated before paper_scale.py / these metrics lack them
            continue
        title = METRIC_TITLES[metric]
        for selection in ("best", "final"):
            cells = [fmt(stats.get((selection, t, metric)), METRIC_DIGITS[metric]) for t in tests]
            lines.append(f"| {run['name']} | {title} | {selection} | " + " | ".join(cells) + " |")
        paper = [paper_value(cfg["init"], cfg["dataset"], t, metric) for t in tests]
        if any(paper):
            lines.append(f"| {run['name']} | {title} | paper | " + " | ".join(paper_fmt(p, metric) for p in paper) + " |")
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
        ax.plot(epochs, median, label=f"{run['name']} ({run['folder'].name}, {len(curves)} splits)")
        ax.fill_between(epochs, q1, q3, alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation MAPE (median, quartiles)", yscale="log",
           title="Togo15: validation loss of the three steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def own_mape(run: dict) -> dict[tuple[int, str], float]:
    """Validation MAPE on the run's own dataset, by (split, selection)."""
    own = Path(run["config"]["dataset"]).name
    return {(int(r["split"]), r["selection"]): float(r["mape"]) for r in run["results"] if r["test_dataset"] == own}


def describe(run: dict) -> str:
    cfg = run["config"]
    after = f" after `{Path(cfg['aflow_run']).name}`" if cfg.get("aflow_run") else ""
    clip = f", gradient clipped at {cfg['clip_grad_norm']:g}" if cfg.get("clip_grad_norm") else ""
    holdout = f"; best chosen on {cfg['select_holdout']:.0%} of the training part" if cfg.get("select_holdout") else ""
    return f"`{run['folder'].name}` ({cfg['epochs']} epochs{clip}{after}{holdout})"


def same_splits_tables(runs: list[dict]) -> list[str]:
    """For each model with several runs: their validation MAPE split by split, on the splits they share.

    The runs with the most splits share one table; a run with fewer splits gets
    a table of its own beside them, so that it does not cut theirs down.
    """
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    lines = []
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        sizes = [len(own_mape(r)) for r in group]
        full = {i for i, n in enumerate(sizes) if n == max(sizes)}
        tables = ([full] if len(full) > 1 else []) + [full | {i} for i, n in enumerate(sizes) if n < max(sizes)]
        for table in tables:
            lines += split_table(name, [group[i] for i in sorted(table)])
    return lines


def split_table(name: str, group: list[dict]) -> list[str]:
    """One model's runs, validation MAPE split by split on the splits they all have."""
    mapes = [own_mape(r) for r in group]
    common = sorted(set.intersection(*({k for k, _ in m} for m in mapes)))
    if not common:
        return []
    dataset = COLUMN_NAMES.get(group[0]["config"]["dataset"], group[0]["config"]["dataset"])
    lines = [f"### {name}, the same splits: " + " vs ".join(describe(r) for r in group), "",
             f"Validation MAPE on {dataset}, split by split (splits {', '.join(map(str, common))}).", ""]
    heads = [f"{r['folder'].name} {sel}" for sel in ("best", "final") for r in group]
    lines += ["| split | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for k in common:
        lines.append(f"| {k} | " + " | ".join(f"{m[(k, sel)]:.2f}" for sel in ("best", "final") for m in mapes) + " |")
    cells = []
    for sel in ("best", "final"):
        for m in mapes:
            v = np.array([m[(k, sel)] for k in common])
            cells.append(f"{v.mean():.2f} ({v.std():.2f})")
    return lines + ["| mean (std) | " + " | ".join(cells) + " |", ""]


def glance_table(runs: list[dict]) -> list[str]:
    """Every run's validation MAPE on its own training set: both selections, in W/m/K and on the paper's scale."""
    lines = ["## At a glance: validation MAPE on the training set's own validation parts", "",
             "Mean (std) over the run's splits. `best` is the paper's selection (optimistic), `final` the honest one; "
             "the paper's scale is the axis the paper's numbers were computed on (see above); `-` where a run was "
             "evaluated before that scale was added, or was trained on MIX.", "",
             "| model | run | splits | best | final | best, paper's scale | final, paper's scale | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        cfg = run["config"]
        own = Path(cfg["dataset"]).name
        stats = aggregate(run["results"])
        splits = len({r["split"] for r in run["results"]})
        # a mean over only some of the run's splits would pass for the run's: shown only when every split has it
        cells = [fmt(v, 2) if (v := stats.get((sel, own, metric))) and v[2] == splits else "-"
                 for metric in ("mape", "mape_paper_scale") for sel in ("best", "final")]
        paper = paper_fmt(paper_value(cfg["init"], cfg["dataset"], own, "mape"), "mape")
        lines.append(f"| {run['name']} | {describe(run)} | {splits} | " + " | ".join(cells) + f" | {paper} |")
    return lines + [""]


def wall_time(run: dict) -> str:
    seconds = sum(float(r["seconds"]) for c in run["curves"].values() for r in c)
    epochs = sum(len(c) for c in run["curves"].values())
    return f"{seconds / 60:.1f} min training ({epochs} split-epochs, {seconds / max(epochs, 1):.2f} s per epoch)"


def collapse_line(run: dict) -> list[str]:
    """The splits whose model collapsed (paraisite.evaluation.report.collapsed); nothing for runs scored before that was measured."""
    fallen = collapsed(run["results"], run["config"]["dataset"])
    if not fallen:
        return []
    by_split: dict[int, list[str]] = {}
    for r in fallen:
        by_split.setdefault(int(r["split"]), []).append(f"{r['selection']} (epoch {r['epoch']})")
    shown = "; ".join(f"split {k}: {', '.join(sorted(v))}" for k, v in sorted(by_split.items()))
    return [f"Collapsed (most validation predictions at or below 0 W/m/K): {shown}.", ""]


def scan_section(csv_path: Path, dest: Path) -> list[str]:
    """The scan's summary, plots and metadata, copied beside results.md, as markdown lines."""
    base = csv_path.with_suffix("")
    files = {suffix: base.with_name(base.name + suffix) for suffix in (".summary.md", ".ltc.png", ".spread.png", ".scan.json")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        sys.exit(f"--scan {csv_path}: not a finished scan ({', '.join(missing)} missing)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        if (dest / f.name).resolve() != f.resolve():  # --scan may name the copy in docs/results/scan itself
            shutil.copy(f, dest / f.name)
    summary = files[".summary.md"].read_text().rstrip().splitlines()
    rel = dest.relative_to(dest.parent.parent)
    # one heading level below ours; the summary's images sit beside it, now in ``rel``
    summary = ["#" + line if line.startswith("#") else re.sub(r"^(!\[[^]]*\]\()([^/)]+\))", rf"\g<1>{rel}/\g<2>", line)
               for line in summary]
    return summary + [""]


PAIRED = [("rw_togo15", "fe_togo15", "RWTG15 vs FETG15: random vs published weights, trained on Togo15"),
          ("rw_aflow_agl", "fe_aflow_agl", "RWAF vs FEAF: random vs published weights, the AFLOW stage"),
          ("rw+af_togo15", "fe+af_togo15", "RWAFTG15 vs FEAFTG15: RWAF vs FEAF as the start of the Togo15 stage")]


PAIRED_STEP = [("fe_togo15", "fe_togo15_fast", "FETG15: the published weights trained on Togo15"),
               ("fe_aflow_agl", "fe_aflow_agl_fast", "FEAF: the AFLOW stage"),
               ("fe+af_togo15", "fe+af_togo15_fast", "FEAFTG15: the main job's Togo15 stage")]


def paired_tables(found: dict[str, dict], pairs: list[tuple[str, str, str]] = PAIRED, heading: str =
                  "What the published weights buy, split by split", labels: tuple[str, str] = ("RW", "FE"),
                  intro: str = "") -> list[str]:
    """Two runs of each pair on the same splits, split by split: the difference of each metric (second minus first)."""
    from scipy import stats

    a_label, b_label = labels
    present = [pair for pair in pairs if pair[0] in found and pair[1] in found]
    if not present:
        return []
    lines = [f"## {heading}", "", (intro + " " if intro else "") +
             f"Each pair trained on the same splits (those both have are compared); the difference is {b_label} minus "
             f"{a_label} per split (negative "
             f"MAPE, MAE, RMSE: {b_label} better; positive R²: {b_label} better), its mean (sample std) over splits, how "
             f"many splits {b_label} wins, and the two-sided p of Wilcoxon's signed-rank test on the differences "
             "(`scipy.stats.wilcoxon`). `final` (the last epoch) is the honest selection; `best` is chosen on the "
             "validation part it is scored on.", ""]
    for a_name, b_name, title in present:
        first, second = found[a_name], found[b_name]
        own = Path(second["config"]["dataset"]).name
        lines += [f"### {title} (`{a_name}` vs `{b_name}`, on {own})", "",
                  f"| selection | metric | {a_label} mean (std) | {b_label} mean (std) | {b_label} - {a_label}, mean (std) "
                  f"| {b_label} better on | Wilcoxon p |",
                  "|---|---|---|---|---|---|---|"]
        for selection in ("final", "best"):
            for metric, lower_better in (("mape", True), ("mae", True), ("rmse", True), ("r2", False)):
                a, b = ({int(r["split"]): float(r[metric]) for r in run["results"]
                         if r["test_dataset"] == own and r["selection"] == selection} for run in (first, second))
                splits = sorted(set(a) & set(b))
                x, y = np.array([a[k] for k in splits]), np.array([b[k] for k in splits])
                d = y - x
                wins = int(((d < 0) if lower_better else (d > 0)).sum())
                p = stats.wilcoxon(y, x).pvalue if len(splits) >= 5 and np.any(d != 0) else float("nan")
                digits = METRIC_DIGITS.get(metric, 2)
                lines.append(f"| {selection} | {METRIC_TITLES.get(metric, metric)} | {x.mean():.{digits}f} ({x.std(ddof=1):.{digits}f}) "
                             f"| {y.mean():.{digits}f} ({y.std(ddof=1):.{digits}f}) | {d.mean():+.{digits}f} ({d.std(ddof=1):.{digits}f}) "
                             f"| {wins} of {len(splits)} | {p:.3f} |")
        lines += ["", f"Wall time: {a_label} {wall_time(first)}; {b_label} {wall_time(second)}.", ""]
    return lines


def recipe_section(csv_path: Path, intro: Path | None) -> list[str]:
    """The recipe search's table (``scripts/recipe_search.py --out``), every candidate with its honest numbers."""
    rows = read_csv(csv_path)
    lines = ["## An honest recipe: the search", ""] + ([intro.read_text().rstrip(), ""] if intro else [])
    lines += ["| candidate | selection | inner hold-out MAPE | MAPE | SRE | MAE of log10 | Spearman | R² |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = {"overall": f"**{r['candidate']}** (chosen)", "replicate": f"{r['candidate']} (a seed of a candidate, not "
                "one)"}.get(r["chosen"], r["candidate"])
        name += f" (mean c {r['factor']})" if r.get("factor") else ""
        cells = [f"{float(r[f'val_{m}']):.2f} ({float(r[f'val_{m}_std']):.2f})" for m in ("mape", "sre", "log10_mae",
                                                                                          "spearman", "r2")]
        inner = float(r["inner_mape"])
        lines.append(f"| {name} | {r['selection']} | {'-' if np.isnan(inner) else f'{inner:.2f}'} | " + " | ".join(cells) + " |")
    return lines + ["", f"Per split: `{csv_path.with_suffix('.splits.csv').as_posix()}`.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["runs"], help="folders holding run folders (train.py's runs/, or "
                        "docs/results/ with the copies of earlier runs); a run met again in a later folder is merged with the earlier one, "
                        "split by split, the later winning (replaced whole if its settings differ)")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--intro", default=None, help="markdown file whose text opens results.md (setup, differences)")
    parser.add_argument("--outro", default=None, help="markdown file whose text closes results.md (screening, what remains)")
    parser.add_argument("--scan", default=None, help="the CSV a finished scan.py wrote; its summary and plots are included")
    parser.add_argument("--recipes", default=None, help="the table scripts/recipe_search.py wrote (CSV), included with "
                        "the markdown file --recipes-intro before it")
    parser.add_argument("--recipes-intro", default=None)
    parser.add_argument("--intervals", default=None, help="the figures scripts/calibrate_intervals.py --report wrote "
                        "(Markdown), included as a section")
    args = parser.parse_args()

    out = Path(args.out)
    data_dir = out.parent / "results"
    data_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, dict] = {}
    for parent in map(Path, args.runs):
        for folder in sorted(parent.iterdir()) if parent.is_dir() else []:
            run = load_run(folder) if folder.is_dir() else None
            if run:
                found[folder.name] = merge_runs(found[folder.name], run) if folder.name in found else run
    runs = list(found.values())
    order = ["FEAF", "RWAF", "RWTG15", "FETG15", "FEAFTG15", "RWAFTG15"]
    runs.sort(key=lambda r: (order.index(r["name"]) if r["name"] in order else 99, r["name"], r["folder"].name))
    lines = [Path(args.intro).read_text().rstrip() + "\n"] if args.intro else ["# Results\n"]
    lines += glance_table(runs)
    lines += ["## Tables (validation, mean (std) over splits)", ""]
    for run in runs:
        cfg = run["config"]
        n_splits = len({r["split"] for r in run["results"]})
        clip = f" --clip-grad-norm {cfg['clip_grad_norm']:g}" if cfg.get("clip_grad_norm") else ""
        clip += f" --select-holdout {cfg['select_holdout']:g}" if cfg.get("select_holdout") else ""
        clip += f" --loss {cfg['loss']}" if cfg.get("loss", "mape") != "mape" else ""
        clip += f" --megnet-lr {cfg['megnet_lr']:g}" if cfg.get("megnet_lr") else ""
        clip += f" --swa-epochs {cfg['swa_epochs']}" if cfg.get("swa_epochs") else ""
        clip += f" --freeze-megnet-epochs {cfg['freeze_megnet_epochs']}" if cfg.get("freeze_megnet_epochs") else ""
        clip += " --fast-step" if cfg.get("fast_step") else ""
        lines += [f"### {run['name']}: `--init {cfg['init']} --dataset {cfg['dataset']}{clip}`, "
                  f"{cfg['epochs']} epochs, {n_splits} splits (`{run['folder'].name}`)", ""]
        lines += run_table(run) + ["", f"Wall time: {wall_time(run)}.", ""] + collapse_line(run)
        # written from memory, not copied: a merged run exists nowhere else, and the copy may be the source itself
        dest = data_dir / run["folder"].name
        dest.mkdir(exist_ok=True)
        write_csv(dest / "results.csv", run["results"])
        (dest / "config.json").write_text(json.dumps(run["config"], indent=2) + "\n")
        write_csv(dest / "curves.csv", [{"split": k, **r} for k, c in run["curves"].items() for r in c])
    lines += same_splits_tables(runs)
    lines += paired_tables(found)
    lines += paired_tables(found, PAIRED_STEP, "The fast step against the plain one, split by split", ("plain", "fast"),
                           "The same commands with `--fast-step` (megnet_pt/fast_mlp.cpp: the same model, its float32 sums "
                           "in another order), against the committed runs of the plain step (trained on 2026-11-26 on the "
                           "same machine, by the code of then: the plain step's own sums were ordered otherwise too, so "
                           "these are two samples of the same training, not a bit-for-bit check). The fast AFLOW stage's "
                           "splits 1 and 2 each hold one epoch of about 1,150 s, and splits 7 and 8 one of about 370 s: "
                           "the job was stopped (SIGSTOP) for 19 and 6 minutes of benchmarks; the wall times below "
                           "include them. Splits 1-6 trained on 2026-12-04 from 17:50 UTC, splits 7-9 after a resume at "
                           "20:53 UTC by the code of 19ffdb0, whose conv node without a gradient saves nothing for a "
                           "backward: its outputs are bit for bit those of before (checked on an AFLOW batch).")
    steps = [r for r in runs if r["name"] in ("RWTG15", "FETG15", "FEAFTG15")
             and r["config"].get("loss", "mape") == "mape" and not r["config"].get("megnet_lr")
             and not r["config"].get("swa_epochs") and not r["config"].get("freeze_megnet_epochs")
             and not r["config"].get("fast_step")]  # the paper's three steps, not the recipes off it
    if steps:
        plot_steps(steps, data_dir / "fig6_validation_curves.png")
        lines += ["## Validation curves of the three steps (the paper's Fig. 6)", "",
                  "![validation curves](results/fig6_validation_curves.png)", ""]
    if args.recipes:
        lines += recipe_section(Path(args.recipes), Path(args.recipes_intro) if args.recipes_intro else None)
    if args.scan:
        lines += scan_section(Path(args.scan), data_dir / "scan")
    if args.intervals:
        text = Path(args.intervals).read_text().rstrip().split("\n")
        lines += ["#" + line if line.startswith("# ") else line for line in text if not line.startswith("<!--")]
        lines += ["", f"(From [{Path(args.intervals).name}](results/{Path(args.intervals).name}).)", ""]
    if args.outro:
        lines += [Path(args.outro).read_text().rstrip(), ""]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} from {len(runs)} run(s); CSVs in {data_dir}")


if __name__ == "__main__":
    main()
