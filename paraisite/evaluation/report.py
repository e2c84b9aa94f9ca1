"""Run reports: results.csv, summary.md beside the paper's numbers, and PNG plots."""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("mape", "mae", "rmse", "r2", "mape_paper_scale", "sre", "log10_mae", "spearman")  # paper_scale.py; metrics.py
METRIC_TITLES = {"mape": "MAPE", "r2": "R²", "mae": "MAE", "rmse": "RMSE", "mape_paper_scale": "MAPE, paper's scale",
                 "sre": "SRE", "log10_mae": "MAE of log10", "spearman": "Spearman"}
COLUMN_NAMES = {"togo15": "Togo15", "miyazaki21": "Miyazaki2021", "mix": "MIX", "aflow_agl": "AFLOW"}
_INIT_PREFIX = {"rw": "RW", "fe": "FE", "fe+af": "FEAF", "rw+af": "RWAF"}
_DATASET_SUFFIX = {"togo15": "TG15", "miyazaki21": "MZ21", "mix": "MIX", "aflow_agl": "AF"}

# PCCP 2026 supplement, Table S2: validation MAPE, mean (std) over nine splits; row = model, column = test set.
PAPER_MAPE = {
    "RWTG15": {"togo15": (0.55, 0.20), "miyazaki21": (2.24, 1.15), "mix": (1.57, 0.64), "aflow_agl": (2.28, 1.12)},
    "RWMZ21": {"togo15": (0.50, 0.08), "miyazaki21": (0.38, 0.05), "mix": (0.43, 0.05), "aflow_agl": (0.48, 0.04)},
    "RWMIX": {"togo15": (0.70, 0.15), "miyazaki21": (0.75, 0.14), "mix": (0.73, 0.11), "aflow_agl": (1.10, 0.56)},
    "RWAF": {"togo15": (0.58, 0.33), "miyazaki21": (1.13, 0.28), "mix": (0.92, 0.27), "aflow_agl": (0.65, 0.33)},
    "FETG15": {"togo15": (0.53, 0.21), "miyazaki21": (3.20, 2.55), "mix": (2.14, 1.50), "aflow_agl": (3.27, 3.96)},
    "FEMZ21": {"togo15": (0.50, 0.08), "miyazaki21": (0.37, 0.08), "mix": (0.42, 0.05), "aflow_agl": (0.49, 0.09)},
    "FEMIX": {"togo15": (0.69, 0.15), "miyazaki21": (0.73, 0.13), "mix": (0.71, 0.12), "aflow_agl": (0.97, 0.20)},
    "FEAF": {"togo15": (0.55, 0.38), "miyazaki21": (1.18, 0.27), "mix": (0.93, 0.26), "aflow_agl": (0.61, 0.34)},
    "FEAFTG15": {"togo15": (0.28, 0.10), "miyazaki21": (1.27, 0.39), "mix": (0.88, 0.24), "aflow_agl": (0.66, 0.18)},
    "FEAFMZ21": {"togo15": (0.56, 0.13), "miyazaki21": (0.64, 0.21), "mix": (0.61, 0.15), "aflow_agl": (0.65, 0.07)},
    "FEAFMIX": {"togo15": (0.34, 0.13), "miyazaki21": (0.69, 0.25), "mix": (0.55, 0.17), "aflow_agl": (0.65, 0.08)},
    "RWAFTG15": {"togo15": (0.43, 0.39), "miyazaki21": (1.32, 0.44), "mix": (0.96, 0.33), "aflow_agl": (0.83, 0.37)},
}
# Tables S3-S5, Togo15 column (R^2 with its std; MAE and RMSE in W/m/K, means only).
PAPER_TOGO15_OTHER = {
    "RWTG15": {"r2": (0.21, 0.61), "mae": (75.4, None), "rmse": (152.5, None)},
    "FETG15": {"r2": (0.40, 0.47), "mae": (79.8, None), "rmse": (162.5, None)},
    "FEAFTG15": {"r2": (0.85, 0.16), "mae": (1.24, None), "rmse": (1.77, None)},
}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically (temporary name, then rename); a column some rows lack is left empty there."""
    if not rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collapsed(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    r"""The rows of ``dataset``'s own validation part where most predictions are at or below 0 W/m/K.

    That is a collapsed model, not a poor one: its outputs fell to where the
    back-transform :math:`10^{z\sigma+\mu} - 1` is flat at -1 W/m/K, so the MAPE
    (then :math:`1 + 1/y` for every structure) has almost no gradient and training
    barely moves. It happens in the AFLOW stage of the paper's protocol (upstream's
    loss has the same flat region); see docs/results.md.
    """
    return [r for r in rows if r["test_dataset"] == dataset and r.get("share_nonpositive") not in (None, "")
            and float(r["share_nonpositive"]) > 0.5]


def paper_name(init: str, dataset: str) -> str:
    """The paper's model name, e.g. ('fe+af', 'togo15') -> 'FEAFTG15'."""
    return _INIT_PREFIX.get(init, init.upper()) + _DATASET_SUFFIX.get(dataset, Path(dataset).name.upper())


def paper_value(init: str, dataset: str, test_dataset: str, metric: str) -> tuple[float, float | None] | None:
    name = paper_name(init, dataset)
    if metric in ("mape", "mape_paper_scale"):  # the paper's MAPE is on its own scale (paper_scale.py)
        return PAPER_MAPE.get(name, {}).get(test_dataset)
    if test_dataset == "togo15":
        return PAPER_TOGO15_OTHER.get(name, {}).get(metric)
    return None


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(selection, test_dataset, metric) -> (mean, population std, number of splits)."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        for m in METRICS:
            if row.get(m) not in (None, ""):  # results of older runs, or of runs with no such number, lack some
                values[(row["selection"], row["test_dataset"], m)].append(float(row[m]))
    return {key: (float(np.mean(v)), float(np.std(v)), len(v)) for key, v in values.items()}


def _fmt(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ({std:.{digits}f})" if std is not None else "")


def summary_markdown(rows: list[dict[str, Any]], init: str, dataset: str, hardware: str = "",
                     select_holdout: float | None = None, off_paper: dict[str, Any] | None = None,
                     fast_step: bool = False) -> str:
    """Mean (std) over splits for each selection and test set, beside the paper's numbers.

    ``off_paper``: the settings of the run that are not the paper's (named in a line of their own); ``fast_step``:
    trained with :mod:`megnet_pt.fast` (said in a line of its own).
    """
    stats = aggregate(rows)
    name = paper_name(init, dataset)
    tests = sorted({r["test_dataset"] for r in rows}, key=lambda t: list(COLUMN_NAMES).index(t) if t in COLUMN_NAMES else 99)
    n_splits = len({r["split"] for r in rows})
    lines = [
        f"# {name}: init `{init}`, trained on `{dataset}`",
        "",
        f"{n_splits} split(s); validation metrics in original units (W/m/K), mean (std over splits, population).",
        ("`best`: the epoch with the lowest validation loss, selected on the very data it is scored on (the paper's protocol, optimistic)."
         if not select_holdout else
         f"`best`: the epoch with the lowest loss on {select_holdout:.0%} of the training part, held out from training "
         "(not the paper's protocol; honest: the validation data choose nothing)."),
        "`final`: the model after the last epoch (honest: nothing is selected on the validation data).",
        "The target scaler is fitted on each split's training part only.",
        "",
    ]
    if off_paper:
        lines[-1:-1] = ["Not the paper's settings: " + ", ".join(f"{k} {v}" for k, v in off_paper.items()) + "."]
    if fast_step:
        lines[-1:-1] = ["Trained with the fast step (`--fast-step`, megnet_pt/fast_mlp.cpp): the same model, its float32 "
                        "sums in another order than the plain step's."]
    if hardware:
        lines += [hardware, ""]
    for metric, digits in (("mape", 3), ("mape_paper_scale", 3), ("sre", 3), ("log10_mae", 3), ("spearman", 3),
                           ("r2", 3), ("mae", 2), ("rmse", 2)):
        if not any(key[2] == metric for key in stats):
            continue
        if metric == "mape_paper_scale":
            lines += ["## MAPE on the paper's scale", "",
                      "The same predictions scored as upstream scored them: labels and predictions standardised with "
                      "their own dataset's scaler and turned back with the training module's (AFLOW's for +af models); "
                      "see paraisite/evaluation/paper_scale.py. This is the scale of the paper's MAPE, not an error in W/m/K.", ""]
        elif metric in ("sre", "log10_mae", "spearman"):
            lines += [{"sre": "## SRE (symmetric relative error, 2|p - y| / (|p| + |y|), Matbench Discovery's)",
                       "log10_mae": "## MAE of log10 (predictions floored at 1e-3 W/m/K)",
                       "spearman": "## Spearman rank correlation"}[metric], ""]
        else:
            lines += [f"## {metric.upper() if metric != 'r2' else 'R^2'}", ""]
        lines += ["| selection | " + " | ".join(COLUMN_NAMES.get(t, t) for t in tests) + " |",
                  "|---|" + "---|" * len(tests)]
        for selection in ("best", "final"):
            cells = [_fmt(*stats[(selection, t, metric)][:2], digits) if (selection, t, metric) in stats else "" for t in tests]
            lines.append(f"| {selection} | " + " | ".join(cells) + " |")
        paper = [paper_value(init, dataset, t, metric) for t in tests]
        if any(paper):
            # the paper's numbers as printed there: two decimals for MAPE and R^2, as given for MAE and RMSE
            shown = [("" if not p else _fmt(p[0], p[1], 2) if metric in ("mape", "mape_paper_scale", "r2") else f"{p[0]:g}") for p in paper]
            lines.append("| paper | " + " | ".join(shown) + " |")
        lines.append("")
    fallen = collapsed(rows, dataset)
    if fallen:
        lines += ["## Collapsed models", "",
                  "Most of these models' validation predictions are at or below 0 W/m/K (at -1, where the MAPE has "
                  "almost no gradient): they collapsed in training, and their rows above are those of a constant model.", ""]
        lines += [f"- split {r['split']}, {r['selection']} (epoch {r['epoch']}): {float(r['share_nonpositive']):.0%} "
                  "of the predictions <= 0 W/m/K" for r in sorted(fallen, key=lambda r: (int(r["split"]), r["selection"]))]
        lines.append("")
    return "\n".join(lines)


def plot_curves(curves: dict[int, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Validation (and training) MAPE per epoch, mean over splits with a ±1 std band (the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(c) for c in curves.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("val_loss", "validation"), ("train_loss", "training")):
        v = np.array([[float(r[key]) for r in c[:n]] for c in curves.values()])
        mean, std = v.mean(0), v.std(0)
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, mean, label=f"{label} (mean of {len(curves)})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel="MAPE", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_parity(predictions: list[dict[str, Any]], path: Path, title: str) -> None:
    """Predicted vs true LTC on log axes, validation structures of every split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for selection, marker in (("best", "o"), ("final", "x")):
        pts = [(float(r["ltc"]), float(r["predicted"])) for r in predictions if r["selection"] == selection]
        if pts:
            t, p = np.array(pts).T
            ax.scatter(t, np.clip(p, 1e-3, None), s=12, marker=marker, alpha=0.6, label=selection)
    lo, hi = ax.get_xlim()
    lim = (min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1]))
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="true LTC (W/m/K)", ylabel="predicted LTC (W/m/K)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
