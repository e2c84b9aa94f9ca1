"""train.py: the protocol on small settings (few epochs, two splits)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from conftest import working_folder
from megnet_pt.checkpoint import CheckpointError
from paraisite.training import rundir
from paraisite.training import steps
from paraisite.training import loop as training
from paraisite.training.rundir import RunDir
from paraisite.checkpoint import load_model_file, save_model
from paraisite.data.datasets import load_dataset
from paraisite.model import ParAIsite
from paraisite.data.splits import holdout_parts
from paraisite.training.loop import TrainConfig, initial_model
from paraisite.transform import TargetTransform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared, graph_caches):
    """One working folder for the module, so graph caches and converted weights are built once."""
    with working_folder(tmp_path_factory.mktemp("work")) as d:
        (d / "data").symlink_to(graph_caches)
        yield d


def run_train(*args: str) -> int:
    """train.py in this process (--processes 1), so that tests can watch and interrupt its loop."""
    return train.main([*args, "--no-progress", "--processes", "1"])


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_small_run_writes_everything(workdir):
    rc = run_train("--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--run-dir", "runs/small",
                   "--test-on", "miyazaki21")
    assert rc == 0
    run = workdir / "runs" / "small"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == "rw" and cfg["epochs"] == 2
    for k in (1, 2):
        curve = list(csv.DictReader(open(run / f"split{k}" / "curve.csv")))
        assert [int(r["epoch"]) for r in curve] == [1, 2]
        for sel in ("best", "final"):
            payload = torch.load(run / f"split{k}" / f"{sel}.pt", weights_only=True)
            assert payload["split"] == k and payload["selection"] == sel
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert {(int(r["split"]), r["selection"], r["test_dataset"]) for r in rows} == {
        (k, s, d) for k in (1, 2) for s in ("best", "final") for d in ("togo15", "miyazaki21")}
    # on the paper's scale (paraisite/evaluation/paper_scale.py): the training set is not rescaled, another test set is
    for r in rows:
        same = float(r["mape_paper_scale"]) == pytest.approx(float(r["mape"]), rel=1e-5)
        assert same == (r["test_dataset"] == "togo15"), r
    assert all(int(r["n"]) == 19 for r in rows if r["test_dataset"] == "togo15")
    assert all(int(r["n"]) == 29 for r in rows if r["test_dataset"] == "miyazaki21")
    summary = (run / "summary.md").read_text()
    assert "RWTG15" in summary and "0.55 (0.20)" in summary  # the paper's number beside ours
    assert (run / "curves.png").stat().st_size > 1000 and (run / "parity.png").stat().st_size > 1000
    # metrics in results.csv are those of the saved predictions
    preds = [r for r in csv.DictReader(open(run / "predictions.csv"))
             if r["split"] == "1" and r["selection"] == "final" and r["test_dataset"] == "togo15"]
    t = np.array([float(r["ltc"]) for r in preds])
    p = np.array([float(r["predicted"]) for r in preds])
    row = next(r for r in rows if r["split"] == "1" and r["selection"] == "final" and r["test_dataset"] == "togo15")
    assert float(row["mape"]) == pytest.approx(np.mean(np.abs(t - p) / t), rel=1e-5)
    # a second run with the same arguments finds everything done and changes nothing
    mtime = (run / "split1" / "final.pt").stat().st_mtime_ns
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--run-dir", "runs/small",
                     "--test-on", "miyazaki21") == 0
    assert (run / "split1" / "final.pt").stat().st_mtime_ns == mtime


def test_a_collapsed_model_is_named_in_the_warning_and_the_summary(workdir, tmp_path, capsys):
    """A model whose predictions fell to -1 W/m/K (the AFLOW stage's collapse) is flagged, not only scored."""
    import shutil

    run = tmp_path / "collapsed"
    shutil.copytree(workdir / "runs" / "small", run)  # from test_small_run_writes_everything
    assert "Collapsed" not in (run / "summary.md").read_text()
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert all(0 <= float(r["share_nonpositive"]) <= 1 for r in rows)
    model, transform, meta = load_model_file(run / "split2" / "final.pt")
    with torch.no_grad():
        model.head[-1].bias.fill_(-1e3)  # every output far below the scaler's range: 10^(...) - 1 = -1
    save_model(model, transform, run / "split2" / "final.pt", **{k: meta[k] for k in ("selection", "init", "dataset", "split", "epoch")})
    (run / "split2" / "results.csv").unlink()  # so that split 2 is scored again
    capsys.readouterr()
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--run-dir", str(run),
                     "--test-on", "miyazaki21") == 0
    err = capsys.readouterr().err
    assert f"{run / 'split2'}/final.pt (epoch 2) collapsed: 100% of its togo15 validation predictions" in err
    assert "best.pt" not in err and "split1" not in err
    summary = (run / "summary.md").read_text()
    assert "## Collapsed models" in summary
    assert "- split 2, final (epoch 2): 100% of the predictions <= 0 W/m/K" in summary
    assert "split 1," not in summary.split("## Collapsed models")[1]
    # and docs/results.md says it under the run's table
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(run, runs / "rw_togo15")
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(runs), "--out", str(out)],
                   check=True, capture_output=True)
    assert "Collapsed (most validation predictions at or below 0 W/m/K): split 2: final (epoch 2)." in out.read_text()


def test_clipped_runs_get_folders_of_their_own(workdir, capsys):
    """--clip-grad-norm (not the paper's protocol) never lands in, or starts from, the paper's run folders."""
    assert run_train("--init", "rw+af", "--dataset", "togo15", "--epochs", "1", "--splits", "1,",
                     "--clip-grad-norm", "10") == 0
    stage = json.loads((workdir / "runs" / "rw_aflow_agl_clip10" / "config.json").read_text())
    run = json.loads((workdir / "runs" / "rw+af_togo15_clip10" / "config.json").read_text())
    assert stage["clip_grad_norm"] == run["clip_grad_norm"] == 10.0
    assert run["aflow_run"] == "runs/rw_aflow_agl_clip10"
    assert not (workdir / "runs" / "rw_aflow_agl").exists() and not (workdir / "runs" / "rw+af_togo15").exists()
    # and the clipped folder is refused to unclipped training (the settings differ in clip_grad_norm alone)
    capsys.readouterr()
    assert run_train("--init", "rw", "--dataset", "aflow_agl", "--epochs", "1", "--splits", "1,",
                     "--run-dir", "runs/rw_aflow_agl_clip10") == 2
    assert "clip_grad_norm: 10.0 there, None expected" in capsys.readouterr().err


def test_fast_step_runs_are_recorded_named_and_kept_apart(workdir, capsys, monkeypatch):
    """--fast-step: every step of the loop is the fast one, config.json and summary.md say so, its folder is its own,
    and a plain run's folder is refused to it (and --ensemble with it)."""
    from megnet_pt.fast import is_fast

    plain_step = steps.PlainStep.step
    used = []
    monkeypatch.setattr(steps.PlainStep, "step", lambda self, b: used.append(is_fast(self.model)) or plain_step(self, b))
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "1,", "--fast-step") == 0
    run = workdir / "runs" / "rw_togo15_fast"
    assert used and all(used)
    assert json.loads((run / "config.json").read_text())["fast_step"] is True
    assert "Trained with the fast step (`--fast-step`" in (run / "summary.md").read_text()
    assert torch.load(run / "split1" / "final.pt", weights_only=True)["run"]["settings"]["fast_step"] is True
    capsys.readouterr()
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "1,", "--run-dir", str(run)) == 2
    assert "fast_step: True there, False expected" in capsys.readouterr().err
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "1", "--fast-step", "--ensemble") == 2
    assert "--fast-step is one model at a time on a CPU" in capsys.readouterr().err


def test_select_holdout_chooses_best_on_the_held_out_share_and_never_trains_on_it(workdir, shared, capsys):
    """--select-holdout (not the paper's protocol): best.pt by the loss on a share of the training part."""
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "4", "--splits", "2", "--select-holdout", "0.2") == 0
    run = workdir / "runs" / "rw_togo15_holdout0.2"
    assert json.loads((run / "config.json").read_text())["select_holdout"] == 0.2
    z = np.log10(np.array([float(r["ltc"]) for r in csv.DictReader(open(shared / "data" / "togo15" / "labels.csv"))]) + 1)
    picks = []
    for k in (1, 2):
        curve = list(csv.DictReader(open(run / f"split{k}" / "curve.csv")))
        select = [float(r["select_loss"]) for r in curve]
        val = [float(r["val_loss"]) for r in curve]
        best = torch.load(run / f"split{k}" / "best.pt", weights_only=True)
        assert best["epoch"] == 1 + int(np.argmin(select))
        picks.append((int(np.argmin(select)), int(np.argmin(val))))
        fit, held, _ = holdout_parts([95], k, 0.2)
        _, transform, _ = load_model_file(run / f"split{k}" / "best.pt")
        assert transform.mean == pytest.approx(z[fit].mean(), abs=1e-6)  # fitted on what it trains on, not on `held`
    assert any(a != b for a, b in picks)  # the selection really differs from the paper's on these splits
    summary = (run / "summary.md").read_text()
    assert "20% of the training part, held out from training" in summary
    capsys.readouterr()
    assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "1", "--select-holdout", "1.5") == 2
    assert "--select-holdout must be between 0 and 1" in capsys.readouterr().err


def test_processes_starting_one_new_run_folder_at_once_all_go_on(tmp_path, monkeypatch):
    """Two lanes (one split each) on a fresh folder: both write config.json; neither loses the other's file."""
    run, config = tmp_path / "fresh", TrainConfig(init="rw", dataset="togo15")
    real_replace, pid = os.replace, [1000]
    monkeypatch.setattr(rundir.os, "getpid", lambda: pid[0])

    def replace(src, dst):
        if pid[0] == 1000:  # the other process writes and renames its file just before this one renames its own
            pid[0] = 2000
            RunDir(run).check_config(config.to_dict())
            pid[0] = 1000
        real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    RunDir(run).check_config(config.to_dict())
    assert json.loads((run / "config.json").read_text())["init"] == "rw" and not list(run.glob("*.tmp"))


def test_run_folder_of_other_aflow_models_is_refused(tmp_path):
    run = tmp_path / "fe+af_togo15"
    RunDir(run).check_config(TrainConfig(init="fe+af", aflow_run="runs/fe_aflow_agl_e30").to_dict())
    RunDir(run).check_config(TrainConfig(init="fe+af", aflow_run="runs/./fe_aflow_agl_e30").to_dict())  # the same folder
    with pytest.raises(ValueError, match="aflow_run: 'runs/fe_aflow_agl_e30' there, 'runs/fe_aflow_agl' now"):
        RunDir(run).check_config(TrainConfig(init="fe+af", aflow_run="runs/fe_aflow_agl").to_dict())


def write_scaled_results(source: Path, dest: Path, factor: float, splits: set[str] | None = None,
                         drop: str | None = None) -> None:
    """``source``'s results.csv rows (of ``splits`` only, when given) with their MAPE multiplied by ``factor``
    (and without column ``drop``, as results of an older version)."""
    rows = [r for r in csv.DictReader(open(source)) if splits is None or r["split"] in splits]
    for r in rows:
        r["mape"] = str(float(r["mape"]) * factor)
        r.pop(drop, None)
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_make_results_builds_the_tables_from_run_folders(workdir, tmp_path):
    """scripts/make_results.py: our mean (std) beside the paper's, the CSVs copied, Fig. 6 drawn."""
    import shutil

    run = workdir / "runs" / "small"  # from test_small_run_writes_everything
    if not (run / "results.csv").is_file():
        assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--run-dir", str(run)) == 0
    shutil.copytree(run, tmp_path / "runs" / "rw_togo15")
    out = tmp_path / "docs" / "results.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(tmp_path / "runs"),
                    "--out", str(out)], check=True, capture_output=True)
    text = out.read_text()
    rows = [r for r in csv.DictReader(open(run / "results.csv")) if r["selection"] == "final" and r["test_dataset"] == "togo15"]
    mape = np.array([float(r["mape"]) for r in rows])
    assert f"| RWTG15 | MAPE | final | {mape.mean():.2f} ({mape.std():.2f}) |" in text
    assert "| RWTG15 | MAPE | paper | 0.55 (0.20) |" in text
    best, final = (np.array([float(r["mape"]) for r in csv.DictReader(open(run / "results.csv"))
                             if r["selection"] == sel and r["test_dataset"] == "togo15"]) for sel in ("best", "final"))
    cells = " | ".join(f"{v.mean():.2f} ({v.std():.2f})" for v in (best, final))
    # at a glance: an rw model on its own dataset has the same MAPE on the paper's scale
    assert f"| RWTG15 | `rw_togo15` (2 epochs) | 2 | {cells} | {cells} | 0.55 (0.20) |" in text
    copied = tmp_path / "docs" / "results" / "rw_togo15"
    assert (copied / "results.csv").read_text() == (run / "results.csv").read_text()
    curves = list(csv.DictReader(open(copied / "curves.csv")))
    assert sorted({(r["split"], r["epoch"]) for r in curves}) == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert (tmp_path / "docs" / "results" / "fig6_validation_curves.png").stat().st_size > 1000

    # The copies alone rebuild the same page (runs of earlier machines survive only as copies), and a
    # second run of the same model, from a later --runs folder, gets a split-by-split table beside the first.
    other = tmp_path / "later" / "rw_togo15_again"
    shutil.copytree(run, other)
    write_scaled_results(run / "results.csv", other / "results.csv", factor=2)
    again = tmp_path / "again" / "results.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(tmp_path / "docs" / "results"),
                    "--out", str(again)], check=True, capture_output=True)
    assert again.read_text() == text
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(tmp_path / "docs" / "results"),
                    str(tmp_path / "later"), "--out", str(again)], check=True, capture_output=True)
    both = again.read_text()
    assert "### RWTG15, the same splits: `rw_togo15` (2 epochs) vs `rw_togo15_again` (2 epochs)" in both
    first = {(r["split"], r["selection"]): float(r["mape"]) for r in csv.DictReader(open(run / "results.csv"))
             if r["test_dataset"] == "togo15"}
    for k in ("1", "2"):
        cells = [first[(k, "best")], 2 * first[(k, "best")], first[(k, "final")], 2 * first[(k, "final")]]
        assert f"| {k} | " + " | ".join(f"{v:.2f}" for v in cells) + " |" in both
    # a third run with split 1 alone gets a table of its own and does not cut the other two's down to split 1
    one = tmp_path / "later" / "rw_togo15_one"
    shutil.copytree(run, one)
    shutil.rmtree(one / "split2")
    write_scaled_results(run / "results.csv", one / "results.csv", factor=4, splits={"1"})
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(tmp_path / "docs" / "results"),
                    str(tmp_path / "later"), "--out", str(again)], check=True, capture_output=True)
    three = again.read_text().split("\n### ")
    tables = {t.splitlines()[0]: t for t in three if t.startswith("RWTG15, the same splits")}
    assert tables["RWTG15, the same splits: `rw_togo15` (2 epochs) vs `rw_togo15_again` (2 epochs)"].count("split by split (splits 1, 2)") == 1
    assert "split by split (splits 1)" in tables[
        "RWTG15, the same splits: `rw_togo15` (2 epochs) vs `rw_togo15_again` (2 epochs) vs `rw_togo15_one` (2 epochs)"]
    shutil.rmtree(one)

    # Splits of one run trained on another machine (here split 2 again, tripled) merge with the copies, split by split.
    more = tmp_path / "more" / "rw_togo15"
    more.mkdir(parents=True)
    config = json.loads((run / "config.json").read_text())
    assert config.pop("clip_grad_norm") is None  # as written by a version without that setting: the same settings
    (more / "config.json").write_text(json.dumps(config))
    shutil.copytree(run / "split2", more / "split2")
    write_scaled_results(run / "results.csv", more / "results.csv", factor=3, splits={"2"}, drop="mape_paper_scale")
    merged = tmp_path / "merged" / "results.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_results.py"), "--runs", str(tmp_path / "docs" / "results"),
                    str(tmp_path / "more"), "--out", str(merged)], check=True, capture_output=True)
    mape = np.array([first[("1", "final")], 3 * first[("2", "final")]])
    assert f"| RWTG15 | MAPE | final | {mape.mean():.2f} ({mape.std():.2f}) |" in merged.read_text()
    # split 2 now lacks the paper's scale: a mean over split 1 alone is not shown as the run's
    glance = next(line for line in merged.read_text().splitlines() if line.startswith("| RWTG15 | `rw_togo15`"))
    assert glance.endswith("| - | - | 0.55 (0.20) |") and f"({mape.std():.2f}) |" in glance
    copied = list(csv.DictReader(open(merged.parent / "results" / "rw_togo15" / "results.csv")))
    assert sorted({r["split"] for r in copied}) == ["1", "2"]
    assert {(r["split"], r["selection"], float(r["mape"])) for r in copied if r["test_dataset"] == "togo15"} == {
        ("1", "best", first[("1", "best")]), ("1", "final", first[("1", "final")]),
        ("2", "best", 3 * first[("2", "best")]), ("2", "final", 3 * first[("2", "final")])}


def test_scaler_is_fitted_on_training_part_only(workdir):
    data = load_dataset("togo15")
    train_idx, val_idx = data.split(1)
    run = workdir / "runs" / "small"
    if not (run / "split1" / "final.pt").is_file():
        pytest.skip("needs test_small_run_writes_everything")
    _, transform, _ = load_model_file(run / "split1" / "final.pt")
    z = np.log10(data.ltc.numpy().astype(np.float64) + 1)
    assert transform.mean == pytest.approx(z[train_idx].mean(), abs=1e-9)
    assert transform.std == pytest.approx(z[train_idx].std(), abs=1e-9)
    assert abs(transform.mean - z.mean()) > 1e-4  # the whole-dataset fit would differ


@pytest.mark.parametrize("extra, kill_at, saved_epochs", [
    ((), 15, 1),  # epoch 1 is 10 training steps; die inside epoch 2
    # two parameter groups and the SWA sums in the state: die inside epoch 3, after epoch 2 was summed
    (("--loss", "log10", "--megnet-lr", "1e-4", "--swa-epochs", "2"), 25, 2),
    # MEGNet frozen in the two saved epochs, so its Adam state is empty in the state: die inside epoch 3
    (("--freeze-megnet-epochs", "2"), 25, 2),
], ids=["paper", "log10_megnetlr_swa", "freeze"])
def test_resume_after_kill_gives_the_same_weights(workdir, monkeypatch, extra, kill_at, saved_epochs):
    args = ("--init", "fe", "--dataset", "togo15", "--epochs", "3", "--splits", "1", *extra)
    name = "_".join(extra).replace("-", "") or "paper"
    assert run_train(*args, "--run-dir", f"runs/straight_{name}") == 0

    real = steps.training_loss
    calls = {"n": 0}

    def dying_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(steps, "training_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run_train(*args, "--run-dir", f"runs/killed_{name}")
    monkeypatch.setattr(steps, "training_loss", real)
    state = torch.load(workdir / "runs" / f"killed_{name}" / "state_1.pt", weights_only=True)
    assert len(state["curves"][1]) == saved_epochs
    assert len(state["param_groups"]) == (2 if "--megnet-lr" in extra else 1)
    if "--freeze-megnet-epochs" in extra:  # the case this resumes from: no Adam state for MEGNet yet
        adam_state = state["members"][0]["adam"]
        assert all(not adam_state[n] for n in adam_state if n.startswith("megnet.")) and adam_state["head.0.weight"]
    assert run_train(*args, "--run-dir", f"runs/killed_{name}") == 0
    a = weights(workdir / "runs" / f"straight_{name}" / "split1" / "final.pt")
    b = weights(workdir / "runs" / f"killed_{name}" / "split1" / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    curve_a = list(csv.DictReader(open(workdir / "runs" / f"straight_{name}" / "split1" / "curve.csv")))
    curve_b = list(csv.DictReader(open(workdir / "runs" / f"killed_{name}" / "split1" / "curve.csv")))
    assert [r["val_loss"] for r in curve_a] == [r["val_loss"] for r in curve_b]


def test_fe_starts_from_the_published_weights(workdir, shared):
    ref = {json.loads(l)["id"]: json.loads(l) for l in open(shared / "reference" / "megnet_eform_reference.jsonl")}
    data = load_dataset("togo15")
    model = initial_model(TrainConfig(init="fe", dataset="togo15"), k=3).eval()
    with torch.no_grad():
        f = model.features(Batch.from_data_list(data.graphs))
    expected = torch.tensor([ref[i]["features16"] for i in data.ids])
    torch.testing.assert_close(f, expected, atol=1e-4, rtol=0)


def fake_aflow_run(root: Path, init: str = "fe", splits=(1, 2), wrong_split: dict | None = None) -> Path:
    """A finished AFLOW stage: best.pt (what +af starts from) and final.pt (the mark that the stage ended)."""
    for k in splits:
        torch.manual_seed(100 + k)
        model = ParAIsite()
        for selection in ("best", "final"):
            meta = dict(init=init, dataset="aflow_agl", split=(wrong_split or {}).get(k, k), epoch=1, selection=selection)
            save_model(model, TargetTransform(0.5, 0.3), root / f"split{k}" / f"{selection}.pt", **meta)
    return root


def test_fe_af_starts_from_the_aflow_model_of_the_same_split(workdir):
    aflow = fake_aflow_run(workdir / "runs" / "fake_aflow")
    config = TrainConfig(init="fe+af", dataset="togo15", aflow_run=str(aflow))
    for k in (1, 2):
        model = initial_model(config, k)
        saved = weights(aflow / f"split{k}" / "best.pt")
        other = weights(aflow / f"split{3 - k}" / "best.pt")
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key
        assert not all(torch.equal(v, other[key]) for key, v in model.state_dict().items())


def test_mismatched_or_missing_aflow_checkpoints_fail_before_training(workdir, capsys):
    aflow = fake_aflow_run(workdir / "runs" / "bad_aflow", wrong_split={2: 7})
    rc = run_train("--init", "fe+af", "--dataset", "togo15", "--epochs", "1", "--splits", "2",
                   "--aflow-run", str(aflow), "--run-dir", "runs/never1")
    assert rc == 2
    err = capsys.readouterr().err
    assert "split2" in err and "split is 7, expected 2" in err
    assert not (workdir / "runs" / "never1" / "split1").exists()

    rc = run_train("--init", "rw+af", "--dataset", "togo15", "--epochs", "1", "--splits", "1",
                   "--aflow-run", str(aflow), "--run-dir", "runs/never2")
    assert rc == 2 and "init is 'fe', expected 'rw'" in capsys.readouterr().err

    rc = run_train("--init", "fe+af", "--dataset", "togo15", "--epochs", "1", "--splits", "3",
                   "--aflow-run", str(aflow), "--run-dir", "runs/never3")
    assert rc == 2 and "no AFLOW model for split(s) [3]" in capsys.readouterr().err
    (aflow / "split1" / "best.pt").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="corrupt"):
        training.check_aflow_checkpoint(RunDir(aflow), "fe+af", 1, 4.0)


def test_interrupted_aflow_stage_is_finished_before_it_is_used(workdir, capsys):
    """best.pt is written at every improvement, so a stage stopped halfway has one: it must not pass for finished."""
    assert run_train("--init", "fe", "--dataset", "aflow_agl", "--epochs", "2", "--splits", "1",
                     "--run-dir", "runs/fe_aflow_agl", "--time-limit", "1e-6") == 0  # stops after epoch 1
    stage = workdir / "runs" / "fe_aflow_agl" / "split1"
    assert (stage / "best.pt").is_file() and (stage.parent / "state_1.pt").is_file() and not (stage / "final.pt").is_file()
    config = TrainConfig(init="fe+af", dataset="togo15", epochs=2, aflow_run="runs/fe_aflow_agl")
    with pytest.raises(CheckpointError, match="unfinished"):
        initial_model(config, 1)
    rc = run_train("--init", "fe+af", "--dataset", "togo15", "--epochs", "2", "--splits", "1",
                   "--aflow-run", "runs/fe_aflow_agl", "--run-dir", "runs/never4")
    assert rc == 2 and "stage of split(s) [1] is unfinished" in capsys.readouterr().err
    assert not (workdir / "runs" / "never4" / "split1").exists()
    # Without --aflow-run the stage is resumed to its last epoch, then the Togo15 run starts from its best model.
    assert run_train("--init", "fe+af", "--dataset", "togo15", "--epochs", "2", "--splits", "1") == 0
    assert [int(r["epoch"]) for r in csv.DictReader(open(stage / "curve.csv"))] == [1, 2]
    assert (stage / "final.pt").is_file() and not (stage.parent / "state_1.pt").exists()
    assert (workdir / "runs" / "fe+af_togo15" / "split1" / "final.pt").is_file()
    rows = list(csv.DictReader(open(workdir / "runs" / "fe+af_togo15" / "split1" / "results.csv")))
    # a +af model's module carries AFLOW's scaler upstream, so even its own training set is rescaled
    assert all(r["mape_paper_scale"] and float(r["mape_paper_scale"]) != pytest.approx(float(r["mape"])) for r in rows)
    started = initial_model(config, 1).state_dict()
    for key, value in weights(stage / "best.pt").items():
        assert torch.equal(started[key], value), key


@pytest.mark.parametrize("args, message", [
    (["--init", "xx"], "unknown --init 'xx'"),
    (["--dataset", "togo16"], "unknown dataset 'togo16'"),
    (["--test-on", "togo15,nope"], "unknown dataset 'nope'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be positive"),
])
def test_bad_names_are_clear_errors(workdir, capsys, args, message):
    assert run_train(*args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nan", "0", "-3.5", "abc"])
def test_bad_labels_fail_before_training(workdir, shared, capsys, bad):
    folder = workdir / f"mine_{bad}"
    (folder / "cif").mkdir(parents=True)
    rows = list(csv.DictReader(open(shared / "data" / "togo15" / "labels.csv")))[:10]
    rows[4]["ltc"] = bad
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "formula", "ltc"])
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        (folder / "cif" / f"{r['id']}.cif").write_text((shared / "data" / "togo15" / "cif" / f"{r['id']}.cif").read_text())
    rc = run_train("--init", "rw", "--dataset", str(folder), "--epochs", "1", "--splits", "1", "--run-dir", f"runs/bad_{bad}")
    assert rc == 2
    err = capsys.readouterr().err
    assert "labels.csv" in err and f"line 6 ({rows[4]['id']}: '{bad}')" in err
    assert not (workdir / "runs" / f"bad_{bad}" / "split1").exists()


def test_run_folder_with_other_settings_is_refused(workdir, capsys):
    rc = run_train("--init", "rw", "--dataset", "togo15", "--epochs", "5", "--splits", "2", "--run-dir", "runs/small")
    assert rc == 2 and "epochs: 2 there, 5 expected" in capsys.readouterr().err


def test_torchrun_spreads_splits_over_two_processes(workdir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           str(ROOT / "train.py"), "--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "2",
           "--run-dir", "runs/ddp", "--no-progress"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(workdir / "runs" / "ddp" / "results.csv")))
    assert sorted({r["split"] for r in rows}) == ["1", "2"]
    assert (workdir / "runs" / "ddp" / "summary.md").is_file()


def test_auto_cpu_path_prints_the_plan_and_an_estimate(workdir):
    """Plain train.py on a CPU: one single-thread process per core (at most one per split), the plan up front,
    progress lines with the whole job's estimate, and the numbers of one process."""
    from paraisite.training.processes import cpu_cores

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "OMP_NUM_THREADS")}
    args = ["--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--no-progress"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--run-dir", "runs/auto"], cwd=workdir,
                          env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "plan: 2 RWTG15 model(s) (rw on togo15, 2 epochs each) into runs/auto" in err
    n = min(cpu_cores(), 2)
    if n > 1:
        assert f"{n} processes x {max(1, cpu_cores() // n)} thread(s) share the 2 tasks" in err
    progress = [line for line in err.splitlines() if "whole job: " in line]
    assert any("[RWTG15] split 1, epoch 1 of 2" in line for line in progress), err
    with working_folder(workdir, threads=1):
        assert run_train(*args, "--run-dir", "runs/auto_reference") == 0
    got, want = (list(csv.DictReader(open(workdir / "runs" / r / "results.csv"))) for r in ("auto", "auto_reference"))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert float(a["mape"]) == pytest.approx(float(b["mape"]), rel=1e-5)


def test_resume_says_where(workdir, capsys):
    run = workdir / "runs" / "resumed"
    with working_folder(workdir, threads=1):
        assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "3", "--splits", "1,", "--run-dir", str(run),
                         "--time-limit", "0.00001") == 0
    assert "stopped before the end" in capsys.readouterr().out
    with working_folder(workdir, threads=1):
        assert run_train("--init", "rw", "--dataset", "togo15", "--epochs", "3", "--splits", "1,", "--run-dir", str(run)) == 0
    assert "resuming split 1 at epoch 2 of 3" in capsys.readouterr().err


def test_sequential_run_refuses_a_split_left_by_an_ensemble_run(workdir, capsys):
    run = workdir / "runs" / "was_ensemble"
    run.mkdir(parents=True)
    (run / "state_1-2.pt").write_bytes(b"x")
    rc = run_train("--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "1", "--run-dir", str(run))
    assert rc == 2 and "run with --ensemble --splits 1,2" in capsys.readouterr().err
    assert not (run / "state_1.pt").exists()
