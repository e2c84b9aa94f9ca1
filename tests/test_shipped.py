"""The ensemble shipped in weights/: its card's figures recomputed from its files, its digests, and the ways in.

Not skipped when the weights are missing: a clean clone has them, and screening right after install needs them.
"""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import scan as scan_py
from conftest import working_folder
from megnet_pt.checkpoint import CheckpointError
from paraisite import load_ltc_model
from paraisite.evaluation.card import card_figures, render_card, unhealthy
from paraisite.screening.ensemble import load_ensemble
from megnet_pt.download import sha256_file
from paraisite.screening.shipped import MANIFEST, check_shipped, default_models, write_shipped

SHIPPED = default_models()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def close(a, b, path="figures"):
    """Every number of ``a`` within 1e-5 (relative, or absolute near 0) of ``b``; names the first that is not."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), f"{path}: {a} recomputed, {b} in card.json"
    else:
        assert a == b, f"{path}: {a!r} recomputed, {b!r} in card.json"


@pytest.fixture(scope="module")
def card():
    assert SHIPPED.is_dir(), f"{SHIPPED}: the shipped ensemble is missing (scripts/ship_ensemble.py writes it)"
    return json.loads((SHIPPED / "card.json").read_text())


def test_every_shipped_file_has_its_digest_and_the_ensemble_is_small(card):
    manifest = check_shipped(SHIPPED)
    assert manifest["files"] == card["files"]
    on_disk = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {MANIFEST, "card.json", "README.md"}
    for name, digest in manifest["files"].items():
        assert sha256_file(SHIPPED / name) == digest
    assert sum((SHIPPED / n).stat().st_size for n in on_disk) < 20e6
    assert len([n for n in manifest["files"] if n.endswith(".pt")]) == 9


@pytest.mark.slow
def test_the_card_is_what_the_shipped_files_give(card, shared, graph_caches, tmp_path):
    with working_folder(graph_caches.parent):
        figures = card_figures(SHIPPED)
    close(figures, card["figures"])
    assert not unhealthy(figures)  # no collapsed member: every prediction > 0, Spearman > 0.8 on its own fold
    assert (SHIPPED / "README.md").read_text() == render_card(card)


def test_a_changed_byte_in_a_shipped_file_is_refused(tmp_path):
    for name in ("split3/final.pt", "config.json"):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(SHIPPED, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=f"{name}: sha256 differs"):
            load_ensemble(copy)
    copy = tmp_path / "extra"
    shutil.copytree(SHIPPED, copy)
    shutil.copytree(copy / "split1", copy / "split10")  # a model the manifest does not list
    with pytest.raises(CheckpointError, match="split10/final.pt: not in"):
        load_ensemble(copy)
    with pytest.raises(CheckpointError, match="a shipped ensemble of final.pt models only"):
        load_ensemble(SHIPPED, "best")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="ensemble.json: unreadable"):
        load_ensemble(copy)


def test_write_shipped_takes_only_a_whole_finished_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SHIPPED, run)
    (run / MANIFEST).unlink()
    (run / "split4" / "final.pt").unlink()
    with pytest.raises(Exception, match="split.s. 4 are not finished"):
        write_shipped(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError):
        write_shipped(SHIPPED, tmp_path)


def test_unhealthy_names_a_collapsed_member():
    rows = [{"split": 1, "min_prediction": 0.3, "spearman": 0.9}, {"split": 2, "min_prediction": -1.0, "spearman": 0.9},
            {"split": 3, "min_prediction": 2.0, "spearman": 0.5}]
    assert unhealthy({"validation": {"splits": rows}}) == ["split 2: a prediction <= 0 W/m/K", "split 3: Spearman 0.50 <= 0.8"]


def test_one_structure_from_python_is_what_scan_py_writes(tmp_path):
    from pymatgen.core import Structure

    structures = [Structure.from_file(p) for p in sorted(EXAMPLES.glob("*.cif"))]
    model = load_ltc_model(device="cpu")
    got = model.predict(structures)
    assert got.members.shape == (len(structures), 9) and np.isfinite(got.members).all() and (got.mean > 0).all()
    assert np.allclose(got.mean, got.members.mean(axis=1)) and np.allclose(got.std, got.members.std(axis=1, ddof=1))
    ase = pytest.importorskip("pymatgen.io.ase")
    atoms = [ase.AseAtomsAdaptor.get_atoms(s) for s in structures]
    assert np.allclose(model.predict(atoms).members, got.members, rtol=1e-6)
    out = tmp_path / "examples_ltc.csv"
    with working_folder(tmp_path):
        assert scan_py.main([str(EXAMPLES), "--out", str(out), "--no-progress"]) == 0
    rows = {r["formula"]: r for r in csv.DictReader(open(out))}
    for formula, member in zip(got.formulas, got.members):
        written = [float(rows[formula][f"ltc_split{k}"]) for k in got.splits]
        assert np.allclose(written, member, rtol=1e-5), formula
    for formula, lo, hi, domain in zip(got.formulas, got.lo, got.hi, got.domain):
        row = rows[formula]
        assert np.allclose([float(row["ltc_lo"]), float(row["ltc_hi"]), float(row["domain"])], [lo, hi, domain],
                           rtol=1e-5), formula
    assert "ltc_fe_togo15_log10_clip10 (9 models, final)" in (tmp_path / "examples_ltc.summary.md").read_text()


def test_a_scan_of_noble_gas_structures_prints_no_library_warning(tmp_path):
    import subprocess
    import sys

    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    CifWriter(Structure(Lattice.cubic(4.0), ["He", "Ar"], [[0, 0, 0], [0.5, 0.5, 0.5]])).write_file(tmp_path / "HeAr.cif")
    root = Path(scan_py.__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(root / "scan.py"), "HeAr.cif", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Pauling" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr
    row = next(csv.DictReader(open(tmp_path / "HeAr_ltc.csv")))
    assert row["formula"] == "ArHe" and "He" in row["warning"] and float(row["ltc_mean"]) > 0, row  # flagged, not hidden
