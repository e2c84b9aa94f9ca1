"""The one training loop with its two steppers: one split at a time (PlainStep) and splits stacked (StackedStep)."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import working_folder
from megnet_pt.checkpoint import CheckpointError
from paraisite.training import stacked
from paraisite.training import loop as training
from paraisite.data.datasets import load_dataset
from paraisite.evaluation.metrics import mape_loss
from paraisite.training.padding import DUMMY_SLOTS, PackedGraphs, pad_batches, padded_shapes
from paraisite.training.rundir import RunDir
from paraisite.training.stacked import StackedModel
from paraisite.training.steps import PlainStep, StackedStep
from paraisite.training.loop import TrainConfig, initial_model, train
from paraisite.transform import TargetTransform, inverse_transform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as train_py  # noqa: E402

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
    """The same two splits trained one by one (PlainStep) and together (StackedStep), by the one loop."""
    data = load_dataset("togo15")
    assert train(data, SPLITS, CONFIG, RunDir(workdir / "seq"), CPU, progress=False)
    assert train(data, SPLITS, CONFIG, RunDir(workdir / "ens"), CPU, stacked=True, progress=False)
    return data, workdir / "seq", workdir / "ens"


def state_path(run: Path, splits: list[int]) -> Path:
    return RunDir(run).state(splits)


def curve(run: Path, k: int) -> list[dict]:
    with open(run / f"split{k}" / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def checkpoint(run: Path, k: int, selection: str) -> dict:
    return torch.load(run / f"split{k}" / f"{selection}.pt", weights_only=True)


def test_stacked_matches_the_plain_step(runs):
    _, seq, ens = runs
    assert not list(ens.glob("state*")) and not list(seq.glob("state*"))
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
            pa.pop("sha256"), pb.pop("sha256")  # of the weights, which agree to round-off only
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
        la = mape_loss(inverse_transform(a[:, : tight.num_real], mean[:, None], std[:, None]), tight.target,
                       mask=tight.mask, count=tight.count)
        lb = mape_loss(inverse_transform(b[:, : fixed.num_real], mean[:, None], std[:, None]), fixed.target,
                       mask=fixed.mask, count=fixed.count)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        pad_batches(packed, largest, shapes[:-1])


def test_clip_members_clips_each_member_as_clip_grad_norm_would():
    torch.manual_seed(0)
    stacked_grads = [torch.zeros(2, *shape, requires_grad=True) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in stacked_grads:
        p.grad = torch.randn(p.shape)
        p.grad[1] *= 1e-2  # member 0 above the norm (scaled down), member 1 below it (left alone)
    members = [[torch.zeros(p.shape[1:], requires_grad=True) for p in stacked_grads] for _ in range(2)]
    for m, member in enumerate(members):
        for p, q in zip(member, stacked_grads):
            p.grad = q.grad[m].clone()
    norms = [float(torch.nn.utils.clip_grad_norm_(member, 2.0)) for member in members]
    assert norms[0] > 2.0 > norms[1]
    stacked.clip_members(stacked_grads, 2.0)
    for m, member in enumerate(members):
        for p, q in zip(member, stacked_grads):
            torch.testing.assert_close(q.grad[m], p.grad)


def train_both_ways(data, config: TrainConfig, workdir: Path, name: str) -> tuple[Path, Path]:
    """The splits trained with ``config`` one by one and stacked: (sequential run folder, stacked run folder)."""
    seq, ens = workdir / f"seq_{name}", workdir / f"ens_{name}"
    assert train(data, SPLITS, config, RunDir(seq), CPU, progress=False)
    assert train(data, SPLITS, config, RunDir(ens), CPU, stacked=True, progress=False)
    return seq, ens


def assert_same_training(seq: Path, ens: Path, columns: tuple[str, ...], selection: str) -> None:
    """The same curves (to 1e-5) and the same ``selection`` weights (to round-off) for every split."""
    for k in SPLITS:
        a, b = curve(seq, k), curve(ens, k)
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            for column in columns:
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-5), (k, ra["epoch"], column)
        wa, wb = checkpoint(seq, k, selection), checkpoint(ens, k, selection)
        assert wa["epoch"] == wb["epoch"]
        for name, value in wa["state_dict"].items():
            torch.testing.assert_close(wb["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=f"split {k} {name}")


def test_clipped_ensemble_matches_the_clipped_sequential_path(runs, workdir):
    data, plain, _ = runs
    seq, ens = train_both_ways(data, TrainConfig(init="rw", dataset="togo15", epochs=2, clip_grad_norm=0.5), workdir, "clip")
    assert_same_training(seq, ens, ("train_loss", "val_loss"), "final")
    for k in SPLITS:  # clipping changed training
        assert float(curve(seq, k)[1]["val_loss"]) != pytest.approx(float(curve(plain, k)[1]["val_loss"]), rel=1e-3)


def test_select_holdout_ensemble_matches_the_sequential_path(runs, workdir):
    seq, ens = train_both_ways(runs[0], TrainConfig(init="rw", dataset="togo15", epochs=3, select_holdout=0.2), workdir,
                               "holdout")
    assert_same_training(seq, ens, ("train_loss", "val_loss", "select_loss"), "best")


def test_frozen_megnet_ensemble_matches_the_sequential_path(runs, workdir):
    seq, ens = train_both_ways(runs[0], TrainConfig(init="rw", dataset="togo15", epochs=2, freeze_megnet_epochs=1),
                               workdir, "freeze")
    assert_same_training(seq, ens, ("train_loss", "val_loss"), "best")


def test_vectorised_validation_matches_the_plain_one(runs):
    data = runs[0]
    config = TrainConfig(init="rw", dataset="togo15")
    models = [initial_model(config, k) for k in SPLITS]
    val_idx = [data.split(k)[1] for k in SPLITS]
    transforms = [TargetTransform.fit(data.ltc[data.split(k)[0]]) for k in SPLITS]
    net = StackedModel(models, CPU)
    vectorised = stacked.validate(net, PackedGraphs.from_dataset(data, CPU), val_idx, transforms)
    plain = [PlainStep([m], [t], data, CPU, 1e-3).losses([v])[0] for m, t, v in zip(models, transforms, val_idx)]
    assert vectorised == pytest.approx(plain, rel=1e-5) and vectorised[0] != vectorised[1]


@pytest.mark.parametrize("is_stacked", [False, True], ids=["plain", "stacked"])
def test_resume_after_kill_gives_identical_weights(runs, workdir, monkeypatch, is_stacked):
    data, seq, ens = runs
    straight = ens if is_stacked else seq
    killed = workdir / f"killed_{'stacked' if is_stacked else 'plain'}"
    stepper = StackedStep if is_stacked else PlainStep
    real = stepper.step
    calls = {"n": 0}

    def dying_step(self, batches):
        calls["n"] += 1
        if calls["n"] == 15:  # epoch 1 is 10 steps; die inside epoch 2 (of split 1 for the plain step)
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(stepper, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(data, SPLITS, CONFIG, RunDir(killed), CPU, stacked=is_stacked, progress=False)
    monkeypatch.setattr(stepper, "step", real)
    group = SPLITS if is_stacked else [1]
    state = torch.load(state_path(killed, group), weights_only=True)
    assert state["splits"] == group and all(len(c) == 1 for c in state["curves"].values())
    assert [r["epoch"] for r in curve(killed, 1)] == ["1"]
    assert train(data, SPLITS, CONFIG, RunDir(killed), CPU, stacked=is_stacked, progress=False)
    assert not list(killed.glob("state*"))
    for k in SPLITS:
        a, b = checkpoint(straight, k, "final")["state_dict"], checkpoint(killed, k, "final")["state_dict"]
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
        assert [r["val_loss"] for r in curve(straight, k)] == [r["val_loss"] for r in curve(killed, k)]


def test_one_resume_format_for_both_steppers(runs, workdir):
    """A state written by the plain step is resumed by the stacked one (one split), and the result is the same run."""
    data, seq, _ = runs
    run = RunDir(workdir / "switched")
    assert not train(data, [1], CONFIG, run, CPU, deadline=0.0, progress=False)  # stops after epoch 1
    assert run.state([1]).is_file()
    assert train(data, [1], CONFIG, run, CPU, stacked=True, progress=False)
    a, b = checkpoint(seq, 1, "final")["state_dict"], checkpoint(run.path, 1, "final")["state_dict"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [r["epoch"] for r in curve(run.path, 1)] == ["1", "2", "3"]


def test_other_groups_of_splits_are_refused(runs, workdir):
    data = runs[0]
    run = RunDir(workdir / "groups")
    assert not train(data, SPLITS, CONFIG, run, CPU, stacked=True, deadline=0.0, progress=False)
    path = run.state(SPLITS)
    with pytest.raises(CheckpointError, match=rf"{path.name}: resume state of split\(s\) \[1, 2\] trained together"):
        train(data, [1], CONFIG, run, CPU, stacked=True, progress=False)  # another set of splits: refused, not restarted
    with pytest.raises(CheckpointError, match="run with --ensemble --splits 1,2"):
        train(data, [1], CONFIG, run, CPU, progress=False)


def test_kill_while_writing_the_final_models(workdir, monkeypatch):
    data, config, run = load_dataset("togo15"), TrainConfig(init="rw", dataset="togo15", epochs=1), workdir / "late"
    real = training.save_model

    def dying_save(model, transform, path, **meta):
        if meta["selection"] == "final" and meta["split"] == 2:
            raise KeyboardInterrupt
        real(model, transform, path, **meta)

    monkeypatch.setattr(training, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(data, SPLITS, config, RunDir(run), CPU, stacked=True, progress=False)
    monkeypatch.setattr(training, "save_model", real)
    assert (run / "split1" / "final.pt").is_file() and not (run / "split2" / "final.pt").exists()
    mtime = (run / "split1" / "final.pt").stat().st_mtime_ns
    # split 2 alone is pending now, and the complete state of splits 1-2 finishes it without training
    assert train(data, SPLITS, config, RunDir(run), CPU, stacked=True, progress=False)
    assert (run / "split2" / "final.pt").is_file() and not state_path(run, SPLITS).exists()
    assert (run / "split1" / "final.pt").stat().st_mtime_ns == mtime
    assert [r["epoch"] for r in curve(run, 2)] == ["1"]
    # the same, finished by a run without --ensemble: split 2 alone is pending, and the group's state finishes it
    other = workdir / "late_plain"
    monkeypatch.setattr(training, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(data, SPLITS, config, RunDir(other), CPU, stacked=True, progress=False)
    monkeypatch.setattr(training, "save_model", real)
    assert train(data, SPLITS, config, RunDir(other), CPU, progress=False)
    assert (other / "split2" / "final.pt").is_file() and not state_path(other, SPLITS).exists()


def test_foreign_resume_states_are_refused(workdir):
    data = load_dataset("togo15")
    run = workdir / "foreign"
    run.mkdir()
    torch.save({"format": training.STATE_FORMAT, "version": training.STATE_VERSION, "splits": [1, 3],
                "dataset": "togo15"}, state_path(run, SPLITS))
    message = r"state_1-2\.pt: resume state of split\(s\) \[1, 3\] on 'togo15', not of split\(s\) \[1, 2\]"
    with pytest.raises(CheckpointError, match=message):
        train(data, SPLITS, CONFIG, RunDir(run), CPU, stacked=True, progress=False)
    state_path(run, SPLITS).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="state_1-2.pt: cannot resume"):
        train(data, SPLITS, CONFIG, RunDir(run), CPU, stacked=True, progress=False)
    state_path(run, SPLITS).unlink()
    torch.save({"splits": [2], "dataset": "togo15"}, state_path(run, [2]))  # a single split of another version
    with pytest.raises(CheckpointError, match=r"state_2\.pt: resume state of split\(s\) \[2\] trained on its own"):
        train(data, SPLITS, CONFIG, RunDir(run), CPU, stacked=True, progress=False)
    assert not (run / "split1" / "curve.csv").exists()


def test_train_py_ensemble_flag(workdir, capsys):
    args = ["--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "2", "--run-dir", "runs/flag",
            "--ensemble", "--no-progress"]
    assert train_py.main(args) == 0
    run = workdir / "runs" / "flag"
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert {(r["split"], r["selection"]) for r in rows} == {(k, s) for k in ("1", "2") for s in ("best", "final")}
    assert (run / "summary.md").is_file() and not list(run.glob("state*"))
    assert "done" in capsys.readouterr().out
    mtime = (run / "split1" / "final.pt").stat().st_mtime_ns
    assert train_py.main(args) == 0  # finished splits are not trained again
    assert (run / "split1" / "final.pt").stat().st_mtime_ns == mtime
