"""The recipe search of docs/results.md: every candidate trained, chosen on inner hold-outs only, scored once.

    python scripts/recipe_search.py --root runs/recipe_search --train      # trains what is missing (about 6 min each here)
    python scripts/recipe_search.py --root runs/recipe_search --out docs/results/recipe_search.csv
    python scripts/recipe_search.py --root runs/more --keep docs/results/recipe_search.splits.csv --out ...   # adds to it

Every candidate is ``train.py --init fe --dataset togo15 --select-holdout 0.2`` plus its own flags: each
split k trains on 80 % of its training part T_k and keeps the other 20 % (the inner hold-out H_k, drawn
from T_k alone) to choose best.pt. Each model (best and final, and the mean of several seeds' predictions)
is scored on H_k and on the validation part V_k. Choices are made on H_k only, among the final models
(best.pt was chosen on H_k, so its score there is biased low; it is reported, not chosen), and not among
the seed replicates (a recipe run again with another seed is the same recipe, REPLICATES):

- per split, the candidate of the lowest MAPE on H_k: the "nested" row, whose V_k scores are what the
  whole search, recipe choice included, honestly gets;
- overall, the candidate of the lowest mean MAPE on H_k over the splits (H_k of one split can hold
  validation materials of another, so this one choice is honest per split only through the nested
  row, which agrees with it or not: both are printed);
- that candidate is then trained again on the whole of each T_k (REFITS, ``--only refit/<name>``, each
  seed of a seed group) and its final models scored on V_k; its single-seed recipe is what
  ``train.py --recipe robust`` trains.

A "shrunk" row per candidate multiplies its final predictions by the factor c_k that minimises the MAPE
on H_k: MAPE rewards predicting low (for a log-normal error of width s it is minimised by the median
times exp(-s^2)), and the row shows how much of a MAPE is that, at the cost of SRE and log10 error.

V_k is read after every choice is made; :func:`choose` never sees it (tests/test_recipe_search.py).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paraisite.checkpoint import load_model_file  # noqa: E402
from paraisite.data.datasets import LTCDataset, load_dataset  # noqa: E402
from paraisite.evaluation.metrics import LOG_FLOOR, regression_metrics  # noqa: E402
from paraisite.model import predict  # noqa: E402
from paraisite.training.rundir import RunDir  # noqa: E402

BASE = ["--init", "fe", "--dataset", "togo15", "--select-holdout", "0.2"]
HOLDOUT = 0.2
SPLITS = list(range(1, 10))
# name -> train.py flags besides BASE ("{root}" is --root); SEED_GROUPS average the predictions of their runs
CANDIDATES: dict[str, list[str]] = {
    "paper": [],
    "log10": ["--loss", "log10"],
    "log10_swa50": ["--loss", "log10", "--swa-epochs", "50"],
    "log10_megnetlr1e-4": ["--loss", "log10", "--megnet-lr", "1e-4"],
    "feaf30clip10_log10": ["--init", "fe+af", "--aflow-run", "{root}/fe_aflow_agl_clip10_e30", "--loss", "log10"],
    "log10_seed43": ["--loss", "log10", "--seed", "43"],
    "log10_seed44": ["--loss", "log10", "--seed", "44"],
    "log10_clip10": ["--loss", "log10", "--clip-grad-norm", "10"],
    "mape_megnetlr1e-4": ["--megnet-lr", "1e-4"],
    "log10_freeze50": ["--loss", "log10", "--freeze-megnet-epochs", "50"],
}
# the chosen candidate trained again on the whole of each training part (no inner hold-out), each of its seeds;
# "log10" (seed 42) is what --recipe robust runs
REFITS: dict[str, list[str]] = {
    "log10": ["--init", "fe", "--dataset", "togo15", "--loss", "log10"],
    "log10_seed43": ["--init", "fe", "--dataset", "togo15", "--loss", "log10", "--seed", "43"],
    "log10_seed44": ["--init", "fe", "--dataset", "togo15", "--loss", "log10", "--seed", "44"],
}
# AFLOW stages the +af candidates start from: 30 epochs (the 300 of the paper take hours on a CPU), clipped
AFLOW_STAGES: dict[str, list[str]] = {
    "fe_aflow_agl_clip10_e30": ["--init", "fe", "--dataset", "aflow_agl", "--epochs", "30", "--clip-grad-norm", "10"],
}
SEED_GROUPS: dict[str, list[str]] = {"log10_3seeds": ["log10", "log10_seed43", "log10_seed44"]}
# a group's other seeds are the first's recipe run again: reported (the spread a seed alone makes), never chosen
REPLICATES = {m for members in SEED_GROUPS.values() for m in members[1:]}
METRICS = ("mape", "sre", "log10_mae", "spearman", "r2", "mae")


def train_missing(root: Path, names: list[str]) -> None:
    def train(name: str, flags: list[str]) -> None:
        run = RunDir(root / name)
        if not all(run.results(k).is_file() for k in SPLITS):
            print(f"training {name}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--run-dir", str(run), "--no-progress"],
                           check=True)

    for name in names:
        if name.startswith("refit/"):
            train(name, REFITS[name.removeprefix("refit/")])
            continue
        flags = [f.replace("{root}", str(root)) for f in CANDIDATES[name]]
        for stage, stage_flags in AFLOW_STAGES.items():
            if str(root / stage) in flags:
                train(stage, stage_flags)
        train(name, BASE + flags)


def predict_parts(run: RunDir, data: LTCDataset, k: int, selection: str, parts: list[np.ndarray]) -> list[np.ndarray]:
    """The predictions (W/m/K) of split k's ``selection`` model on each of ``parts``, in one pass."""
    model, transform, _ = load_model_file(run.checkpoint(k, selection))
    out = predict(model, [data.graphs[i] for i in np.concatenate(parts)], transform, torch.device("cpu")).numpy()
    return np.split(out, np.cumsum([len(p) for p in parts])[:-1])


def predictions(run: RunDir, data: LTCDataset, k: int, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's predictions (W/m/K) on H_k and on V_k."""
    _, holdout, val = data.training_parts(k, HOLDOUT)
    inner, validation = predict_parts(run, data, k, selection, [holdout, val])
    return inner, validation


def scored(data: LTCDataset, candidate: str, selection: str, k: int, inner: np.ndarray | None, val: np.ndarray,
           **extra: float) -> dict:
    """A row of metrics on H_k (``inner_*``; NaN for a model that trained on H_k, ``inner`` None) and on V_k (``val_*``)."""
    _, holdout, v = data.training_parts(k, HOLDOUT)
    row = {"candidate": candidate, "selection": selection, "split": k, **extra}
    row |= ({f"inner_{m}": x for m, x in regression_metrics(data.ltc[holdout].numpy(), inner).items()}
            if inner is not None else {f"inner_{m}": float("nan") for m in METRICS})
    return row | {f"val_{m}": x for m, x in regression_metrics(data.ltc[v].numpy(), val).items()}


def score_all(root: Path, data: LTCDataset) -> list[dict]:
    """One row per (candidate, selection, split): metrics on H_k (``inner_*``) and on V_k (``val_*``)."""
    raw: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    for name in CANDIDATES:
        if not all(RunDir(root / name).finished(k) for k in SPLITS):
            continue
        for selection in ("best", "final"):
            for k in SPLITS:
                raw[name, selection, k] = predictions(RunDir(root / name), data, k, selection)
    for group, members in SEED_GROUPS.items():
        for selection in ("best", "final"):
            for k in SPLITS:
                if all((m, selection, k) in raw for m in members):
                    raw[group, selection, k] = tuple(geometric_mean([raw[m, selection, k][part] for m in members])
                                                     for part in (0, 1))
    rows = [scored(data, name, selection, k, inner, val) for (name, selection, k), (inner, val) in raw.items()]
    return rows + shrunk(raw, data) + refit_rows(root, data)


def geometric_mean(predictions: list[np.ndarray]) -> np.ndarray:
    """The seeds' predictions averaged in log10 (each floored at LOG_FLOOR): the error is about a factor, not a sum."""
    return 10 ** np.mean([np.log10(np.maximum(p, LOG_FLOOR)) for p in predictions], axis=0)


def refit_rows(root: Path, data: LTCDataset) -> list[dict]:
    """The final models of each refit (and of each seed group of refits) on V_k: trained on all of T_k, nothing is
    left inside it to score them on."""
    val: dict[str, dict[int, np.ndarray]] = {}
    for name in REFITS:
        run = RunDir(root / "refit" / name)
        if all(run.finished(k) for k in SPLITS):
            val[name] = {k: predict_parts(run, data, k, "final", [data.split(k)[1]])[0] for k in SPLITS}
    for group, members in SEED_GROUPS.items():
        if all(m in val for m in members):
            val[group] = {k: geometric_mean([val[m][k] for m in members]) for k in SPLITS}
    return [scored(data, f"{name}, trained again on the whole training part", "final", k, None, v)
            for name, per_split in val.items() for k, v in per_split.items()]


def choose(inner_scores: dict[tuple[str, str, int], float]) -> tuple[tuple[str, str], dict[int, tuple[str, str]]]:
    """From ``{(candidate, selection, split): MAPE on H_k}`` alone: the overall choice and the choice per split."""
    options = sorted({(c, s) for c, s, _ in inner_scores})
    splits = sorted({k for _, _, k in inner_scores})
    complete = [o for o in options if all((*o, k) in inner_scores for k in splits)]
    overall = min(complete, key=lambda o: (np.mean([inner_scores[(*o, k)] for k in splits]), o))
    per_split = {k: min(complete, key=lambda o: (inner_scores[(*o, k)], o)) for k in splits}
    return overall, per_split


def shrunk(raw: dict, data: LTCDataset) -> list[dict]:
    """Each final candidate's predictions times the c_k (0.3..1.5) of the lowest MAPE on H_k (reported, not chosen)."""
    grid = np.linspace(0.3, 1.5, 121)
    out = []
    for (name, selection, k), (inner, val) in raw.items():
        if selection != "final":
            continue
        y = data.ltc[data.training_parts(k, HOLDOUT)[1]].numpy()
        c = grid[int(np.argmin([np.mean(np.abs(g * inner - y) / y) for g in grid]))]
        out.append(scored(data, f"{name}, shrunk", "final", k, c * inner, c * val, factor=c))
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (std over splits) of every candidate, then the nested row; the overall choice is marked."""
    eligible = {(r["candidate"], r["selection"], r["split"]): r["inner_mape"] for r in rows
                if r["selection"] == "final" and "factor" not in r and not np.isnan(r["inner_mape"])
                and r["candidate"] not in REPLICATES}
    overall, per_split = choose(eligible)
    by = {(r["candidate"], r["selection"], r["split"]): r for r in rows}
    table = []
    for c, s in sorted({(r["candidate"], r["selection"]) for r in rows}):
        chosen = [by[c, s, k] for k in SPLITS if (c, s, k) in by]
        table.append({"candidate": c, "selection": s,
                      "chosen": "overall" if (c, s) == overall else "replicate" if c in REPLICATES else "",
                      "n_splits": len(chosen)} | aggregate(chosen)
                     | ({"factor": f"{np.mean([r['factor'] for r in chosen]):.2f}"} if "factor" in chosen[0] else {}))
    nested = [by[(*per_split[k], k)] for k in SPLITS]
    table.append({"candidate": "nested: per split the final model of the lowest inner MAPE", "selection": "final",
                  "chosen": "",
                  "n_splits": len(nested)} | aggregate(nested))
    return table


def aggregate(rows: list[dict]) -> dict[str, str]:
    out = {}
    for part in ("inner", "val"):
        for m in METRICS:
            v = np.array([r[f"{part}_{m}"] for r in rows], dtype=float)
            out[f"{part}_{m}"] = f"{v.mean():.3f}"
            out[f"{part}_{m}_std"] = f"{v.std(ddof=1):.3f}" if len(v) > 1 else "nan"
    return out


def kept_rows(path: Path, scored_here: set[str]) -> list[dict]:
    """The per-split rows of an earlier search (its ``.splits.csv``) of the candidates not scored here."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["candidate"] not in scored_here]
    return [{k: (v if k in ("candidate", "selection") else int(v) if k == "split" else float(v))
             for k, v in r.items() if v != ""} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/recipe_search", help="folder of the candidates' run folders")
    p.add_argument("--train", action="store_true", help="train the candidates and refits that are missing first")
    p.add_argument("--only", default=None, help="with --train: these candidates (comma-separated; refit/<name> for a "
                   "refit)")
    p.add_argument("--keep", default=None, help="an earlier search's per-split rows (.splits.csv): its candidates that "
                   "have no runs under --root are kept as they were scored (training is deterministic on a CPU)")
    p.add_argument("--out", default=None, help="write the table here (CSV), and the per-split rows beside it")
    args = p.parse_args()
    root = Path(args.root)
    if args.train:
        train_missing(root, args.only.split(",") if args.only else [*CANDIDATES, *(f"refit/{n}" for n in REFITS)])
    data = load_dataset("togo15")
    rows = score_all(root, data)
    if args.keep:
        rows += kept_rows(Path(args.keep), {r["candidate"] for r in rows})
    table = summarise(rows)
    for r in table:
        print(f"{r['candidate']:<40} {r['selection']:<6} {r['chosen']:<8} inner MAPE {r['inner_mape']} | V: MAPE "
              f"{r['val_mape']} ({r['val_mape_std']}) SRE {r['val_sre']} ({r['val_sre_std']}) log10-MAE "
              f"{r['val_log10_mae']} Spearman {r['val_spearman']}")
    if args.out:
        for path, content in ((Path(args.out), table), (Path(args.out).with_suffix(".splits.csv"), rows)):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for r in content for key in r)), restval="")
                w.writeheader()
                w.writerows(content)


if __name__ == "__main__":
    main()
