"""The summary of a finished scan: the lowest-LTC materials, distributions, correlations, as markdown and PNG.

One pass over the scan CSV, a chunk at a time: the ``--top`` materials with
the lowest max prediction (the paper's Table S6), histograms of the mean and
of every model's prediction, the spread std/mean against the mean, and with
``correlations`` Pearson's r and its p-value (``scipy.stats.pearsonr``) of the
mean and the variance of the predictions against each descriptor and each
numeric field the inputs carry (``input_<field>`` columns: the Materials
Project's energy_per_atom, band_gap, is_stable as 1/0, ... as the paper's
Tables 1-4), over the materials that have both. With a predicted band gap (``--with-bandgap``), ``band_gap``
is the input's own (the Materials Project's ``input_band_gap``) where it has one and the predicted PBE gap
elsewhere, so that structures from outside the Materials Project are correlated too.
"""
from __future__ import annotations

import csv
import heapq
import math
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .files import ScanPaths
from .properties import BANDGAP_COLUMN, EFORM_COLUMN
from .scan import INPUT_PREFIX

def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(r, two-sided p, n) over the pairs without a NaN; NaN where r is undefined (n < 3 or a constant)."""
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.pearsonr(x[ok], y[ok])
    return float(result.statistic), float(result.pvalue), n


def read_rows(path: Path, chunk: int = 4096) -> Iterator[list[dict[str, str]]]:
    """The rows of a scan CSV, a chunk at a time."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            rows.append(row)
            if len(rows) == chunk:
                yield rows
                rows = []
        if rows:
            yield rows


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows])


HIST_EDGES = np.logspace(-3, 6, 181)  # LTC bins (W/m/K): 10^-3..10^6, the back-transform's ceiling
SPREAD_EDGES = np.logspace(-5, 2, 141)  # std/mean bins


@dataclass
class Summary:
    rows: int = 0
    predicted: int = 0
    errors: int = 0
    warned: int = 0
    impossible: int = 0  # rows where a model predicts <= 0 W/m/K: flagged, never ranked
    top: list[dict[str, str]] = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) + 1, dtype=np.int64))
    hist_models: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) + 1, dtype=np.int64))
    spread: np.ndarray = field(default_factory=lambda: np.zeros((len(HIST_EDGES) + 1, len(SPREAD_EDGES) + 1), dtype=np.int64))
    correlations: list[dict[str, Any]] = field(default_factory=list)


CORRELATION_TARGETS = {"ltc_mean": "mean prediction (mTC)", "ltc_variance": "variance of the predictions"}
CORRELATION_DESCRIPTORS = {
    "volume": "volume (Å^3)", "n_sites": "number of sites", "density": "density (g/cm^3)",
    "atomic_density": "atomic density (atoms/Å^3)", "n_elements": "number of elements",
    EFORM_COLUMN: "predicted formation energy (eV/atom)",
    BANDGAP_COLUMN: "predicted PBE band gap (eV)",
    "band_gap": "band gap (eV): the input's where given, else the predicted PBE gap",
}
INPUT_BANDGAP = INPUT_PREFIX + "band_gap"


def descriptor_values(chunk: list[dict[str, str]], name: str) -> np.ndarray | None:
    """The values of descriptor ``name`` in ``chunk`` (None where the scan has no such column)."""
    header = chunk[0]
    if name == "band_gap":
        if BANDGAP_COLUMN not in header:
            return None
        predicted = _column(chunk, BANDGAP_COLUMN)
        if INPUT_BANDGAP not in header:
            return predicted
        given = _column(chunk, INPUT_BANDGAP)
        return np.where(np.isfinite(given), given, predicted)
    return _column(chunk, name) if name in header else None


def summarize(out: str | Path, top: int = 30, correlations: bool = False) -> Summary:
    """One pass over a finished scan CSV: top-N by lowest max, histograms, and (optionally) correlations."""
    summary = Summary()
    heap: list[tuple[float, int, dict[str, str]]] = []  # the N lowest maxima, as a max-heap on -max
    pairs: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for chunk in read_rows(Path(out)):
        mean, std, top_max = _column(chunk, "ltc_mean"), _column(chunk, "ltc_std"), _column(chunk, "ltc_max")
        members = np.stack([_column(chunk, c) for c in chunk[0] if c.startswith("ltc_split")], axis=1)
        with np.errstate(invalid="ignore"):
            impossible = (members <= 0).any(axis=1)
        summary.impossible += int(impossible.sum())
        for k, row in enumerate(chunk):
            position = summary.rows + k
            if row["warning"].startswith("error:"):
                summary.errors += 1
            elif row["warning"]:
                summary.warned += 1
            if math.isfinite(top_max[k]) and top > 0 and not impossible[k]:
                item = (-top_max[k], -position, row)
                if len(heap) < top:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        ok = np.isfinite(mean)
        summary.predicted += int(ok.sum())
        summary.rows += len(chunk)
        summary.hist += np.bincount(np.digitize(mean[ok], HIST_EDGES), minlength=len(HIST_EDGES) + 1)
        each = members.reshape(-1)
        summary.hist_models += np.bincount(np.digitize(each[np.isfinite(each)], HIST_EDGES), minlength=len(HIST_EDGES) + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = std / mean
        both = ok & np.isfinite(rel)
        np.add.at(summary.spread, (np.digitize(mean[both], HIST_EDGES), np.digitize(rel[both], SPREAD_EDGES)), 1)
        if correlations:
            targets = {"ltc_mean": mean, "ltc_variance": std**2}
            inputs = [c for c in chunk[0] if c.startswith(INPUT_PREFIX)]
            for name in [*CORRELATION_DESCRIPTORS, *inputs]:
                x = descriptor_values(chunk, name)
                if x is None:
                    continue
                for target, y in targets.items():
                    xs, ys = pairs.setdefault((target, name), ([], []))
                    xs.append(x)
                    ys.append(y)
    summary.top = [row for _, _, row in sorted(heap, reverse=True)]
    for (target, name), (xs, ys) in pairs.items():
        r, p, n = pearson(np.concatenate(xs), np.concatenate(ys))
        summary.correlations.append({"target": target, "descriptor": name, "pearson_r": r, "p_value": p, "n": n})
    return summary


def top_table(rows: list[dict[str, str]]) -> str:
    """Markdown table in the layout of the paper's Table S6."""
    lines = ["| # | id | formula | mean | std | std/mean | max | max x std/mean | warning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rows, start=1):
        cells = [r["ltc_mean"], r["ltc_std"], r["ltc_std_over_mean"], r["ltc_max"], r["ltc_max_x_std_over_mean"]]
        shown = [f"{float(c):.3g}" if c not in ("", "nan") else c for c in cells]
        lines.append(f"| {k} | {r['id']} | {r['formula']} | " + " | ".join(shown) + f" | {r['warning']} |")
    return "\n".join(lines)


def descriptor_name(column: str) -> str:
    """How the summary names a column: ours by what it is, the inputs' own fields by their name."""
    if column.startswith(INPUT_PREFIX):
        return f"{column[len(INPUT_PREFIX):]} (field of the input)"
    return CORRELATION_DESCRIPTORS[column]


def correlation_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| predicted | descriptor | Pearson r | p-value | n |", "|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {CORRELATION_TARGETS[c['target']]} | {descriptor_name(c['descriptor'])} | "
                     f"{c['pearson_r']:.3f} | {c['p_value']:.3g} | {c['n']} |")
    return "\n".join(lines)


def _occupied(counts: np.ndarray, edges: np.ndarray, margin: int = 3) -> tuple[float, float]:
    """Axis limits around the non-empty bins of ``counts`` (which has under- and overflow cells at its ends)."""
    full = np.flatnonzero(counts[1:-1])
    if not len(full):
        return float(edges[0]), float(edges[-1])
    lo, hi = float(edges[max(0, full[0] - margin)]), float(edges[min(len(edges) - 1, full[-1] + 1 + margin)])
    if hi < 10 * lo:  # at least a decade, centred, so that a narrow spread still has labelled ticks
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return lo, hi


def _wrapped(title: str, width: int = 64) -> str:
    """A plot title on as many lines as it needs (a long cache name used to run off the figure)."""
    return "\n".join(textwrap.wrap(title, width)) or title


def plot_distribution(summary: Summary, path: Path, title: str) -> None:
    """Histogram of the mean prediction per material, and of every model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stairs(summary.hist[1:-1], HIST_EDGES, fill=True, alpha=0.6, label="mean of the models (mTC)")
    n_models = summary.hist_models.sum() / max(1, summary.hist.sum())
    ax.stairs(summary.hist_models[1:-1] / max(1.0, n_models), HIST_EDGES, color="k", lw=1,
              label="each model's prediction (count / models)")
    ax.set_xscale("log")
    ax.set_xlim(*_occupied(summary.hist + summary.hist_models, HIST_EDGES))
    ax.set_xlabel("predicted LTC (W/m/K)")
    ax.set_ylabel("materials")
    ax.set_title(_wrapped(title), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spread(summary: Summary, path: Path, title: str) -> None:
    """2-D histogram of std/mean of the models' predictions against their mean (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as colors
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    counts = summary.spread[1:-1, 1:-1].T.astype(float)
    top = float(counts.max()) if counts.size else 0.0
    counts[counts == 0] = np.nan
    mesh = ax.pcolormesh(HIST_EDGES, SPREAD_EDGES, counts, norm=colors.LogNorm(vmin=1, vmax=max(1.0, top)), cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="materials")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*_occupied(summary.spread.sum(axis=1), HIST_EDGES))
    ax.set_ylim(*_occupied(summary.spread.sum(axis=0), SPREAD_EDGES))
    ax.set_xlabel("mean predicted LTC, mTC (W/m/K)")
    ax.set_ylabel("std / mean of the models' predictions")
    ax.set_title(_wrapped(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: str | Path, summary: Summary, top: int, notes: Sequence[str], title: str) -> Path:
    """``<base>.summary.md``, ``<base>.ltc.png``, ``<base>.spread.png`` (and ``<base>.correlations.csv``)."""
    paths = ScanPaths(Path(out))
    plot_distribution(summary, paths.sidecar(".ltc.png"), f"{title}: {summary.predicted} materials")
    plot_spread(summary, paths.sidecar(".spread.png"), f"{title}: spread of the predictions")
    lines = [f"# LTC screening: {title}", "",
             f"{summary.rows} structures in {paths.out.name}: {summary.predicted} predicted, {summary.errors} without "
             f"a prediction (warning starts with 'error:'), {summary.warned} predicted with a warning.", ""]
    if summary.impossible:
        lines += [f"**{summary.impossible} structure(s) have a prediction at or below 0 W/m/K** from at least one model, "
                  "which no material has (a collapsed model: docs/training.md); they are flagged in the warning column "
                  "and left out of the rankings below.", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"## The {len(summary.top)} materials with the lowest max prediction (as Table S6)", "",
              "LTC in W/m/K; std is the sample standard deviation of the models' predictions.", "",
              top_table(summary.top), ""]
    if summary.correlations:
        lines += ["## Correlations with descriptors and the inputs' fields (as Tables 1-4)", "",
                  "Pearson r over the materials with a prediction; two-sided p-value from Student's t.", "",
                  correlation_table(summary.correlations), ""]
        with open(paths.sidecar(".correlations.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["target", "descriptor", "pearson_r", "p_value", "n"])
            writer.writeheader()
            writer.writerows(summary.correlations)
    lines += ["## Plots", "", f"![distribution]({paths.sidecar('.ltc.png').name})",
              f"![spread]({paths.sidecar('.spread.png').name})", ""]
    path = paths.sidecar(".summary.md")
    path.write_text("\n".join(lines))
    return path
