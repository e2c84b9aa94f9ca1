"""A run folder that cannot lie: every model file and resume state knows its run, split, stage and selection, and
every reader (a train.py re-run, resuming, re-scoring, screening, a +af start) refuses one that is not its own."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import working_folder
from megnet_pt.checkpoint import CheckpointError
from paraisite.data.datasets import load_dataset
from paraisite.screening.ensemble import load_ensemble
from paraisite.training.loop import evaluate_split
from paraisite.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

BASE = ["--dataset", "togo15", "--splits", "2", "--no-progress", "--processes", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared, graph_caches):
    with working_folder(tmp_path_factory.mktemp("provenance"), threads=1) as d:
        (d / "data").symlink_to(graph_caches)
        yield d


def run_train(*args: str) -> int:
    return train.main([*args, *BASE])


@pytest.fixture(scope="module")
def runs(workdir) -> dict[str, list[str]]:
    """Finished runs that differ in one setting each, and the command of each."""
    commands = {
        "a": ["--init", "rw", "--epochs", "2"],
        "lr": ["--init", "rw", "--epochs", "2", "--lr", "0.002"],
        "epochs": ["--init", "rw", "--epochs", "3"],
        "fe": ["--init", "fe", "--epochs", "2"],
    }
    for name, args in commands.items():
        assert run_train(*args, "--run-dir", f"runs/{name}") == 0
    return commands


def fresh(workdir: Path, name: str, as_name: str) -> Path:
    dest = workdir / "runs" / as_name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(workdir / "runs" / name, dest)
    return dest


MOVES = [  # (source run, source file) -> destination file in a copy of run "a"
    ("a", "split1/best.pt", "split2/best.pt"),    # another split
    ("a", "split1/best.pt", "split1/final.pt"),   # another selection
    ("lr", "split1/best.pt", "split1/best.pt"),   # another learning rate
    ("epochs", "split2/final.pt", "split2/final.pt"),  # another number of epochs
    ("fe", "split1/final.pt", "split1/final.pt"),  # another stage (init)
]


@pytest.mark.parametrize("source, file, dest", MOVES, ids=[f"{s}:{f}->{d}" for s, f, d in MOVES])
def test_a_model_file_moved_between_runs_splits_or_stages_is_refused_by_every_reader(workdir, runs, capsys, source, file,
                                                                                   dest):
    target = fresh(workdir, "a", f"moved_{source}_{file[:6]}_{dest[:6]}_{dest[7:11]}")
    shutil.copy(workdir / "runs" / source / file, target / dest)
    k, selection = int(dest[5]), dest[7:].removesuffix(".pt")
    capsys.readouterr()
    assert run_train(*runs["a"], "--run-dir", str(target)) == 2  # the re-run (it would re-score into results.csv)
    assert str(target / dest) in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a file of this run"):  # screening
        load_ensemble(target, selection)
    data = load_dataset("togo15")
    record = json.loads((target / "config.json").read_text())
    from paraisite.training.provenance import run_record

    with pytest.raises(CheckpointError, match="not a file of this run"):  # re-scoring
        evaluate_split(k, RunDir(target), {"togo15": data}, torch.device("cpu"), record=run_record(record))


def test_a_resume_state_of_other_settings_is_refused(workdir, runs, capsys):
    """state_1.pt of an --lr 0.001 run put into an --lr 0.01 run: it would resume at 0.001 under a config of 0.01."""
    assert run_train("--init", "rw", "--epochs", "3", "--lr", "0.001", "--splits", "1,", "--run-dir", "runs/slow",
                     "--time-limit", "1e-6") == 0
    assert run_train("--init", "rw", "--epochs", "3", "--lr", "0.01", "--splits", "1,", "--run-dir", "runs/fast",
                     "--time-limit", "1e-6") == 0
    shutil.copy(workdir / "runs" / "slow" / "state_1.pt", workdir / "runs" / "fast" / "state_1.pt")
    capsys.readouterr()
    assert run_train("--init", "rw", "--epochs", "3", "--lr", "0.01", "--splits", "1,", "--run-dir", "runs/fast") == 2
    err = capsys.readouterr().err
    assert "state_1.pt" in err and "lr: 0.001 there, 0.01 expected" in err
    assert not (workdir / "runs" / "fast" / "split1" / "final.pt").exists()


def test_a_deleted_or_edited_config_json_never_relabels_a_run(workdir, runs, capsys):
    run = fresh(workdir, "fe", "relabel")
    (run / "config.json").unlink()
    capsys.readouterr()
    assert run_train("--init", "rw", "--epochs", "2", "--run-dir", str(run)) == 2  # models trained as fe
    assert "init: 'fe' there, 'rw' expected" in capsys.readouterr().err and not (run / "config.json").exists()
    assert run_train("--init", "fe", "--epochs", "7", "--run-dir", str(run)) == 2  # or for 2 epochs
    assert "epochs: 2 there, 7 expected" in capsys.readouterr().err and not (run / "config.json").exists()
    assert run_train(*runs["fe"], "--run-dir", str(run)) == 0  # its own command rebuilds config.json from the files
    assert json.loads((run / "config.json").read_text())["init"] == "fe"
    edited = json.loads((run / "config.json").read_text()) | {"epochs": 5}  # edited by hand
    (run / "config.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert run_train("--init", "fe", "--epochs", "5", "--run-dir", str(run)) == 2
    assert "epochs: 2 there, 5 expected" in capsys.readouterr().err
    assert "FETG15" in (run / "summary.md").read_text() and "epochs 5" not in (run / "summary.md").read_text()


def test_a_damaged_config_json_is_named_and_rebuilt_from_the_files(workdir, runs, capsys):
    run = fresh(workdir, "a", "damaged")
    (run / "config.json").write_text('{"init": "rw",\n  "epochs": 2\n  "lr": 0.001}')
    with pytest.raises(Exception, match=r"config.json: not valid JSON \(Expecting ',' delimiter: line 3"):
        RunDir(run).read_config()
    capsys.readouterr()
    assert run_train("--init", "fe", "--epochs", "2", "--run-dir", str(run)) == 2  # not its run: refused, untouched
    assert "init: 'rw' there, 'fe' expected" in capsys.readouterr().err
    assert (run / "config.json").read_text().startswith('{"init": "rw",\n')
    assert run_train(*runs["a"], "--run-dir", str(run)) == 0  # its own: rebuilt, the damaged one kept
    assert "not valid JSON" in capsys.readouterr().err and (run / "config.json.damaged").is_file()
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_a_finished_aflow_stage_of_other_settings_is_not_used(workdir, capsys):
    """runs/fe_aflow_agl of 3 epochs, then --init fe+af --epochs 2: the stage is checked for every setting."""
    assert train.main(["--init", "fe", "--dataset", "aflow_agl", "--epochs", "1", "--splits", "1,", "--no-progress",
                       "--processes", "1"]) == 0
    capsys.readouterr()
    assert train.main(["--init", "fe+af", "--dataset", "togo15", "--epochs", "2", "--splits", "1,", "--no-progress",
                       "--processes", "1"]) == 2
    err = capsys.readouterr().err
    assert "runs/fe_aflow_agl" in err and "epochs: 1 there, 2 expected" in err and "--aflow-run runs/fe_aflow_agl" in err
    assert not (workdir / "runs" / "fe+af_togo15").exists()
