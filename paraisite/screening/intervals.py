r"""Which predictions to trust: a calibrated interval and a domain score for every prediction.

**Interval** (normalised split-conformal, in log10). For an ensemble's predictions :math:`p_1..p_M` of one
structure, let :math:`\mu` and :math:`s` be the mean and sample standard deviation of :math:`\log_{10} p_m`
and :math:`d` its domain score. The interval at level :math:`1-\alpha` is

.. math::
    [10^{\mu - q\,\sigma},\ 10^{\mu + q\,\sigma}],\qquad \sigma = a + b\,s + c\,d,

where :math:`a, b, c \ge 0` are the non-negative least-squares fit of the held-out errors
:math:`|\log_{10} y - \mu|` on :math:`(1, s, d)`, and :math:`q` is the
:math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest of the :math:`n` held-out scores
:math:`|\log_{10} y - \mu| / \sigma`. Both are fitted on predictions of models that never saw the material
(nested cross-validation: ``scripts/calibrate_intervals.py``), so the interval covers a new material of the
same kind with probability at least :math:`1-\alpha`. The *constant-width* interval (:math:`\sigma = 1`)
is kept beside it as the baseline it must beat.

**Domain score**. Each structure is embedded by the published formation-energy MEGNet (its 160-d readout,
:class:`DomainEmbedding`: the same for every run, so it measures the structure, not a model), the embedding
standardised by the training set's mean and spread, and

.. math::
    d = \frac{\overline{\lVert z - z_{(j)} \rVert}_{j=1..k}}{\operatorname{median}_{\mathrm{train}}\ \overline{\lVert z_i - z_{i(j)} \rVert}_{j=1..k}}

the mean distance to its :math:`k` nearest training structures (:math:`k = 1`: the nearest) over the same
quantity for the training structures themselves (leave one out): about 1 inside the training data, large far from it. Structures with
:math:`d` above the calibration's ``threshold`` (the 95th percentile of held-out training materials' scores)
are flagged.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from ..evaluation.metrics import LOG_FLOOR

CALIBRATION_FILE = "intervals.json"
FORMAT = "paraisite.intervals"
VERSION = 1
DEFAULT_LEVEL = 0.9
NEIGHBOURS = 1
THRESHOLD_QUANTILE = 0.95
GROUPS = 5  # of materials, for the honest coverage of the nested folds (grouped_intervals)


def log_statistics(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sample std) over the members of log10 predictions ``[B, M]`` (floored at ``LOG_FLOOR``)."""
    logs = np.log10(np.maximum(pred, LOG_FLOOR))
    return logs.mean(axis=1), logs.std(axis=1, ddof=1) if pred.shape[1] > 1 else np.zeros(len(pred))


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)-th smallest score: the split-conformal quantile (inf when n is too small)."""
    if not 0 < level < 1:
        raise ValueError(f"an interval level must be between 0 and 1 (got {level})")
    scores = np.sort(np.asarray(scores, dtype=float))
    rank = math.ceil((len(scores) + 1) * level)
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def interval_score(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, level: float) -> np.ndarray:
    """Winkler's interval score in log10 (lower is better): width plus 2/alpha times the miss."""
    alpha = 1 - level
    lo, hi, y = np.log10(lo), np.log10(hi), np.log10(y)
    return (hi - lo) + 2 / alpha * (np.maximum(lo - y, 0) + np.maximum(y - hi, 0))


# --- the domain score -----------------------------------------------------------------------------

class DomainEmbedding(nn.Module):
    """Structures -> the published formation-energy MEGNet's 160-d readout ``[B, 160]`` (float64, numpy)."""

    def __init__(self, megnet: nn.Module) -> None:
        super().__init__()
        self.megnet = megnet.eval()

    @classmethod
    def published(cls) -> DomainEmbedding:
        from ..model import published_megnet

        return cls(published_megnet())

    @torch.inference_mode()
    def forward(self, batch) -> np.ndarray:
        device = next(self.megnet.parameters()).device
        return self.megnet.readout(batch.to(device)).double().cpu().numpy()


def _knn_mean(z: np.ndarray, ref: np.ndarray, k: int, leave_one_out: bool = False) -> np.ndarray:
    dist = np.sqrt(((z[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    if leave_one_out:
        np.fill_diagonal(dist, np.inf)
    k = min(k, dist.shape[1] - int(leave_one_out))
    return np.sort(dist, axis=1)[:, :k].mean(axis=1)


@dataclass
class DomainScorer:
    """The training set's embeddings, standardised, and the typical distance between them."""

    mean: list[float]
    scale: list[float]
    reference: list[list[float]]  # [N, F] standardised training embeddings
    typical: float  # median leave-one-out k-nearest mean distance of the training structures
    neighbours: int = NEIGHBOURS

    @classmethod
    def fit(cls, embeddings: np.ndarray, neighbours: int = NEIGHBOURS) -> DomainScorer:
        if len(embeddings) < 2:
            raise ValueError("a domain score needs at least two training structures")
        mean = embeddings.mean(axis=0)
        scale = np.maximum(embeddings.std(axis=0), 1e-6)
        ref = (embeddings - mean) / scale
        typical = float(np.median(_knn_mean(ref, ref, neighbours, leave_one_out=True)))
        return cls(mean.tolist(), scale.tolist(), ref.round(5).tolist(), max(typical, 1e-12), neighbours)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        z = (embeddings - np.asarray(self.mean)) / np.asarray(self.scale)
        return _knn_mean(z, np.asarray(self.reference), self.neighbours) / self.typical


# --- the calibration ------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What :func:`fit_calibration` learnt from held-out predictions; saved as ``intervals.json``."""

    coefficients: list[float]  # a, b, c of sigma = a + b s + c d
    scores: list[float]  # the held-out normalised scores |log10 y - mu| / sigma, sorted
    errors: list[float]  # the held-out |log10 y - mu|, sorted: the constant-width baseline
    threshold: float  # domain score above which a structure is flagged
    domain: DomainScorer  # against the whole training set of the run
    n_held_out: int
    level: float = DEFAULT_LEVEL
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)  # measured by grouped_intervals, per level

    def sigma(self, spread: np.ndarray, domain: np.ndarray) -> np.ndarray:
        a, b, c = self.coefficients
        return a + b * spread + c * domain

    def interval(self, pred: np.ndarray, domain: np.ndarray, level: float | None = None,
                 constant: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) in W/m/K for predictions ``[B, M]`` and their domain scores ``[B]``."""
        mu, s = log_statistics(pred)
        level = self.level if level is None else level
        if constant:
            half = np.full(len(mu), conformal_quantile(np.asarray(self.errors), level))
        else:
            half = conformal_quantile(np.asarray(self.scores), level) * self.sigma(s, domain)
        return 10 ** (mu - half), 10 ** (mu + half)

    def warnings(self, domain: np.ndarray) -> list[str]:
        """The ``warning`` text of each domain score (empty inside the training domain)."""
        return [f"domain score {d:.2f} > {self.threshold:.2f}: unlike the training structures, the interval may "
                "not hold" if d > self.threshold else "" for d in np.asarray(domain).tolist()]

    def describe(self, level: float | None = None) -> str:
        level = self.level if level is None else level
        a, b, c = self.coefficients
        return (f"interval: sigma = {a:.3g} + {b:.3g} x spread + {c:.3g} x domain (log10), fitted on "
                f"{self.n_held_out} held-out predictions; {level:.0%} half-width q = "
                f"{conformal_quantile(np.asarray(self.scores), level):.3g} sigma; domain flagged above "
                f"{self.threshold:.3g} (the {THRESHOLD_QUANTILE:.0%} of held-out training materials)")

    def save(self, path: str | Path) -> None:
        body = {"format": FORMAT, "version": VERSION} | asdict(self)
        Path(path).write_text(json.dumps(body, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            body = json.loads(Path(path).read_text())
            if body.pop("format") != FORMAT or body.pop("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} file")
            body["domain"] = DomainScorer(**body["domain"])
            body.setdefault("coverage", {})
            calibration = cls(**body)
            if len(calibration.coefficients) != 3 or not calibration.scores:
                raise ValueError("no coefficients or no scores")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a usable interval calibration ({exc}); run "
                             "scripts/calibrate_intervals.py again") from exc
        return calibration


def load_calibration(models: str | Path) -> Calibration | None:
    """The calibration stored with a run folder or shipped ensemble, None where it has none."""
    from megnet_pt.checkpoint import CheckpointError

    from .shipped import check_shipped, is_shipped

    path = Path(models) / CALIBRATION_FILE
    if not path.is_file():
        return None
    if is_shipped(models) and CALIBRATION_FILE not in check_shipped(models)["files"]:
        raise CheckpointError(f"{path}: not listed in the shipped ensemble's manifest, so not its calibration; "
                              "take the folder again from the repository")
    return Calibration.load(path)


def fit_calibration(labels: np.ndarray, members: np.ndarray, domain: np.ndarray, reference: np.ndarray,
                    level: float = DEFAULT_LEVEL) -> Calibration:
    """A :class:`Calibration` from held-out labels ``[n]``, member predictions ``[n, M]`` and domain scores ``[n]``.

    ``reference``: the embeddings of the whole training set, against which new structures are scored.
    """
    mu, s = log_statistics(members)
    error = np.abs(np.log10(labels) - mu)
    features = np.stack([np.ones_like(s), s, domain], axis=1)
    coef, _ = nnls(features, error)
    if coef[0] <= 1e-9:  # sigma must stay > 0 for a structure of zero spread
        coef[0] = max(1e-3, 0.05 * float(np.median(error)))
    sigma = features @ coef
    return Calibration(coef.tolist(), np.sort(error / sigma).tolist(), np.sort(error).tolist(),
                       float(np.quantile(domain, THRESHOLD_QUANTILE)), DomainScorer.fit(reference), len(labels), level)


# --- the held-out predictions of the nested cross-validation -----------------------------------------

def write_nested(path: Path, rows: list[tuple[int, str, float, np.ndarray, float]]) -> None:
    """``nested.csv``: outer split, id, label, domain score and every inner member's prediction."""
    m = len(rows[0][3])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["outer_split", "id", "ltc", "domain"] + [f"member{j + 1}" for j in range(m)])
        for k, sid, y, pred, d in rows:
            w.writerow([k, sid, repr(y), repr(d)] + [repr(float(v)) for v in pred])


def read_nested(path: Path) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(outer split, id, label, members, domain) of ``nested.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no held-out predictions")
    members = [c for c in rows[0] if c.startswith("member")]
    return (np.array([int(r["outer_split"]) for r in rows]), [r["id"] for r in rows],
            np.array([float(r["ltc"]) for r in rows]), np.array([[float(r[c]) for c in members] for r in rows]),
            np.array([float(r["domain"]) for r in rows]))


def grouped_intervals(ids: list[str], labels: np.ndarray, members: np.ndarray, domain: np.ndarray,
                      level: float, groups: int = GROUPS) -> tuple[np.ndarray, ...]:
    """(lo, hi, constant lo, constant hi) of every held-out row, each from a calibration fitted without its
    material: the materials are dealt into ``groups`` groups (seed 0), and each group's rows are scored by
    the calibration of the others' (a material held out by several outer splits has several rows)."""
    names = sorted(set(ids))
    group = {names[j]: g % groups for g, j in enumerate(np.random.RandomState(0).permutation(len(names)))}
    g = np.array([group[i] for i in ids])
    out = [np.empty(len(ids)) for _ in range(4)]
    reference = np.zeros((2, 1))  # the domain scores are given; the scorer is not used here
    for k in range(groups):
        test = g == k
        cal = fit_calibration(labels[~test], members[~test], domain[~test], reference, level)
        out[0][test], out[1][test] = cal.interval(members[test], domain[test], level)
        out[2][test], out[3][test] = cal.interval(members[test], domain[test], level, constant=True)
    return tuple(out)


def coverage_figures(labels: np.ndarray, lo: np.ndarray, hi: np.ndarray, level: float) -> dict[str, float]:
    """Share covered, median width hi/lo and mean interval score (log10) of intervals of ``labels``."""
    return {"coverage": float(np.mean((labels >= lo) & (labels <= hi))), "median_width": float(np.median(hi / lo)),
            "interval_score": float(np.mean(interval_score(lo, hi, labels, level)))}


def nested_coverage(ids: list[str], labels: np.ndarray, members: np.ndarray, domain: np.ndarray,
                    levels: tuple[float, ...] = (0.8, 0.9)) -> dict[str, dict[str, float]]:
    """:func:`coverage_figures` of the adaptive and constant-width intervals of the nested folds, per level."""
    out = {}
    for level in levels:
        lo, hi, clo, chi = grouped_intervals(ids, labels, members, domain, level)
        out[f"{level:g}"] = ({k: v for k, v in coverage_figures(labels, lo, hi, level).items()}
                             | {f"constant_{k}": v for k, v in coverage_figures(labels, clo, chi, level).items()})
    return out
