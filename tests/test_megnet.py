"""megnet_pt: graphs, layers, conversion and parity with the published model."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from megnet_pt import (
    CheckpointError, MEGNet, MEGNetBlock, StructureError, UnsupportedElementError, load_checkpoint, load_pretrained,
    structure_to_graph,
)
from megnet_pt.convert import convert_published, main as convert_main
from megnet_pt.predict import main as predict_main
from megnet_pt.structures import read_structure

NAME = "MEGNet-MP-2018.6.1-Eform"


@pytest.fixture(scope="module")
def published(shared):
    return shared / "weights" / NAME


@pytest.fixture(scope="module")
def model(published):
    return convert_published(published)[0]


@pytest.fixture(scope="module")
def reference(shared):
    return [json.loads(line) for line in open(shared / "reference" / "megnet_eform_reference.jsonl")]


def test_parity_with_published_model_on_every_reference_row(model, reference, shared):
    graphs = [structure_to_graph(read_structure(shared / "data" / r["set"] / "cif" / f"{r['id']}.cif"), id=r["id"])
              for r in reference]
    assert len(graphs) == 536
    assert [g.num_edges for g in graphs] == [r["n_edges"] for r in reference]
    assert [g.num_nodes for g in graphs] == [r["n_atoms"] for r in reference]
    with torch.no_grad():
        out = model(Batch.from_data_list(graphs))
    np.testing.assert_allclose(out.prediction.numpy(), [r["eform"] for r in reference], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.readout.numpy(), [r["readout160"] for r in reference], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.features.numpy(), [r["features16"] for r in reference], atol=1e-4, rtol=0)


def test_batched_equals_one_at_a_time(model, shared):
    files = sorted((shared / "data" / "miyazaki21" / "cif").glob("*.cif"))[:12]
    graphs = [structure_to_graph(read_structure(f)) for f in files]
    with torch.no_grad():
        batched = model(Batch.from_data_list(graphs)).prediction
        single = torch.cat([model(Batch.from_data_list([g])).prediction for g in graphs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def bcc_ba() -> Structure:
    return Structure(Lattice.cubic(5.02), ["Ba", "Ba"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_graph_edges_follow_the_cutoff():
    s = Structure(Lattice.cubic(3.0), ["Na"], [[0, 0, 0]])  # simple cubic: 6 at 3.0 Å, 12 at 4.24 Å
    g = structure_to_graph(s, cutoff=4.0)
    assert g.num_edges == 6
    assert torch.allclose(g.edge_dist, torch.full((6,), 3.0))
    assert structure_to_graph(s, cutoff=4.3).num_edges == 18
    # the image offsets reproduce the distances
    vec = g.pos[g.edge_index[1]] + g.edge_image @ g.lattice[0] - g.pos[g.edge_index[0]]
    torch.testing.assert_close(vec.norm(dim=1), g.edge_dist)


def test_no_neighbour_gives_finite_prediction(model):
    g = structure_to_graph(bcc_ba())
    assert g.num_edges == 0
    with torch.no_grad():
        alone = model(Batch.from_data_list([g])).prediction
        mixed = model(Batch.from_data_list([g, structure_to_graph(bcc_ba(), cutoff=5.0)])).prediction
    assert torch.isfinite(alone).all() and torch.isfinite(mixed).all()
    torch.testing.assert_close(alone[0], mixed[0])


def test_unknown_element_and_partial_occupancy_are_rejected_by_name():
    po = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])
    with pytest.raises(UnsupportedElementError, match="Po.*vocabulary"):
        structure_to_graph(po, id="polonium-1")
    with pytest.raises(UnsupportedElementError, match="polonium-1"):
        structure_to_graph(po, id="polonium-1")
    alloy = Structure(Lattice.cubic(4.0), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    with pytest.raises(StructureError, match="alloy-7.*partial occupancy"):
        structure_to_graph(alloy, id="alloy-7")


def test_ase_atoms_are_accepted():
    ase = pytest.importorskip("ase.build")
    atoms = ase.bulk("NaCl", "rocksalt", a=5.64)
    g = structure_to_graph(atoms, id="nacl")
    assert g.num_nodes == 2 and g.num_edges > 0


def test_malformed_and_empty_cif_errors_name_the_file(tmp_path):
    (tmp_path / "empty.cif").write_text("")
    (tmp_path / "junk.cif").write_text("data_junk\n_cell_length_a nonsense\nthis is not a cif\n")
    with pytest.raises(StructureError, match="empty.cif.*empty"):
        read_structure(tmp_path / "empty.cif")
    with pytest.raises(StructureError, match="junk.cif"):
        read_structure(tmp_path / "junk.cif")


def test_predict_cli_carries_on_and_reports_bad_files(published, shared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in good:
        shutil.copy(f, inputs / f.name)
    (inputs / "broken.cif").write_text("not a cif at all")
    (inputs / "empty.cif").write_text("")
    Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]]).to(filename=str(inputs / "po.cif"))
    Structure(Lattice.cubic(4.0), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]]).to(filename=str(inputs / "cuau.cif"))
    bcc_ba().to(filename=str(inputs / "ba_bcc.cif"))
    rc = predict_main([str(inputs), "-o", "out.csv", "--model", str(published), "--batch-size", "2"])
    assert rc == 1  # some files failed
    rows = {r["id"]: r for r in csv.DictReader(open("out.csv"))}
    assert len(rows) == 3 + 5
    for f in good:
        assert math.isfinite(float(rows[f.stem]["eform_ev_per_atom"]))
        assert rows[f.stem]["warning"] == ""
    assert "no neighbour" in rows["ba_bcc"]["warning"] and math.isfinite(float(rows["ba_bcc"]["eform_ev_per_atom"]))
    for bad, reason in [("broken", "cannot read"), ("empty", "empty"), ("po", "Po"), ("cuau", "partial occupancy")]:
        assert rows[bad]["eform_ev_per_atom"] == ""
        assert reason in rows[bad]["warning"]
    assert "broken.cif" in capsys.readouterr().err


def test_convert_cli_and_checkpoint_round_trip(published, model, tmp_path, reference):
    out = tmp_path / "w" / "eform.pt"
    assert convert_main([str(published), "-o", str(out)]) == 0
    payload = torch.load(out, weights_only=True)
    assert payload["target"]["mean"] == pytest.approx(-1.65459073)
    assert len(payload["sources"]["state.pt"]) == 64
    loaded = load_checkpoint(out)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def _copy_published(published, dest):
    dest.mkdir()
    shutil.copy(published / "model.json", dest / "model.json")
    return torch.load(published / "state.pt", weights_only=True)


def test_wrong_keys_and_shapes_are_named(published, tmp_path):
    state = _copy_published(published, tmp_path / "bad_keys")
    del state["model.edge_s2s.lstm.weight_hh_l0"]
    state["model.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad_keys" / "state.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: edge_set2set\.lstm\.weight_hh_l0.*unexpected keys: extra\.weight"):
        convert_published(tmp_path / "bad_keys")

    state = _copy_published(published, tmp_path / "bad_shape")
    state["model.embedding.layer_node_embedding.weight"] = torch.zeros(90, 16)
    torch.save(state, tmp_path / "bad_shape" / "state.pt")
    with pytest.raises(CheckpointError, match=r"node_embedding\.weight \(90, 16\) \(expected \(89, 16\)\)"):
        convert_published(tmp_path / "bad_shape")
    assert convert_main([str(tmp_path / "bad_shape"), "-o", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_corrupt_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(CheckpointError, match="bad.pt.*corrupt"):
        load_checkpoint(bad)


def test_load_pretrained_converts_once_and_reuses(tmp_path, reference, shared):
    w = tmp_path / "weights"
    first = load_pretrained(NAME, weights_dir=w)
    assert (w / f"{NAME}.pt").is_file()
    mtime = (w / f"{NAME}.pt").stat().st_mtime_ns
    second = load_pretrained(NAME, weights_dir=w)
    assert (w / f"{NAME}.pt").stat().st_mtime_ns == mtime
    (w / f"{NAME}.pt").write_bytes(b"garbage")  # corrupt: converted again, not used
    third = load_pretrained(NAME, weights_dir=w)
    for a, b, c in zip(first.state_dict().values(), second.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_megnet_block_in_another_model():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(89, 32)
            self.edge = torch.nn.Linear(1, 32)
            self.block = MEGNetBlock(dim=32, dense=(64, 32))
            self.out = torch.nn.Linear(32, 1)

        def forward(self, data):
            v, e = self.embed(data.node_type), self.edge(data.edge_dist[:, None])
            u = torch.zeros(data.num_graphs, 32)
            e, v, u = self.block(v, data.edge_index, e, u, data.batch)
            return self.out(u).squeeze(-1)

    s = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    batch = Batch.from_data_list([structure_to_graph(s), structure_to_graph(bcc_ba(), cutoff=5)])
    y = Tiny()(batch)
    y.sum().backward()
    assert y.shape == (2,)


def test_random_model_has_the_published_layout(model):
    assert set(MEGNet().state_dict()) == set(model.state_dict())


def test_set2set_matches_pyg_and_vectorises_over_an_ensemble():
    from torch.func import functional_call, stack_module_state, vmap
    from torch_geometric.nn import aggr

    from megnet_pt import Set2Set

    torch.manual_seed(0)
    ours, theirs = Set2Set(32, 2), aggr.Set2Set(32, 2)
    theirs.load_state_dict(ours.state_dict())
    x, index = torch.randn(20, 32), torch.tensor([0] * 5 + [2] * 15)  # graph 1 is empty
    torch.testing.assert_close(ours(x, index, dim_size=3), theirs(x, index, dim_size=3), atol=1e-6, rtol=1e-5)

    models = [MEGNet() for _ in range(3)]
    params, buffers = stack_module_state(models)
    s = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    batch = Batch.from_data_list([structure_to_graph(s), structure_to_graph(bcc_ba(), cutoff=5)])
    base = MEGNet().to("meta")
    out = vmap(lambda p, b: functional_call(base, (p, b), (batch,)).prediction)(params, buffers)
    with torch.no_grad():
        torch.testing.assert_close(out, torch.stack([m(batch).prediction for m in models]), atol=1e-5, rtol=1e-5)


def test_concurrent_saves_of_one_file_all_succeed(tmp_path):
    """Two ranks converting the published weights on first use save the same file at once; neither may fail."""
    import threading

    from megnet_pt.checkpoint import atomic_save

    target, errors = tmp_path / "weights" / "same.pt", []

    def save(k: int) -> None:
        try:
            for _ in range(20):
                atomic_save({"k": k, "x": torch.zeros(1000)}, target)
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.load(target, weights_only=True)["k"] in range(4)
    assert not list(target.parent.glob("*.tmp"))
