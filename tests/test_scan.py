"""scan.py: the nine-model screening of a graph cache (ensemble, streaming, resume, torchrun, summary)."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from conftest import working_folder
from megnet_pt.cache import GraphCache, build_cache
from megnet_pt.fast import is_fast
from paraisite.screening import summary as scan_summary
from paraisite.screening import scan as screening
from paraisite.checkpoint import load_model_file, save_model
from paraisite.screening.ensemble import Ensemble, load_ensemble
from paraisite.screening.fused import FusedEform
from paraisite.model import ParAIsite
from paraisite.transform import TargetTransform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scan  # noqa: E402

N_TOGO, N_AFLOW = 20, 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared):
    """One working folder: the training-domain cache (togo15) and converted weights are built once."""
    # one thread: tiny batches on a shared machine, where threads only wait for each other
    with working_folder(tmp_path_factory.mktemp("scan"), threads=1) as d:
        yield d


def make_run(run: Path, seed: int = 0) -> Path:
    """Nine random ParAIsite checkpoints laid out as train.py writes them (heads scaled so the models disagree)."""
    (run).mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"init": "rw", "dataset": "togo15", "cutoff": 4.0}))
    for k in range(1, 10):
        torch.manual_seed(1000 * seed + k)
        model = ParAIsite()
        with torch.no_grad():
            for p in model.head.parameters():
                p.mul_(3.0)
        for selection in ("best", "final"):
            save_model(model, TargetTransform(0.8 + 0.05 * k, 0.5), run / f"split{k}" / f"{selection}.pt",
                       init="rw", dataset="togo15", split=k, epoch=1, selection=selection)
    return run


@pytest.fixture(scope="module")
def run_dir(workdir):
    return make_run(workdir / "runs" / "tiny")


@pytest.fixture(scope="module")
def inputs(workdir, shared):
    """A few dozen structures: Togo15 and AFLOW CIFs, an isolated atom, an unsupported element, a broken file."""
    d = workdir / "structures"
    d.mkdir()
    for f in sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[:N_TOGO]:
        shutil.copy(f, d / f.name)
    for f in sorted((shared / "data" / "aflow_agl" / "cif").glob("*.cif"))[::270][:N_AFLOW]:
        shutil.copy(f, d / f.name)
    CifWriter(Structure(Lattice.cubic(9.0), ["Na"], [[0, 0, 0]])).write_file(d / "lonely-Na.cif")
    CifWriter(Structure(Lattice.cubic(3.36), ["Po"], [[0, 0, 0]])).write_file(d / "polonium.cif")
    (d / "broken.cif").write_text("data_broken\nthis is not a CIF\n")
    return d


@pytest.fixture(scope="module")
def cache_path(workdir, inputs):
    path = workdir / "structures.h5"
    build_cache([inputs], path, cutoff=4.0, progress=False)
    return path


def run_scan_cli(*args) -> int:
    return scan.main([str(a) for a in args] + ["--no-progress", "--with-eform"])


def read(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def values(rows: list[dict], prefix: str = "ltc_") -> np.ndarray:
    names = [c for c in rows[0] if c.startswith(prefix)]
    return np.array([[float(r[c]) if r[c] else math.nan for c in names] for r in rows])


@pytest.fixture(scope="module")
def baseline(workdir, run_dir, cache_path):
    """One complete scan, batch size 32, one process: what every variant must reproduce."""
    out = workdir / "base" / "ltc.csv"
    out.parent.mkdir()
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out, "--correlations", "--top", "10") == 0
    return out


def test_fused_pass_matches_each_models_own_forward(run_dir, cache_path, shared, workdir):
    ensemble = load_ensemble(run_dir)
    cache = GraphCache(cache_path)
    batch = cache.batch(np.arange(len(cache)))
    ensemble.method = "reference"
    ref = ensemble(batch)
    ensemble.method = "fused"
    for per_pass in (None, 2):
        ensemble.set_models_per_pass(per_pass)
        torch.testing.assert_close(ensemble(batch), ref, rtol=2e-5, atol=1e-6)
    fast = load_ensemble(run_dir, method="fast")  # megnet_pt's C++ nodes, model after model
    torch.testing.assert_close(fast(batch), ref, rtol=2e-5, atol=1e-6)
    assert is_fast(fast.models[0].megnet) and not is_fast(ensemble.models[0].megnet)
    assert ref.shape == (len(cache), 9) and (ref.std(dim=1) > 0).all()
    from megnet_pt import load_pretrained

    published = load_pretrained()
    torch.testing.assert_close(FusedEform(published)(batch), published(batch).prediction, rtol=1e-5, atol=1e-5)


def test_every_input_id_once_in_input_order(baseline, cache_path):
    cache = GraphCache(cache_path)
    rows = read(baseline)
    assert [r["id"] for r in rows] == cache.ids + [i for i, _ in cache.failures]
    assert len(rows) == N_TOGO + N_AFLOW + 3
    header = list(rows[0])
    assert header[:2] == ["id", "formula"] and header[2:11] == [f"ltc_split{k}" for k in range(1, 10)]
    assert header[11:16] == screening.STAT_COLUMNS and header[-2:] == ["eform_ev_per_atom", "warning"]
    pred = values(rows)[:, :9]
    ok = np.isfinite(pred).all(axis=1)
    stats = values(rows)[ok]
    m, s = pred[ok].mean(1), pred[ok].std(1, ddof=1)
    np.testing.assert_allclose(stats[:, 9], m, rtol=1e-5)
    np.testing.assert_allclose(stats[:, 10], s, rtol=1e-5)
    np.testing.assert_allclose(stats[:, 11], s / m, rtol=1e-5)
    np.testing.assert_allclose(stats[:, 12], pred[ok].max(1), rtol=1e-6)
    np.testing.assert_allclose(stats[:, 13], pred[ok].max(1) * s / m, rtol=1e-5)
    assert not (baseline.parent / "ltc.csv.parts").exists() and (baseline.parent / "ltc.scan.json").is_file()
    from megnet_pt import load_pretrained

    eform = load_pretrained()(cache.batch(np.arange(len(cache)))).prediction.detach().numpy()
    np.testing.assert_allclose([float(r["eform_ev_per_atom"]) for r in rows[: len(cache)]], eform, rtol=1e-5, atol=1e-5)
    assert all(r["eform_ev_per_atom"] == "" for r in rows[len(cache):])


def test_failing_and_unusual_structures_are_reported_not_dropped(baseline, shared):
    rows = {r["id"]: r for r in read(baseline)}
    for sid, reason in (("broken", "cannot read"), ("polonium", "Po")):
        assert rows[sid]["warning"].startswith("error: could not be turned into a graph") and reason in rows[sid]["warning"]
        assert rows[sid]["ltc_mean"] == "" and rows[sid]["ltc_split1"] == ""
    assert "1 of 1 atoms have no neighbour within 4" in rows["lonely-Na"]["warning"]
    assert rows["lonely-Na"]["ltc_mean"] != ""
    # outside the training data: elements absent from Togo15, or more than twice its largest cell (4 atoms)
    from pymatgen.core import Composition

    togo_elements = set()
    for r in csv.DictReader(open(shared / "data" / "togo15" / "labels.csv")):
        togo_elements |= {str(e) for e in Composition(r["formula"]).elements}
    for r in rows.values():
        if r["warning"].startswith("error:"):
            continue
        unseen = {str(e) for e in Composition(r["formula"]).elements} - togo_elements
        assert ("not in the training data" in r["warning"]) == bool(unseen), r
        assert ("far beyond the training cells" in r["warning"]) == (int(r["n_sites"]) > 8), r


def test_same_output_whatever_the_batch_size_or_method(baseline, run_dir, cache_path, workdir):
    base = read(baseline)
    for batch_size, method in ((1, "fused"), (5, "fused"), (32, "fast")):
        out = workdir / f"bs{batch_size}_{method}" / "ltc.csv"
        assert run_scan_cli(cache_path, "--models", run_dir, "--out", out, "--batch-size", batch_size,
                            "--method", method) == 0
        rows = read(out)
        assert [r["id"] for r in rows] == [r["id"] for r in base]
        assert [r["warning"] for r in rows] == [r["warning"] for r in base]
        np.testing.assert_allclose(values(rows), values(base), rtol=2e-5, equal_nan=True)
        np.testing.assert_allclose(values(rows, "volume"), values(base, "volume"), rtol=1e-6, equal_nan=True)


def test_resume_after_interruption_loses_and_duplicates_nothing(baseline, run_dir, cache_path, workdir, monkeypatch):
    out = workdir / "resume" / "ltc.csv"
    calls = {"n": 0}
    real = screening.predict_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(screening, "predict_batch", interrupted)
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out, "--batch-size", 4) == 130
    part = out.with_name("ltc.csv.parts") / "rank0.csv"
    written = read(part)
    assert len(written) == 2 + 2 * 4 and not out.exists()  # the two failures, then two batches
    with open(part, "a") as f:  # a kill in the middle of a row
        f.write("mp-cut-short,AB,0.1,0.2")
    monkeypatch.setattr(screening, "predict_batch", real)
    calls["n"] = 0
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out, "--batch-size", 4) == 0
    rows, base = read(out), read(baseline)
    assert [r["id"] for r in rows] == [r["id"] for r in base]
    np.testing.assert_allclose(values(rows), values(base), rtol=2e-5, equal_nan=True)
    # The run log holds the run that finished the scan: it found the complete rows and predicted the rest.
    log = read(out.with_name("ltc.runs.csv"))
    assert [(int(r["already_done"]), int(r["structures"])) for r in log] == [(len(written), len(rows) - len(written))]
    # A finished scan is not redone: a re-run only rewrites the summary, which keeps the earlier runs' throughput.
    monkeypatch.setattr(screening, "predict_batch", lambda *a, **k: pytest.fail("predicted again"))
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out) == 0
    assert read(out) == rows
    assert read(out.with_name("ltc.runs.csv")) == log
    md = out.with_name("ltc.summary.md").read_text()
    assert md.count("- run of ") == 1 and "nothing left to predict" in md and " 0 structures in" not in md


def test_resume_with_other_models_is_refused(baseline, cache_path, workdir, capsys):
    other = make_run(workdir / "runs" / "other", seed=1)
    assert run_scan_cli(cache_path, "--models", other, "--out", baseline) == 2
    assert "other models" in capsys.readouterr().err
    assert run_scan_cli(cache_path, "--models", workdir / "runs" / "missing", "--out", workdir / "x.csv") == 2
    assert "no such run folder" in capsys.readouterr().err


def test_run_still_training_is_refused(cache_path, workdir, capsys):
    run = make_run(workdir / "runs" / "half")
    (run / "split4" / "final.pt").unlink()  # split 4 still training: its best.pt is only the best epoch so far
    assert run_scan_cli(cache_path, "--models", run, "--out", workdir / "half.csv") == 2
    assert "split(s) 4 are not finished (no final.pt)" in capsys.readouterr().err
    assert not (workdir / "half.csv").exists()


def test_models_failing_on_a_structure_cost_only_its_row(run_dir, cache_path, workdir, monkeypatch):
    victim = GraphCache(cache_path).ids[5]
    real = Ensemble.forward

    def fragile(self, batch):
        if victim in list(batch.id):
            raise RuntimeError("simulated failure")
        return real(self, batch)

    monkeypatch.setattr(Ensemble, "forward", fragile)
    out = workdir / "fragile" / "ltc.csv"
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out, "--batch-size", 8) == 0
    rows = {r["id"]: r for r in read(out)}
    assert rows[victim]["warning"].startswith("error: the models failed on this structure")
    assert rows[victim]["ltc_mean"] == "" and rows[victim]["n_sites"] != ""
    assert sum(1 for r in rows.values() if r["ltc_mean"]) == N_TOGO + N_AFLOW + 1 - 1


def test_structure_files_are_cached_first(baseline, run_dir, inputs, workdir):
    out = workdir / "from_cifs" / "ltc.csv"
    assert run_scan_cli(inputs, "--models", run_dir, "--out", out, "--cache", workdir / "from_cifs" / "g.h5") == 0
    rows, base = read(out), read(baseline)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in base)
    assert (workdir / "from_cifs" / "g.h5").is_file()


def test_top_table_and_plots(baseline):
    rows = [r for r in read(baseline) if r["ltc_max"]]
    expected = sorted(rows, key=lambda r: float(r["ltc_max"]))[:10]
    md = baseline.with_name("ltc.summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[1] for line in table] == [r["id"] for r in expected]
    for suffix in (".ltc.png", ".spread.png"):
        png = baseline.with_name("ltc" + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_correlations_match_numpy(baseline):
    rows = [r for r in read(baseline) if r["ltc_mean"]]
    stored = {(c["target"], c["descriptor"]): c for c in csv.DictReader(open(baseline.with_name("ltc.correlations.csv")))}
    mean = np.array([float(r["ltc_mean"]) for r in rows])
    variance = np.array([float(r["ltc_std"]) for r in rows]) ** 2
    for descriptor in ("volume", "n_sites", "density", "atomic_density", "n_elements", "eform_ev_per_atom"):
        x = np.array([float(r[descriptor]) for r in rows])
        for target, y in (("ltc_mean", mean), ("ltc_variance", variance)):
            c = stored[(target, descriptor)]
            assert int(c["n"]) == len(rows)
            assert float(c["pearson_r"]) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)


def test_pearson_is_scipys_over_the_pairs_without_nan():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=1001)
    y = 0.1 * x + rng.normal(size=1001)
    y[[3, 500]] = np.nan
    r, p, n = scan_summary.pearson(x, y)
    expected = stats.pearsonr(np.delete(x, [3, 500]), np.delete(y, [3, 500]))
    assert n == 999 and r == pytest.approx(expected.statistic, rel=1e-12) and p == pytest.approx(expected.pvalue, rel=1e-9)
    assert all(math.isnan(v) for v in scan_summary.pearson(x, np.ones_like(x))[:2])  # constant: undefined
    assert all(math.isnan(v) for v in scan_summary.pearson(x[:2], y[:2])[:2])


def test_torchrun_two_processes_give_the_one_process_output(baseline, run_dir, cache_path, workdir):
    out = workdir / "ddp" / "ltc.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "scan.py"), str(cache_path), "--models", str(run_dir), "--out", str(out), "--batch-size", "3",
           "--no-progress", "--with-eform"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, base = read(out), read(baseline)
    assert [r["id"] for r in rows] == [r["id"] for r in base]
    assert [r["warning"] for r in rows] == [r["warning"] for r in base]
    np.testing.assert_allclose(values(rows), values(base), rtol=2e-5, equal_nan=True)
    assert not out.with_name("ltc.csv.parts").exists()


def test_correlations_with_the_inputs_own_fields(run_dir, shared, workdir):
    """A cache of records with fields (a float, a boolean, one missing for some): input_ columns, scipy's r and p."""
    from scipy import stats

    rng = np.random.default_rng(3)
    records = []
    for k, f in enumerate(sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[:14]):
        record = {"material_id": f.stem, "structure": Structure.from_file(f).as_dict(), "band_gap": float(rng.uniform(0, 4)),
                  "is_stable": bool(k % 3), "formula_pretty": "text, not a field"}
        if k % 4:
            record["hardness"] = float(rng.normal())  # missing for every fourth
        records.append(record)
    source = workdir / "fields" / "records.json"
    source.parent.mkdir()
    source.write_text(json.dumps(records))
    cache = source.with_suffix(".h5")
    build_cache([source], cache, progress=False)
    out = source.with_name("ltc.csv")
    assert run_scan_cli(cache, "--models", run_dir, "--out", out, "--correlations") == 0
    rows = read(out)
    assert [r["id"] for r in rows] == [r["material_id"] for r in records]
    assert [float(r["input_band_gap"]) for r in rows] == [r["band_gap"] for r in records]
    assert [r["input_is_stable"] for r in rows] == [str(int(r["is_stable"])) for r in records]
    assert [r["input_hardness"] for r in rows][::4] == ["", "", "", ""]
    stored = {(c["target"], c["descriptor"]): c for c in csv.DictReader(open(out.with_name("ltc.correlations.csv")))}
    mean = np.array([float(r["ltc_mean"]) for r in rows])
    variance = np.array([float(r["ltc_std"]) for r in rows]) ** 2
    for field in ("band_gap", "is_stable", "hardness"):
        x = np.array([float(r[f"input_{field}"]) if r[f"input_{field}"] else math.nan for r in rows])
        ok = np.isfinite(x)
        for target, y in (("ltc_mean", mean), ("ltc_variance", variance)):
            expected = stats.pearsonr(x[ok], y[ok])
            c = stored[(target, f"input_{field}")]
            assert int(c["n"]) == ok.sum() == (14 if field != "hardness" else 10)
            assert float(c["pearson_r"]) == pytest.approx(expected.statistic, rel=1e-6)
            assert float(c["p_value"]) == pytest.approx(expected.pvalue, rel=1e-5)
    md = out.with_name("ltc.summary.md").read_text()
    assert "is_stable (field of the input)" in md and "formula_pretty" not in md


def test_rows_stay_on_their_materials_when_structures_in_the_middle_fail(run_dir, shared, workdir):
    """Upstream's scan_mdp.py joins predictions to rows by position after skipping empty structures, which shifts
    every later row (docs/results.md); here each row keeps its own material's prediction."""
    files = sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[:10]
    records = [{"material_id": f.stem, "structure": Structure.from_file(f).as_dict()} for f in files]
    for k in (2, 5):
        records[k]["structure"] = None  # empty, in the middle
    folder = workdir / "aligned"
    folder.mkdir()
    (folder / "with_gaps.json").write_text(json.dumps(records))
    (folder / "good.json").write_text(json.dumps([r for r in records if r["structure"] is not None]))
    outs = {}
    for name in ("with_gaps", "good"):
        outs[name] = folder / f"{name}_ltc.csv"
        assert run_scan_cli(folder / f"{name}.json", "--models", run_dir, "--out", outs[name],
                            "--cache", folder / f"{name}.h5") == 0
    rows = read(outs["with_gaps"])
    alone = {r["id"]: r for r in read(outs["good"])}
    assert [r["id"] for r in rows] == [f.stem for f in files if f.stem in alone] + [files[2].stem, files[5].stem]
    for r in rows:
        if r["id"] in (files[2].stem, files[5].stem):
            assert r["warning"].startswith("error:") and "no structure" in r["warning"] and r["ltc_mean"] == ""
        else:
            assert r["formula"] == alone[r["id"]]["formula"]
            assert [r[f"ltc_split{k}"] for k in range(1, 10)] == [alone[r["id"]][f"ltc_split{k}"] for k in range(1, 10)]


def test_a_prediction_at_or_below_zero_is_flagged_and_never_ranked(run_dir, cache_path, workdir):
    """A collapsed model predicts LTC <= 0 W/m/K, which no material has: here split 1's target is shifted down so
    that about half its predictions are (its standardised outputs read off a first scan)."""
    first = read(workdir / "base" / "ltc.csv") if (workdir / "base" / "ltc.csv").is_file() else None
    if first is None:
        first_out = workdir / "collapsed_first" / "ltc.csv"
        first_out.parent.mkdir()
        assert run_scan_cli(cache_path, "--models", run_dir, "--out", first_out) == 0
        first = read(first_out)
    log = np.log10(np.array([float(r["ltc_split1"]) for r in first if r["ltc_split1"]]) + 1)  # 0.5 z + 0.85
    run = workdir / "runs" / "collapsed"
    shutil.copytree(run_dir, run)
    model, _, _ = load_model_file(run / "split1" / "best.pt")
    for selection in ("best", "final"):
        save_model(model, TargetTransform(0.85 - float(np.median(log)), 0.5), run / "split1" / f"{selection}.pt",
                   init="rw", dataset="togo15", split=1, epoch=1, selection=selection)
    out = workdir / "collapsed" / "ltc.csv"
    out.parent.mkdir()
    assert run_scan_cli(cache_path, "--models", run, "--out", out, "--top", "10") == 0
    rows = [r for r in read(out) if r["ltc_max"]]
    low = {r["id"] for r in rows if min(float(r[c]) for c in r if c.startswith("ltc_split")) <= 0}
    assert low and len(low) < len(rows)  # some, not all: the rankings still have rows
    flagged = {r["id"] for r in rows if "predict <= 0 W/m/K" in r["warning"]}
    assert flagged == low
    md = out.with_name("ltc.summary.md").read_text()
    assert f"{len(low)} structure(s) have a prediction at or below 0 W/m/K" in md
    table = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert table and not set(table) & low


def test_a_second_scan_into_the_same_output_is_refused_naming_the_first(run_dir, cache_path, workdir, capsys):
    import fcntl

    from paraisite.screening.files import ScanPaths

    out = workdir / "busy" / "ltc.csv"
    out.parent.mkdir()
    with open(ScanPaths(out).lock, "a+") as held:  # a first scan, still running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        assert run_scan_cli(cache_path, "--models", run_dir, "--out", out) == 2
    assert "another scan is writing it (pid 4242)" in capsys.readouterr().err and not out.exists()
    assert run_scan_cli(cache_path, "--models", run_dir, "--out", out) == 0  # once it is done
    assert not ScanPaths(out).lock.exists()


def test_with_bandgap_adds_the_pbe_gap_and_correlations_use_it_where_the_input_has_none(run_dir, shared, workdir):
    """--with-bandgap: the band-gap MEGNet's PBE gap from the cached 4 Å graphs searched again at 5 Å, equal to
    megnet_pt's own prediction from the CIF; the combined band_gap descriptor is the input's where given."""
    from scipy import stats

    from megnet_pt import structure_to_graph
    from megnet_pt.convert import convert_published

    files = sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[20:32]
    records = [{"material_id": f.stem, "structure": Structure.from_file(f).as_dict()} for f in files]
    for k, record in enumerate(records):
        if k % 3:
            record["band_gap"] = 0.5 + 0.1 * k  # missing for every third: the predicted gap stands in
    source = workdir / "gaps" / "records.json"
    source.parent.mkdir()
    source.write_text(json.dumps(records))
    cache = source.with_suffix(".h5")
    build_cache([source], cache, progress=False)
    out = source.with_name("ltc.csv")
    assert scan.main([str(cache), "--models", str(run_dir), "--out", str(out), "--no-progress", "--with-bandgap",
                      "--correlations", "--base-url", str(shared / "upstream")]) == 0
    rows = read(out)
    assert "band_gap_pbe_ev" in rows[0] and "eform_ev_per_atom" not in rows[0]
    model = convert_published(shared / "upstream" / "matgl" / "pretrained_models" / "MEGNet-MP-2019.4.1-BandGap-mfi")[0]
    with torch.no_grad():
        want = model(Batch.from_data_list([structure_to_graph(Structure.from_file(f), cutoff=5.0) for f in files]),
                     state=0).prediction.numpy()
    np.testing.assert_allclose([float(r["band_gap_pbe_ev"]) for r in rows], want, atol=1e-4, rtol=0)
    combined = np.array([float(r["input_band_gap"]) if r["input_band_gap"] else float(r["band_gap_pbe_ev"])
                         for r in rows])
    mean = np.array([float(r["ltc_mean"]) for r in rows])
    stored = {(c["target"], c["descriptor"]): c for c in csv.DictReader(open(out.with_name("ltc.correlations.csv")))}
    c = stored[("ltc_mean", "band_gap")]
    assert int(c["n"]) == len(rows) and int(stored[("ltc_mean", "input_band_gap")]["n"]) == 8
    assert float(c["pearson_r"]) == pytest.approx(stats.pearsonr(combined, mean).statistic, rel=1e-6)
    assert "the input's where given, else the predicted PBE gap" in out.with_name("ltc.summary.md").read_text()
