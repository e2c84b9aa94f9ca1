"""The CUDA path against the CPU path: skipped where no GPU is visible (CI has none).

Run on a GPU machine with ``pytest tests/test_cuda.py``. CUDA's scatter sums use
atomics, so their order, and the last bits of a result, change from run to run:
training runs on CUDA are compared with each other and with the CPU to a relative
1e-3 after three epochs, never bit for bit.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from conftest import working_folder  # noqa: E402
from megnet_pt import load_pretrained, structure_to_graph  # noqa: E402
from megnet_pt.structures import read_structure  # noqa: E402
from paraisite.data.datasets import load_dataset  # noqa: E402
from paraisite.training.rundir import RunDir  # noqa: E402
from paraisite.training.loop import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scan  # noqa: E402
import train as train_py  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CONFIG = TrainConfig(init="fe", dataset="togo15", epochs=3)
SPLITS = [1, 2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared):
    with working_folder(tmp_path_factory.mktemp("cuda")) as d:
        yield d


def curve(run: Path, k: int) -> list[dict]:
    with open(run / f"split{k}" / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_published_model_on_cuda_matches_the_reference(shared, workdir):
    reference = [json.loads(line) for line in open(shared / "reference" / "megnet_eform_reference.jsonl")]
    graphs = [structure_to_graph(read_structure(shared / "data" / r["set"] / "cif" / f"{r['id']}.cif"))
              for r in reference]
    model = load_pretrained().to(CUDA)
    with torch.no_grad():
        out = model(Batch.from_data_list(graphs).to(CUDA))
    np.testing.assert_allclose(out.prediction.cpu().numpy(), [r["eform"] for r in reference], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.features.cpu().numpy(), [r["features16"] for r in reference], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def runs(workdir):
    """Splits 1-2, fe init, 3 epochs: one by one on the CPU and on CUDA, and together on CUDA."""
    data = load_dataset("togo15")
    for device, name in ((CPU, "seq_cpu"), (CUDA, "seq_cuda")):
        assert train(data, SPLITS, CONFIG, RunDir(workdir / name), device, progress=False)
    assert all(g.node_type.device == CPU for g in data.graphs)  # training on CUDA moved copies, not the dataset
    assert train(data, SPLITS, CONFIG, RunDir(workdir / "ens_cuda"), CUDA, stacked=True, progress=False)
    assert train(data, SPLITS, CONFIG, RunDir(workdir / "ens_cuda_eager"), CUDA, stacked=True, progress=False,
                 cuda_graphs=False)
    return {name: workdir / name for name in ("seq_cpu", "seq_cuda", "ens_cuda", "ens_cuda_eager")}


@pytest.mark.parametrize("other, rel", [("ens_cuda", 1e-3), ("ens_cuda_eager", 1e-3), ("seq_cpu", 1e-3)])
def test_cuda_training_matches(runs, other, rel):
    for k in SPLITS:
        a, b = curve(runs["seq_cuda"], k), curve(runs[other], k)
        assert len(a) == len(b) == CONFIG.epochs
        for ra, rb in zip(a, b):
            for column in ("train_loss", "val_loss"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=rel), (other, k, ra["epoch"], column)


def test_checkpoints_written_on_cuda_load_on_a_cpu(runs):
    for name in ("seq_cuda", "ens_cuda", "ens_cuda_eager"):
        for k in SPLITS:
            for selection in ("best", "final"):
                ckpt = torch.load(runs[name] / f"split{k}" / f"{selection}.pt", weights_only=True, map_location=None)
                devices = {v.device.type for v in ckpt["state_dict"].values()}
                assert devices == {"cpu"}, (name, k, selection, devices)


def test_train_py_on_cuda_skips_finished_splits_and_scan_on_cuda_matches_cpu(workdir):
    args = ["--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "2", "--device", "cuda",
            "--no-progress", "--run-dir", "runs/cuda_rw"]
    assert train_py.main(args + ["--ensemble"]) == 0
    finals = [workdir / "runs/cuda_rw" / f"split{k}" / "final.pt" for k in (1, 2)]
    stamps = [f.stat().st_mtime_ns for f in finals]
    assert train_py.main(args + ["--ensemble"]) == 0  # finished splits are skipped, not retrained
    assert [f.stat().st_mtime_ns for f in finals] == stamps
    cache = workdir / "data" / "togo15_cutoff4.h5"
    rows = {}
    for device in ("cpu", "cuda"):
        out = workdir / f"scan_{device}" / "ltc.csv"
        assert scan.main([str(cache), "--models", "runs/cuda_rw", "--out", str(out), "--device", device,
                          "--with-eform", "--no-progress"]) == 0
        rows[device] = list(csv.DictReader(open(out, newline="")))
    assert [r["id"] for r in rows["cpu"]] == [r["id"] for r in rows["cuda"]]
    columns = [c for c in rows["cpu"][0] if c.startswith("ltc_") or c.startswith("eform")]
    assert columns
    a = np.array([[float(r[c]) for c in columns] for r in rows["cpu"]])
    b = np.array([[float(r[c]) for c in columns] for r in rows["cuda"]])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_graphed_ensemble_resumes_where_it_stopped(runs, workdir):
    data = load_dataset("togo15")
    d = workdir / "ens_cuda_resumed"
    assert not train(data, SPLITS, CONFIG, RunDir(d), CUDA, stacked=True, deadline=0.0, progress=False)  # after epoch 1
    assert len(curve(d, 1)) == 1 and not (d / "split1" / "final.pt").exists()
    assert train(data, SPLITS, CONFIG, RunDir(d), CUDA, stacked=True, progress=False)
    for k in SPLITS:
        for ra, rb in zip(curve(runs["ens_cuda"], k), curve(d, k), strict=True):
            for column in ("train_loss", "val_loss"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-3), (k, ra["epoch"], column)
