"""The model card of a shipped ensemble (``weights/<name>/README.md``), every figure recomputed from the files.

:func:`card_figures` scores the shipped models as a user gets them (:func:`~paraisite.screening.ensemble.load_ensemble`):
the model of split k on split k's validation part of its training set (the structures it never trained on),
and every model on datasets none of them saw (Miyazaki2021's half-Heuslers), in W/m/K, with MAPE, SRE,
MAE of log10 and Spearman (:func:`~paraisite.evaluation.metrics.regression_metrics`). With the training set's
elements and space groups, they are stored in ``card.json`` beside the models; :func:`render_card` writes the
README from that file alone, so the test that recomputes the figures (tests/test_shipped.py) checks the card.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from torch_geometric.data import Batch

from ..data.datasets import dataset_folder, load_dataset
from ..screening.ensemble import Ensemble, load_ensemble
from ..screening.intervals import DomainEmbedding, coverage_figures, load_calibration
from .metrics import regression_metrics

METRICS = {"mape": "MAPE", "sre": "SRE", "log10_mae": "MAE of log10", "spearman": "Spearman"}
STRUCTURE_TYPES = {"Fm-3m": "rocksalt", "F-43m": "zinc blende", "P6_3mc": "wurtzite"}
HEALTHY_SPEARMAN = 0.8  # a member below it on its own validation part, or with a prediction <= 0, is not shipped


def predict_all(ensemble: Ensemble, graphs: list, batch_size: int = 64) -> np.ndarray:
    """Every member's prediction for every graph, ``[N, M]`` W/m/K."""
    out = [ensemble(Batch.from_data_list(graphs[i:i + batch_size])).numpy() for i in range(0, len(graphs), batch_size)]
    return np.concatenate(out)


def _metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    every = regression_metrics(y_true, y_pred)
    return {k: every[k] for k in METRICS}


def _mean_std(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1))] for k in METRICS}


def training_domain(dataset: str) -> dict[str, Any]:
    """The elements and the space groups (pymatgen, symprec 0.1) of a training set's structures."""
    from pymatgen.core import Element
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from megnet_pt.structures import read_structure

    folder = dataset_folder(dataset)
    elements, groups = set(), Counter()
    for path in sorted((folder / "cif").glob("*.cif")):
        structure = read_structure(path)
        elements.update(e.symbol for e in structure.composition.elements)
        groups[SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()] += 1
    return {"elements": sorted(elements, key=lambda s: Element(s).Z), "space_groups": dict(groups.most_common())}


def card_figures(folder: str | Path, unseen: tuple[str, ...] = ("miyazaki21",)) -> dict[str, Any]:
    """The figures of the card of the shipped ensemble in ``folder`` (see the module docstring)."""
    ensemble = load_ensemble(folder)
    info = ensemble.info
    data = load_dataset(info.dataset, cutoff=info.cutoff, progress=False)
    pred = predict_all(ensemble, data.graphs)
    truth = data.ltc.double().numpy()
    splits = []
    for m, k in enumerate(info.splits):
        _, val = data.split(k)
        splits.append({"split": k, "n": int(len(val)), **_metrics(truth[val], pred[val, m]),
                       "min_prediction": float(pred[val, m].min())})
    figures: dict[str, Any] = {"dataset": info.dataset, "n_structures": len(data), "init": info.init, "selection": info.selection,
                               "epochs": info.epochs, "validation": {"splits": splits, "mean_std": _mean_std(splits)},
                               "unseen": {}, "domain": training_domain(info.dataset)}
    calibration = load_calibration(folder)
    if calibration is not None:
        embed = DomainEmbedding.published()
        figures["intervals"] = {"description": calibration.describe(), "threshold": calibration.threshold,
                                "nested": calibration.coverage, "n_held_out": calibration.n_held_out}
    for name in unseen:
        other = load_dataset(name, cutoff=info.cutoff, progress=False)
        p, t = predict_all(ensemble, other.graphs), other.ltc.double().numpy()
        members = [_metrics(t, p[:, m]) for m in range(p.shape[1])]
        figures["unseen"][name] = {"n": len(other), "members_mean_std": _mean_std(members),
                                   "ensemble_mean": _metrics(t, p.mean(axis=1)),
                                   "min_prediction": float(p.min())}
        if calibration is not None:
            domain = np.concatenate([calibration.domain.score(embed(Batch.from_data_list(other.graphs[i:i + 64])))
                                     for i in range(0, len(other), 64)])
            flagged = domain > calibration.threshold
            figures["unseen"][name]["intervals"] = {
                f"{level:g}": coverage_figures(t, *calibration.interval(p, domain, level), level)
                | {f"constant_{k}": v for k, v in
                   coverage_figures(t, *calibration.interval(p, domain, level, constant=True), level).items()}
                for level in (0.8, 0.9)}
            figures["unseen"][name]["flagged"] = float(flagged.mean())
    return figures


def unhealthy(figures: dict[str, Any]) -> list[str]:
    """Why a member should not be shipped: a prediction <= 0 W/m/K or Spearman <= 0.8 on its validation part."""
    return [f"split {r['split']}: " + ("a prediction <= 0 W/m/K" if r["min_prediction"] <= 0 else
                                      f"Spearman {r['spearman']:.2f} <= {HEALTHY_SPEARMAN}")
            for r in figures["validation"]["splits"]
            if r["min_prediction"] <= 0 or not r["spearman"] > HEALTHY_SPEARMAN]


def candidate_choice(search_csv: Path) -> list[tuple[str, float]]:
    """Single-model candidates of the recipe search by mean inner hold-out MAPE of their final models, lowest first.

    Shrunk rows and the seed repeats are not candidates; the three-seed average is 27 models, over the size
    a shipped ensemble may have, so it is left out here and named in the card."""
    inner: dict[str, list[float]] = {}
    with open(search_csv, newline="") as f:
        for r in csv.DictReader(f):
            name = r["candidate"]
            if (r["selection"] != "final" or not r["inner_mape"] or "," in name or "seed" in name
                    or name.endswith("3seeds") or math.isnan(float(r["inner_mape"]))):
                continue
            inner.setdefault(name, []).append(float(r["inner_mape"]))
    return sorted(((k, float(np.mean(v))) for k, v in inner.items()), key=lambda kv: kv[1])


def _cell(values: list[float]) -> str:
    return f"{values[0]:.3f} ({values[1]:.3f})"


def render_card(card: dict[str, Any]) -> str:
    """The README.md of a shipped ensemble from its ``card.json`` (written by scripts/ship_ensemble.py)."""
    name, about, fig = card["name"], card["about"], card["figures"]
    val, domain = fig["validation"], fig["domain"]
    groups = ", ".join(f"{g} ({STRUCTURE_TYPES[g]}) {n}" if g in STRUCTURE_TYPES else f"{g} {n}"
                       for g, n in domain["space_groups"].items())
    lines = [
        f"# {name}: lattice thermal conductivity from a crystal structure",
        "",
        "Generated by `scripts/ship_ensemble.py` from the files beside it (`card.json`); tests/test_shipped.py",
        "recomputes every figure from the shipped weights and the datasets.",
        "",
        "## What it predicts",
        "",
        f"The lattice thermal conductivity at 300 K, in W/m/K, of a crystal from its structure alone: {len(val['splits'])}",
        f"ParAIsite models (MEGNet + MLP head), one per split of {fig['dataset']}, each the `{fig['selection']}` model",
        "of its split (the last epoch: nothing was chosen on validation data). `scan.py` and",
        "`load_ltc_model().predict` give each model's prediction, their mean and their sample standard deviation.",
        "",
        "```bash",
        "python scan.py a.cif b.cif                  # or a folder, a pymatgen JSON, an extXYZ, a graph cache",
        "```",
        "",
        "```python",
        "from paraisite import load_ltc_model",
        "predictions = load_ltc_model().predict([structure])   # pymatgen Structure or ASE Atoms",
        "predictions.mean, predictions.std, predictions.members",
        "```",
        "",
        "## Training data",
        "",
        f"{fig['dataset']}: {fig['n_structures']} rocksalt, zinc-blende and wurtzite compounds with their LTC from first-principles",
        "anharmonic lattice dynamics (phono3py; Togo, Chaput and Tanaka, Phys. Rev. B 91, 094306, 2015, as",
        "used by Seko et al., Phys. Rev. Lett. 115, 205901, 2015), structures from the Materials Project, as",
        "published in the ParAIsite repository (github.com/liudakl/ParAIsite, commit cc0c1ff; `data/README.md` of",
        f"the shared inputs says how they were read). Split k trains on {fig['n_structures'] - val['splits'][0]['n']}",
        f"structures and is validated on the other {val['splits'][0]['n']} (the paper's nine splits, seed k).",
        "",
        f"Elements ({len(domain['elements'])}): {', '.join(domain['elements'])}.",
        "",
        f"Space groups (pymatgen, symprec 0.1): {groups}.",
        "",
        "## Recipe",
        "",
        about["recipe"],
        "",
        "Chosen as the recipe search chooses (docs/results.md, \"An honest recipe: the search\"): by the mean MAPE",
        "of the final models on inner hold-outs of the training parts (20 %, never the validation parts). The",
        "search's own choice, three seeds averaged, is 27 models (52 MB), over the 20 MB a shipped ensemble may",
        "take; among the single-model candidates (mean inner hold-out MAPE, lowest first):",
        "",
        "| candidate | inner hold-out MAPE |",
        "|---|---|",
        *[f"| {c} | {m:.4f} |" for c, m in card["choice"]],
        "",
        "The first three are within 0.004 of each other, less than a seed moves one recipe (docs/results.md): the",
        "order among them is chance, none is worse.",
        "",
        "## Trained again",
        "",
        f"At commit `{about['commit']}`, on {about['machine']}:",
        "",
        "```bash",
        *about["commands"],
        "```",
        "",
        about["reproduced"],
        "",
        f"## Validation: each split's model on its own validation part ({fig['dataset']}, W/m/K)",
        "",
        "| split | n | " + " | ".join(METRICS.values()) + " | lowest prediction |",
        "|---|---|" + "---|" * len(METRICS) + "---|",
        *[f"| {r['split']} | {r['n']} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS) + f" | {r['min_prediction']:.3f} |"
          for r in val["splits"]],
        "| mean (std) | | " + " | ".join(_cell(val["mean_std"][k]) for k in METRICS) + " | |",
        "",
        f"No model is collapsed: every prediction above 0 W/m/K, Spearman above {HEALTHY_SPEARMAN} on every split.",
        "" if not unhealthy(fig) else f"**Not so**: {'; '.join(unhealthy(fig))}.",
    ]
    if "intervals" in fig:
        iv = fig["intervals"]
        lines += [
            "## Intervals and the domain score",
            "",
            "`scan.py` and `load_ltc_model().predict` also give `ltc_lo`..`ltc_hi` (`lo`, `hi`), an interval at 90 %",
            "(`--interval 0.8`, `predict(..., level=0.8)`), and `domain`, the distance of the structure's MEGNet",
            "readout to the nearest training structure (about 1 inside the training set). Calibrated by",
            f"`scripts/calibrate_intervals.py` on {iv['n_held_out']} held-out predictions of nested cross-validation",
            f"(`intervals.json`): {iv['description']}.",
            "",
            "| set | level | coverage | median width (hi/lo) | interval score | constant width: coverage | width | score |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = [("nested folds", iv["nested"])] + [(o, u["intervals"]) for o, u in fig["unseen"].items() if "intervals" in u]
        for where, by_level in rows:
            for level, c in by_level.items():
                lines.append(f"| {where} | {float(level):.0%} | {c['coverage']:.0%} | x{c['median_width']:.2f} | "
                             f"{c['interval_score']:.3f} | {c['constant_coverage']:.0%} | "
                             f"x{c['constant_median_width']:.2f} | {c['constant_interval_score']:.3f} |")
        lines += [""] + [f"On {o}, {u['flagged']:.0%} of the structures have a domain score above {iv['threshold']:.2f} "
                         "and are flagged in the `warning` column." for o, u in fig["unseen"].items() if "flagged" in u]
        lines += ["", "docs/results.md (\"Intervals\") has the figures in full, AFLOW AGL among them.", ""]
    for other, u in fig["unseen"].items():
        lines += [
            f"## On {other}, which no model saw ({u['n']} structures, W/m/K)",
            "",
            "| | " + " | ".join(METRICS.values()) + " |",
            "|---|" + "---|" * len(METRICS),
            "| each model, mean (std) | " + " | ".join(_cell(u["members_mean_std"][k]) for k in METRICS) + " |",
            "| the ensemble mean | " + " | ".join(f"{u['ensemble_mean'][k]:.3f}" for k in METRICS) + " |",
            "",
            "Half-Heusler compounds, a structure type and mostly elements the training set does not have: far",
            "outside the training domain, and the errors say so.",
            "",
        ]
    lines += [
        "## Licences",
        "",
        "- This project's code and these weights: BSD-3-Clause (`LICENSE` at the repository's root).",
        "- The MEGNet weights the models start from: matgl's `MEGNet-MP-2018.6.1-Eform` (github.com/materialsvirtuallab/",
        "  matgl), BSD-3-Clause, Copyright (c) 2022 Materials Virtual Lab.",
        "- Structures: the Materials Project, CC BY 4.0. LTC labels: the publications above; the ParAIsite",
        "  repository they were taken from states no licence for its data files. Cite Togo et al. 2015, Seko",
        "  et al. 2015 and Klochko and d'Aquin (PCCP 2026) when you use the predictions.",
        "",
        "## What it should not be used for",
        "",
        "- Other temperatures than 300 K, or electronic (total) thermal conductivity: it predicts the lattice part at 300 K.",
        "- A number to trust to better than a factor of about 10^0.22 = 1.7 on structures like the training set's,",
        "  and much less away from them (Miyazaki2021 above): rank candidates with it, then compute the few you keep.",
        "- Structures far from rocksalt, zinc-blende and wurtzite binaries, or with elements outside the list above:",
        "  `scan.py` flags other elements and cells much larger than the training set's in its `warning` column.",
        "- Disordered or partially occupied structures, molecules, surfaces: refused (a periodic, ordered crystal is needed).",
        "- The ensemble's spread alone is not a calibrated interval: use `ltc_lo`..`ltc_hi` where the card has them,",
        "  and distrust them where `domain` is flagged.",
        "",
        "## Files",
        "",
        "`ensemble.json` lists the sha256 of every file below; they are checked before anything is read, and a",
        "changed byte is refused.",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| `{f}` | `{h}` |" for f, h in card["files"].items()],
        "",
    ]
    return "\n".join(lines)
