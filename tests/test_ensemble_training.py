"""Training the splits together (paraisite.ensemble_training) against the sequential train_split."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import working_folder
from megnet_pt.checkpoint import CheckpointError
from paraisite import ensemble_training
from paraisite.datasets import load_dataset
from paraisite.ensemble_training import (
    DUMMY_SLOTS, PackedGraphs, StackedModel, batched_mape, inverse_transform, pad_batches, padded_shapes, state_path,
    train_splits_together,
)
from paraisite.training import TrainConfig, initial_model, train_split
from paraisite.transform import TargetTransform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

CPU = torch.device("cpu")
CONFIG = TrainConfig(init="rw", dataset="togo15", epochs=3)
SPLITS = [1, 2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared):
    """One working folder (graph caches go to ./data), one thread: fast on a busy machine, and reproducible."""
    with working_folder(tmp_path_factory.mktemp("ensemble"), threads=1) as d:
        yield d


@pytest.fixture(scope="module")
def runs(workdir):
    """The same two splits trained one by one (train_split) and together (train_splits_together)."""
    data = load_dataset("togo15")
    for k in SPLITS:
        assert train_split(data, k, CONFIG, workdir / "seq", CPU, progress=False)
    assert train_splits_together(data, SPLITS, CONFIG, workdir / "ens", CPU, progress=False)
    return data, workdir / "seq", workdir / "ens"


def curve(run: Path, k: int) -> list[dict]:
    with open(run / f"split{k}" / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def checkpoint(run: Path, k: int, selection: str) -> dict:
    return torch.load(run / f"split{k}" / f"{selection}.pt", weights_only=True)


def test_ensemble_matches_the_sequential_path(runs):
    _, seq, ens = runs
    assert not list(ens.glob("ensemble_state*")) and not list(ens.glob("split*/state.pt"))
    for k in SPLITS:
        a, b = curve(seq, k), curve(ens, k)
        assert list(a[0]) == list(b[0]) and len(a) == len(b) == CONFIG.epochs
        for ra, rb in zip(a, b):
            assert ra["epoch"] == rb["epoch"] and ra["lr"] == rb["lr"]
            for column in ("train_loss", "val_loss"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-5), (k, ra["epoch"], column)
        for selection in ("best", "final"):
            pa, pb = checkpoint(seq, k, selection), checkpoint(ens, k, selection)
            wa, wb = pa.pop("state_dict"), pb.pop("state_dict")
            assert pa == pb  # metadata: epoch, selection, transform, config
            assert wa.keys() == wb.keys()
            for name, value in wa.items():
                torch.testing.assert_close(wb[name], value, rtol=1e-4, atol=1e-5, msg=f"split {k} {selection} {name}")
    # the splits really differ (own shuffle, own transform), so the comparison above is not trivial
    assert checkpoint(ens, 1, "final")["transform"] != checkpoint(ens, 2, "final")["transform"]


def test_fixed_shape_padding_leaves_every_real_graph_unchanged(shared):
    """What the CUDA-graph step relies on: padding to padded_shapes changes no real graph's output or loss."""
    data = load_dataset("togo15")
    packed = PackedGraphs.from_dataset(data, CPU)
    net = StackedModel([initial_model(TrainConfig(init="fe", dataset="togo15"), k) for k in SPLITS], CPU)
    shapes = padded_shapes(packed, 8)
    nodes, edges = np.diff(packed.node_ptr), np.diff(packed.edge_ptr)
    largest = [np.argsort(nodes)[-8:], np.argsort(edges)[-8:]]  # the batches that need the most room
    assert shapes[-1] == (nodes[largest[0]].sum() + 1, edges[largest[1]].sum(), 8 + DUMMY_SLOTS)
    assert shapes[0][:2] == (nodes[np.argsort(nodes)[:8]].sum() + 1, edges[np.argsort(edges)[:8]].sum())
    assert len(shapes) > 2 and all(a[0] <= b[0] and a[1] <= b[1] and a != b for a, b in zip(shapes, shapes[1:]))
    mean, std = torch.tensor([0.9, 1.1]), torch.tensor([0.5, 0.6])
    small = [np.array([0, 5, 9]), np.array([1, 2])]  # batches with empty slots, which take a smaller shape
    for ids, shape in ((largest, shapes[-1]), (small, None)):
        tight, fixed = pad_batches(packed, ids), pad_batches(packed, ids, shapes)
        if shape is None:  # the first shape that holds the batch
            need = (max(nodes[i].sum() for i in ids) + 1, max(edges[i].sum() for i in ids))
            shape = next(s for s in shapes if s[0] >= need[0] and s[1] >= need[1])
            assert shape != shapes[-1]
        assert fixed.node_type.shape == (2, shape[0]) and fixed.edge_index.shape == (2, 2, shape[1])
        assert fixed.num_slots == shape[2] and fixed.num_real == 8
        # the padding is spread over dummy graphs and their nodes, never over a real graph
        for m, i in enumerate(ids):
            n_real = nodes[i].sum()
            assert (fixed.batch[m, n_real:] >= 8).all()
            assert len(fixed.batch[m, n_real:].unique()) == min(DUMMY_SLOTS, shape[0] - n_real)
            pad_edges = fixed.edge_index[m, :, edges[i].sum():]
            assert (pad_edges >= n_real).all() and (pad_edges[0] == pad_edges[1]).all()
        with torch.no_grad():
            a, b = net(tight), net(fixed)
        for m, i in enumerate(ids):
            torch.testing.assert_close(b[m, : len(i)], a[m, : len(i)], rtol=1e-5, atol=1e-6)
        la = batched_mape(inverse_transform(a[:, : tight.num_real], mean, std), tight)
        lb = batched_mape(inverse_transform(b[:, : fixed.num_real], mean, std), fixed)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        pad_batches(packed, largest, shapes[:-1])


def test_clip_members_clips_each_member_as_clip_grad_norm_would():
    torch.manual_seed(0)
    stacked = [torch.zeros(2, *shape, requires_grad=True) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in stacked:
        p.grad = torch.randn(p.shape)
        p.grad[1] *= 1e-2  # member 0 above the norm (scaled down), member 1 below it (left alone)
    members = [[torch.zeros(p.shape[1:], requires_grad=True) for p in stacked] for _ in range(2)]
    for m, member in enumerate(members):
        for p, q in zip(member, stacked):
            p.grad = q.grad[m].clone()
    norms = [float(torch.nn.utils.clip_grad_norm_(member, 2.0)) for member in members]
    assert norms[0] > 2.0 > norms[1]
    ensemble_training.clip_members(stacked, 2.0)
    for m, member in enumerate(members):
        for p, q in zip(member, stacked):
            torch.testing.assert_close(q.grad[m], p.grad)


def test_clipped_ensemble_matches_the_clipped_sequential_path(runs, workdir):
    data, seq, _ = runs
    clipped = TrainConfig(init="rw", dataset="togo15", epochs=2, clip_grad_norm=0.5)
    for k in SPLITS:
        assert train_split(data, k, clipped, workdir / "seq_clip", CPU, progress=False)
    assert train_splits_together(data, SPLITS, clipped, workdir / "ens_clip", CPU, progress=False)
    for k in SPLITS:
        a, b, plain = curve(workdir / "seq_clip", k), curve(workdir / "ens_clip", k), curve(seq, k)
        for ra, rb in zip(a, b):
            for column in ("train_loss", "val_loss"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-5), (k, ra["epoch"], column)
        assert float(a[1]["val_loss"]) != pytest.approx(float(plain[1]["val_loss"]), rel=1e-3)  # clipping changed training
        wa = checkpoint(workdir / "seq_clip", k, "final")["state_dict"]
        wb = checkpoint(workdir / "ens_clip", k, "final")["state_dict"]
        for name, value in wa.items():
            torch.testing.assert_close(wb[name], value, rtol=1e-4, atol=1e-5, msg=f"split {k} {name}")


def test_select_holdout_ensemble_matches_the_sequential_path(runs, workdir):
    data = runs[0]
    config = TrainConfig(init="rw", dataset="togo15", epochs=3, select_holdout=0.2)
    for k in SPLITS:
        assert train_split(data, k, config, workdir / "seq_holdout", CPU, progress=False)
    assert train_splits_together(data, SPLITS, config, workdir / "ens_holdout", CPU, progress=False)
    for k in SPLITS:
        a, b = curve(workdir / "seq_holdout", k), curve(workdir / "ens_holdout", k)
        assert len(a) == len(b) == 3
        for ra, rb in zip(a, b):
            for column in ("train_loss", "val_loss", "select_loss"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-5), (k, ra["epoch"], column)
        assert checkpoint(workdir / "ens_holdout", k, "best")["epoch"] == checkpoint(workdir / "seq_holdout", k, "best")["epoch"]


def test_vectorised_validation_matches_the_one_by_one_validation(runs):
    data = runs[0]
    config = TrainConfig(init="rw", dataset="togo15")
    models = [initial_model(config, k) for k in SPLITS]
    net = ensemble_training.StackedModel(models, CPU)
    val_idx = [data.split(k)[1] for k in SPLITS]
    transforms = [TargetTransform.fit(data.ltc[data.split(k)[0]]) for k in SPLITS]
    packed = ensemble_training.PackedGraphs.from_dataset(data, CPU)
    vectorised = ensemble_training.validate(net, packed, val_idx, transforms)
    one_by_one = ensemble_training.validate_one_by_one(net, models, data, val_idx, transforms)
    assert vectorised == pytest.approx(one_by_one, rel=1e-5) and vectorised[0] != vectorised[1]


def test_resume_after_kill_gives_identical_weights_and_other_splits_are_refused(runs, workdir, monkeypatch):
    data, _, ens = runs
    killed = workdir / "killed"
    real = ensemble_training.train_step
    calls = {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 15:  # epoch 1 is 10 steps; die inside epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ensemble_training, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_splits_together(data, SPLITS, CONFIG, killed, CPU, progress=False)
    monkeypatch.setattr(ensemble_training, "train_step", real)
    path = state_path(killed, SPLITS)
    state = torch.load(path, weights_only=True)
    assert state["splits"] == SPLITS and all(len(c) == 1 for c in state["curves"].values())
    assert [r["epoch"] for r in curve(killed, 1)] == ["1"]

    with pytest.raises(CheckpointError, match=str(path.name)):  # another set of splits is refused, not restarted
        train_splits_together(data, [1], CONFIG, killed, CPU, progress=False)
    assert train_splits_together(data, SPLITS, CONFIG, killed, CPU, progress=False)
    assert not path.exists()
    for k in SPLITS:
        a, b = checkpoint(ens, k, "final")["state_dict"], checkpoint(killed, k, "final")["state_dict"]
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
        assert [r["val_loss"] for r in curve(ens, k)] == [r["val_loss"] for r in curve(killed, k)]


def test_kill_while_writing_the_final_models(workdir, monkeypatch):
    data, config, run = load_dataset("togo15"), TrainConfig(init="rw", dataset="togo15", epochs=1), workdir / "late"
    real = ensemble_training.save_model

    def dying_save(model, transform, path, **meta):
        if meta["selection"] == "final" and meta["split"] == 2:
            raise KeyboardInterrupt
        real(model, transform, path, **meta)

    monkeypatch.setattr(ensemble_training, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_splits_together(data, SPLITS, config, run, CPU, progress=False)
    monkeypatch.setattr(ensemble_training, "save_model", real)
    assert (run / "split1" / "final.pt").is_file() and not (run / "split2" / "final.pt").exists()
    mtime = (run / "split1" / "final.pt").stat().st_mtime_ns
    # split 2 alone is pending now, and the complete state of splits 1-2 finishes it without training
    assert train_splits_together(data, SPLITS, config, run, CPU, progress=False)
    assert (run / "split2" / "final.pt").is_file() and not state_path(run, SPLITS).exists()
    assert (run / "split1" / "final.pt").stat().st_mtime_ns == mtime
    assert [r["epoch"] for r in curve(run, 2)] == ["1"]


def test_foreign_resume_states_are_refused(workdir):
    data = load_dataset("togo15")
    run = workdir / "foreign"
    run.mkdir()
    torch.save({"splits": [1, 3], "dataset": "togo15"}, state_path(run, SPLITS))
    message = r"ensemble_state_1-2\.pt: resume state of the ensemble of split\(s\) \[1, 3\]"
    with pytest.raises(CheckpointError, match=message):
        train_splits_together(data, SPLITS, CONFIG, run, CPU, progress=False)
    state_path(run, SPLITS).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="ensemble_state_1-2.pt: cannot resume"):
        train_splits_together(data, SPLITS, CONFIG, run, CPU, progress=False)
    state_path(run, SPLITS).unlink()
    (run / "split2").mkdir()
    (run / "split2" / "state.pt").write_bytes(b"")  # a sequential run of split 2 in progress
    with pytest.raises(CheckpointError, match="split2/state.pt: split 2 was being trained on its own"):
        train_splits_together(data, SPLITS, CONFIG, run, CPU, progress=False)
    assert not (run / "split1" / "curve.csv").exists()


def test_train_py_ensemble_flag(workdir, capsys):
    args = ["--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "2", "--run-dir", "runs/flag",
            "--ensemble", "--no-progress"]
    assert train.main(args) == 0
    run = workdir / "runs" / "flag"
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert {(r["split"], r["selection"]) for r in rows} == {(k, s) for k in ("1", "2") for s in ("best", "final")}
    assert (run / "summary.md").is_file() and not list(run.glob("ensemble_state*"))
    assert "done" in capsys.readouterr().out
    mtime = (run / "split1" / "final.pt").stat().st_mtime_ns
    assert train.main(args) == 0  # finished splits are not trained again
    assert (run / "split1" / "final.pt").stat().st_mtime_ns == mtime
