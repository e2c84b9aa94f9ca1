"""Is the spread of a run's nine models an uncertainty? Rank correlation of spread and error, and the thirds.

    python scan.py DATASET --models RUN --selection final --out scan.csv       # nine predictions + input_ltc
    python scripts/spread_vs_error.py scan.csv [--held-out RUN/predictions.csv]

Spread is ``ltc_std_over_mean`` of the scan; error is |log10(prediction / label)| (predictions floored at
1e-3 W/m/K, ``paraisite.evaluation.metrics.LOG_FLOOR``): of the nine models' mean, or with ``--held-out`` the mean error of each material's predictions
by the models that held it out (its validation folds). Prints Spearman's rho of spread and error, and the
median error and the share within a factor of 2 of the most and the least certain thirds.
"""
from __future__ import annotations

import argparse
import csv
import math

import numpy as np
from scipy import stats

from paraisite.evaluation.metrics import LOG_FLOOR


def log_error(predicted: float, label: float) -> float:
    """|log10(prediction / label)|, floored as ``regression_metrics``' MAE of log10 is."""
    return abs(math.log10(max(predicted, LOG_FLOOR) / label))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scan", help="a scan.py CSV of a dataset folder (it has input_ltc)")
    p.add_argument("--held-out", default=None, help="the run's predictions.csv: score each material on its folds")
    p.add_argument("--selection", default="final")
    p.add_argument("--dataset", default=None, help="with --held-out: only the predictions on this test dataset")
    args = p.parse_args()
    scan = {r["id"]: r for r in csv.DictReader(open(args.scan)) if r["ltc_mean"] and r.get("input_ltc")}
    if args.held_out:
        folds: dict[str, list[float]] = {}
        for r in csv.DictReader(open(args.held_out)):
            if r["selection"] == args.selection and r["id"] in scan and args.dataset in (None, r["test_dataset"]):
                folds.setdefault(r["id"], []).append(log_error(float(r["predicted"]), float(r["ltc"])))
        ids = sorted(folds)
        error = np.array([np.mean(folds[i]) for i in ids])
    else:
        ids = sorted(scan)
        error = np.array([log_error(float(scan[i]["ltc_mean"]), float(scan[i]["input_ltc"])) for i in ids])
    spread = np.array([float(scan[i]["ltc_std_over_mean"]) for i in ids])
    rho = stats.spearmanr(spread, error)
    order = np.argsort(spread)
    third = len(order) // 3
    certain, uncertain = error[order[:third]], error[order[-third:]]
    print(f"{len(ids)} materials: Spearman(spread, error) {rho.statistic:.2f} (p {rho.pvalue:.2g}); median |log10 error| "
          f"{np.median(certain):.2f} for the most certain third, {np.median(uncertain):.2f} for the least certain; "
          f"within a factor of 2: {np.mean(certain < math.log10(2)):.0%} and {np.mean(uncertain < math.log10(2)):.0%}")


if __name__ == "__main__":
    main()
