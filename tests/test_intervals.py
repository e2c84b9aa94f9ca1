"""Calibrated intervals and the domain score (paraisite.screening.intervals), on data where the answer is known,
and the nested split of scripts/calibrate_intervals.py checked by ids."""
import sys
from pathlib import Path

import numpy as np
import pytest

from paraisite.screening.intervals import (Calibration, DomainScorer, conformal_quantile, fit_calibration,
                                           interval_score, load_calibration, read_nested, write_nested)

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, rng: np.random.RandomState, members: int = 9, shift: float = 0.0):
    """Labels whose log10 error grows with the members' spread: err ~ N(0, 0.05 + 2 s)."""
    mu = rng.uniform(-0.5, 1.5, n)
    s = rng.uniform(0.01, 0.2, n)
    log_members = mu[:, None] + s[:, None] * rng.standard_normal((n, members))
    mu_hat, s_hat = log_members.mean(1), log_members.std(1, ddof=1)
    labels = 10 ** (mu_hat + (0.05 + 2 * s_hat) * rng.standard_normal(n) + shift)
    return labels, 10 ** log_members


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 10, dtype=float)  # n = 9
    assert conformal_quantile(scores, 0.5) == 5.0  # ceil(10 * 0.5) = 5th smallest
    assert conformal_quantile(scores, 0.9) == 9.0
    assert conformal_quantile(scores, 0.95) == np.inf  # ceil(9.5) = 10 > n
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_quantile(scores, 1.5)


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_a_calibrated_interval_covers_at_its_level_and_beats_constant_width(level):
    rng = np.random.RandomState(0)
    labels, members = synthetic(2000, rng)
    domain = rng.uniform(0.5, 1.5, len(labels))
    cal = fit_calibration(labels, members, domain, reference=rng.standard_normal((50, 4)), level=level)
    y, m = synthetic(4000, rng)
    d = rng.uniform(0.5, 1.5, len(y))
    lo, hi = cal.interval(m, d)
    clo, chi = cal.interval(m, d, constant=True)
    cover = np.mean((y >= lo) & (y <= hi))
    assert abs(cover - level) < 0.03, cover
    assert abs(np.mean((y >= clo) & (y <= chi)) - level) < 0.03
    assert cal.coefficients[1] > 0.5  # the spread was found to predict the error
    assert np.mean(interval_score(lo, hi, y, level)) < 0.95 * np.mean(interval_score(clo, chi, y, level))
    assert np.all(lo < hi)


def test_a_shifted_set_is_flagged_and_an_unshifted_one_is_not():
    rng = np.random.RandomState(1)
    train = rng.standard_normal((200, 8))
    scorer = DomainScorer.fit(train)
    inside = scorer.score(rng.standard_normal((200, 8)))
    far = scorer.score(rng.standard_normal((200, 8)) + 4.0)
    assert 0.7 < np.median(inside) < 1.5
    labels, members = synthetic(200, rng)
    cal = fit_calibration(labels, members, inside, reference=train)
    assert np.mean(inside > cal.threshold) < 0.1
    assert np.mean(far > cal.threshold) > 0.95
    warnings = cal.warnings(far[:3])
    assert all("domain score" in w and "may not hold" in w for w in warnings)
    assert cal.warnings(np.array([0.0])) == [""]


def test_a_calibration_is_saved_and_refused_when_damaged(tmp_path):
    rng = np.random.RandomState(2)
    labels, members = synthetic(100, rng)
    cal = fit_calibration(labels, members, rng.uniform(size=100), reference=rng.standard_normal((20, 3)))
    cal.save(tmp_path / "intervals.json")
    again = load_calibration(tmp_path)
    assert np.allclose(again.interval(members, np.ones(100)), cal.interval(members, np.ones(100)))
    assert load_calibration(tmp_path / "nothing") is None
    text = (tmp_path / "intervals.json").read_text()
    (tmp_path / "intervals.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="intervals.json: not a usable interval calibration"):
        Calibration.load(tmp_path / "intervals.json")


def test_nested_csv_round_trips(tmp_path):
    rows = [(1, "mp-1", 2.5, np.array([1.0, 2.0]), 0.9), (2, "mp-2", 7.0, np.array([6.0, 8.0]), 1.3)]
    write_nested(tmp_path / "nested.csv", rows)
    outer, ids, y, m, d = read_nested(tmp_path / "nested.csv")
    assert outer.tolist() == [1, 2] and ids == ["mp-1", "mp-2"] and y.tolist() == [2.5, 7.0]
    assert m.tolist() == [[1.0, 2.0], [6.0, 8.0]] and d.tolist() == [0.9, 1.3]


def test_the_nested_split_never_scores_a_material_an_inner_model_trained_on(tmp_path):
    """Each outer fold's inner dataset holds exactly split k's training part, and none of its validation part."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from calibrate_intervals import inner_folder

    from paraisite.data.splits import split_indices

    n = 95
    ids = [f"mp-{i}" for i in range(n)]
    cif = tmp_path / "cif"
    cif.mkdir()
    for i in ids:
        (cif / f"{i}.cif").write_text("data_x\n")
    for k in range(1, 10):
        train, val = split_indices(n, k)
        folder = inner_folder(tmp_path / "work", k, [ids[i] for i in train], ["X"] * len(train),
                              np.ones(len(train)), cif)
        listed = {line.split(",")[0] for line in (folder / "labels.csv").read_text().split()[1:]}
        on_disk = {p.stem for p in (folder / "cif").iterdir()}
        assert listed == on_disk == {ids[i] for i in train}
        assert not listed & {ids[i] for i in val}


def test_the_shipped_ensemble_gives_intervals_from_python_and_scan(tmp_path):
    from paraisite import load_ltc_model
    from paraisite.screening.shipped import default_models

    if load_calibration(default_models()) is None:
        pytest.fail("the shipped ensemble has no intervals.json")
    from pymatgen.core import Structure

    nacl = Structure.from_file(str(ROOT / "examples" / "NaCl.cif"))
    p = load_ltc_model(device="cpu").predict([nacl])
    assert p.lo[0] < p.mean[0] < p.hi[0] and p.level == 0.9 and np.isfinite(p.domain[0])
    p80 = load_ltc_model(device="cpu").predict([nacl], level=0.8)
    assert p.lo[0] < p80.lo[0] < p80.hi[0] < p.hi[0]


def test_a_scan_of_miyazaki21_gives_intervals_whose_coverage_is_the_documented_one(shared, tmp_path):
    """The shipped ensemble never saw Miyazaki2021: scan.py's ltc_lo..ltc_hi cover its labels as the card and
    docs/results/intervals.md say."""
    import csv
    import json

    import scan as scan_py
    from conftest import working_folder
    from paraisite.screening.shipped import default_models

    out = tmp_path / "miyazaki_ltc.csv"
    with working_folder(tmp_path):
        assert scan_py.main([str(shared / "data" / "miyazaki21"), "--out", str(out), "--no-progress", "--top", "0"]) == 0
    rows = list(csv.DictReader(open(out)))
    y = np.array([float(r["input_ltc"]) for r in rows])
    lo, hi = (np.array([float(r[c]) for r in rows]) for c in ("ltc_lo", "ltc_hi"))
    domain = np.array([float(r["domain"]) for r in rows])
    coverage = np.mean((y >= lo) & (y <= hi))
    card = json.loads((default_models() / "card.json").read_text())["figures"]["unseen"]["miyazaki21"]
    assert abs(coverage - card["intervals"]["0.9"]["coverage"]) < 1e-9
    assert abs(np.mean(domain > load_calibration(default_models()).threshold) - card["flagged"]) < 1e-9
    flagged = [r for r in rows if r["domain"] and float(r["domain"]) > load_calibration(default_models()).threshold]
    assert all("domain score" in r["warning"] for r in flagged)
    report = (ROOT / "docs" / "results" / "intervals.md").read_text()
    assert f"| miyazaki21 | {len(rows)} | 90% | {coverage:.0%} |" in report


def _shipped_copy(tmp_path, keep_intervals: bool, list_intervals: bool) -> Path:
    import json
    import shutil

    from paraisite.screening.shipped import MANIFEST, default_models

    folder = tmp_path / "shipped"
    shutil.copytree(default_models(), folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if not list_intervals:
        manifest["files"].pop("intervals.json")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    if not keep_intervals:
        (folder / "intervals.json").unlink()
    return folder


def test_an_unlisted_calibration_is_refused_and_interval_needs_one(tmp_path, capsys):
    import scan as scan_py
    from conftest import working_folder
    from megnet_pt.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="intervals.json: not listed in the shipped ensemble's manifest"):
        load_calibration(_shipped_copy(tmp_path / "a", keep_intervals=True, list_intervals=False))
    bare = _shipped_copy(tmp_path / "b", keep_intervals=False, list_intervals=False)
    assert load_calibration(bare) is None
    with working_folder(tmp_path):
        code = scan_py.main([str(ROOT / "examples"), "--models", str(bare), "--interval", "0.8", "--no-progress"])
        assert code == 2 and "has no intervals.json" in capsys.readouterr().err
        assert scan_py.main([str(ROOT / "examples"), "--interval", "1.2", "--no-progress"]) == 2
        assert "--interval must be between 0 and 1" in capsys.readouterr().err
        assert scan_py.main([str(ROOT / "examples"), "--models", str(bare), "--out", "bare.csv", "--no-progress"]) == 0
    header = (tmp_path / "bare.csv").read_text().split("\n")[0].split(",")
    assert "ltc_lo" not in header and "ltc_mean" in header


def test_a_scan_resumed_at_another_interval_level_is_refused(tmp_path, capsys):
    import scan as scan_py
    from conftest import working_folder

    with working_folder(tmp_path):
        assert scan_py.main([str(ROOT / "examples"), "--out", "x.csv", "--no-progress"]) == 0
        assert scan_py.main([str(ROOT / "examples"), "--out", "x.csv", "--no-progress", "--interval", "0.9"]) == 0
        assert scan_py.main([str(ROOT / "examples"), "--out", "x.csv", "--no-progress", "--interval", "0.8"]) == 2
        assert "other intervals (--interval" in capsys.readouterr().err
