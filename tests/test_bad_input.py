"""Bad input and damaged files: a clear error naming the file and the problem, before any work is lost or written."""
import csv
import json
import math
import random
import re
import shutil
import sys
from pathlib import Path

import h5py
import pytest
import torch
from pymatgen.core import Lattice, Structure

from conftest import working_folder
from megnet_pt import MEGNet, StructureError, load_pretrained, structure_to_graph
from megnet_pt.cache import CacheError, GraphCache, build_cache, main as cache_main
from megnet_pt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megnet_pt.predict import main as predict_main
from megnet_pt.structures import find_structure_files, read_structure
from paraisite.checkpoint import load_model_file, save_model
from paraisite.data.datasets import DatasetError, load_dataset
from paraisite.model import ParAIsite
from paraisite.transform import TargetTransform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scan  # noqa: E402
import train as train_py  # noqa: E402

MODEL = "MEGNet-MP-2018.6.1-Eform"


@pytest.fixture
def workdir(tmp_path, shared):
    with working_folder(tmp_path, threads=1) as d:
        yield d


def copy_dataset(shared: Path, dest: Path, rows: int = 12, edit=None) -> Path:
    """The first ``rows`` of Togo15 as a dataset folder of its own; ``edit(rows)`` may change them first."""
    (dest / "cif").mkdir(parents=True)
    table = list(csv.DictReader(open(shared / "data" / "togo15" / "labels.csv")))[:rows]
    for r in table:
        shutil.copy(shared / "data" / "togo15" / "cif" / f"{r['id']}.cif", dest / "cif" / f"{r['id']}.cif")
    if edit:
        edit(table)
    with open(dest / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "formula", "ltc"])
        w.writeheader()
        w.writerows(table)
    return dest


# --- damaged checkpoints ---------------------------------------------------------------------------

def flipped_copies(path: Path, dest: Path, n: int, seed: int = 0):
    data = path.read_bytes()
    rng = random.Random(seed)
    for i in range(n):
        k = rng.randrange(len(data))
        damaged = bytearray(data)
        damaged[k] ^= 1 << rng.randrange(8)
        out = dest / f"flip{i}{path.suffix}"
        out.write_bytes(bytes(damaged))
        yield out


def test_a_flipped_byte_in_a_checkpoint_is_refused_or_harmless(workdir):
    torch.manual_seed(0)
    model = ParAIsite(MEGNet())
    save_model(model, TargetTransform(0.5, 0.7), workdir / "final.pt", selection="final", init="rw", dataset="togo15",
               split=1, epoch=3)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    refused = 0
    for path in flipped_copies(workdir / "final.pt", workdir, 60):
        try:
            loaded, transform, _ = load_model_file(path)
        except CheckpointError:
            refused += 1
            continue
        assert transform == TargetTransform(0.5, 0.7)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, original[key]), (path.name, key)
    assert refused > 30  # most of the file is weights: most flips land there, and are caught
    # a value changed as a damaged byte would change it, the rest of the file intact: refused, naming the file
    payload = torch.load(workdir / "final.pt", weights_only=True)
    payload["state_dict"]["head.0.weight"][0, 0] = 1e37
    torch.save(payload, workdir / "edited.pt")
    with pytest.raises(CheckpointError, match="edited.pt: its weights do not match the digest"):
        load_model_file(workdir / "edited.pt")


def test_a_damaged_converted_megnet_checkpoint_is_refused(workdir):
    save_checkpoint(MEGNet(), workdir / "m.pt", "random")
    payload = torch.load(workdir / "m.pt", weights_only=True)
    payload["state_dict"]["node_embedding.weight"][3, 1] += 1.0
    torch.save(payload, workdir / "m.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(workdir / "m.pt")


def test_published_folder_given_by_path_is_converted_into_the_working_folder(workdir, shared):
    published = workdir / "home" / "weights" / MODEL
    shutil.copytree(shared / "weights" / MODEL, published)
    model = load_pretrained(str(published))
    assert (workdir / "weights" / f"{MODEL}.pt").is_file()
    assert sorted(p.name for p in published.parent.iterdir()) == [MODEL]  # nothing written beside the published folder
    assert isinstance(model, MEGNet)


# --- damaged graph caches -------------------------------------------------------------------------

def decoded(cache: GraphCache) -> dict:
    """Everything a reader hands out: every array of every structure, ids, formulas, labels, cutoff, vocabulary."""
    block = cache._all if cache._all is not None else cache._read(cache._datasets, [(0, len(cache))])
    return {**{k: v.copy() for k, v in vars(block).items()}, "ids": list(cache.ids), "formulas": list(cache.formulas),
            "labels": cache.labels.copy(), "cutoff": cache.cutoff, "vocabulary": list(cache.vocabulary)}


def test_a_flipped_bit_anywhere_in_a_cache_is_refused_or_harmless(workdir, shared):
    """Chunk data (fletcher32), the chunk index and the attributes (sha256 of arrays and header), both ways of reading."""
    build_cache([shared / "data" / "togo15"], workdir / "t.h5", progress=False)
    want = decoded(GraphCache(workdir / "t.h5"))
    data = (workdir / "t.h5").read_bytes()
    in_chunks = torch.zeros(len(data), dtype=torch.bool)
    with h5py.File(workdir / "t.h5") as f:
        for name in ("edge_dist", "edge_image", "edge_source", "edge_target", "pos", "lattice", "node_type", "labels"):
            for i in range(f[name].id.get_num_chunks()):
                info = f[name].id.get_chunk_info(i)
                in_chunks[info.byte_offset : info.byte_offset + info.size] = True
    places = {"array data": torch.nonzero(in_chunks).flatten().tolist(), "the rest": torch.nonzero(~in_chunks).flatten().tolist()}
    rng = random.Random(1)
    refused = {kind: 0 for kind in places}
    for i in range(240):
        kind = ("array data", "the rest")[i % 2]
        damaged = bytearray(data)
        damaged[rng.choice(places[kind])] ^= 1 << rng.randrange(8)
        (workdir / "d.h5").write_bytes(bytes(damaged))
        for in_memory in (None, False):
            try:
                cache = GraphCache(workdir / "d.h5", in_memory=in_memory)
                if in_memory is False:
                    cache.verify()
                got = decoded(cache)
                cache.close()
            except CacheError:
                refused[kind] += 1
                continue
            for key, value in want.items():
                same = torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)) if hasattr(value, "shape") else got[key] == value
                assert same, (i, kind, key)
    assert refused["array data"] == 240  # every flip in compressed array data is caught
    assert refused["the rest"] > 0


def test_an_index_that_reads_other_bytes_is_caught(workdir, shared):
    """As a damaged chunk index would: the bytes of one chunk replaced by a valid chunk of other values."""
    build_cache([shared / "data" / "togo15"], workdir / "t.h5", progress=False)
    with h5py.File(workdir / "t.h5", "r+") as f:
        d = f["edge_dist"]
        values = d[:]
        values[:100] = 0.0
        f.attrs["arrays_sha256"] = f.attrs["arrays_sha256"]  # the recorded digests stay those of the build
        d[:] = values  # rewritten through HDF5: a chunk with a valid fletcher32 checksum, other values
    with pytest.raises(CacheError, match="corrupt: edge distances outside"):
        GraphCache(workdir / "t.h5")
    with pytest.raises(CacheError, match="corrupt"):
        GraphCache(workdir / "t.h5", in_memory=False).verify()
    with h5py.File(workdir / "t.h5", "r+") as f:
        values = f["edge_dist"][:]
        values[:100] = 2.5  # plausible distances, but not those of the positions: caught by the geometry check
        f["edge_dist"][:] = values
    with pytest.raises(CacheError, match="disagree with the positions"):
        GraphCache(workdir / "t.h5")
    assert cache_main(["info", str(workdir / "t.h5"), "--verify"]) == 2
    build_cache([shared / "data" / "togo15"], workdir / "u.h5", progress=False)
    with h5py.File(workdir / "u.h5", "r+") as f:
        f["labels"][3] = f["labels"][3] * 2  # a value nothing else checks: only its recorded sha256 catches it
    with pytest.raises(CacheError, match="array labels does not match its sha256"):
        GraphCache(workdir / "u.h5")


# --- labels.csv ------------------------------------------------------------------------------------

def test_labels_saved_with_a_byte_order_mark_load(workdir, shared):
    folder = copy_dataset(shared, workdir / "bom")
    text = (folder / "labels.csv").read_text()
    (folder / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(load_dataset(str(folder))) == 12


@pytest.mark.parametrize("bad", [" mp-1342", "../../../x", "/etc/passwd", "a/b", ""])
def test_ids_that_are_not_plain_names_are_refused_with_their_line(workdir, shared, bad):
    def edit(rows):
        rows[3]["id"] = bad
    folder = copy_dataset(shared, workdir / "odd", edit=edit)
    with pytest.raises(DatasetError) as error:
        load_dataset(str(folder))
    assert "labels.csv: 1 id(s) are not plain file names" in str(error.value) and f"line 5 ({bad!r})" in str(error.value)
    with pytest.raises(StructureError, match="line 5"):  # the cache refuses it too, reading nothing outside cif/
        build_cache([folder], workdir / "odd.h5", progress=False)
    assert not (workdir / "odd.h5").exists()


# --- train.py --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_a_learning_rate_that_is_not_a_positive_number(workdir, capsys, lr):
    assert train_py.main(["--init", "rw", "--dataset", "togo15", "--epochs", "1", "--lr", lr, "--no-progress"]) == 2
    assert "--lr must be a positive number" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


def test_a_diverging_run_stops_naming_the_split_and_epoch(workdir, capsys):
    args = ["--init", "rw", "--dataset", "togo15", "--epochs", "3", "--splits", "1", "--lr", "1e9", "--no-progress"]
    assert train_py.main(args) == 2
    err = capsys.readouterr().err
    assert "split 1 diverged in epoch" in err and "no such checkpoint" not in err
    run = workdir / "runs" / "rw_togo15"
    assert not (run / "split1" / "final.pt").exists()


def test_a_finished_run_is_not_taken_as_done_once_its_inputs_change(workdir, shared, capsys):
    folder = copy_dataset(shared, workdir / "mine", rows=20)
    args = ["--init", "rw", "--dataset", str(folder), "--epochs", "1", "--splits", "1", "--no-progress"]
    assert train_py.main(args) == 0
    assert json.loads((workdir / "runs" / "rw_mine" / "config.json").read_text())["inputs"]["mine"]
    assert train_py.main(args) == 0 and "done" in capsys.readouterr().out  # the same inputs: done
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    rows[2]["ltc"] = str(float(rows[2]["ltc"]) * 2)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "formula", "ltc"])
        w.writeheader()
        w.writerows(rows)
    assert train_py.main(args) == 2
    assert "built from other sources" in capsys.readouterr().err  # the graph cache sees it first
    [cache] = (workdir / "data").glob("mine-*_cutoff4.h5")  # a user folder's cache is named after its path too
    cache.unlink()  # as its message says: then it is built again, from the new labels
    assert train_py.main(args) == 2
    err = capsys.readouterr().err
    assert "was trained on other inputs (inputs of mine: sha256" in err and "labels.csv or a structure file" in err


def test_a_refused_aflow_run_writes_nothing(workdir, capsys, shared):
    aflow = workdir / "runs" / "other_aflow" / "split1"
    aflow.mkdir(parents=True)
    torch.manual_seed(0)
    model = ParAIsite(MEGNet())
    for selection in ("best", "final"):  # a finished stage, but of another init
        save_model(model, TargetTransform(0.5, 0.7), aflow / f"{selection}.pt", selection=selection, init="rw",
                   dataset="aflow_agl", split=1, epoch=1)
    rc = train_py.main(["--init", "fe+af", "--dataset", "togo15", "--epochs", "1", "--splits", "1",
                        "--aflow-run", str(aflow.parent), "--no-progress"])
    assert rc == 2 and "init is 'rw', expected 'fe'" in capsys.readouterr().err
    assert not (workdir / "runs" / "fe+af_togo15").exists()


# --- structures --------------------------------------------------------------------------------

def test_a_cif_with_two_structures_is_refused(workdir, shared):
    a, b = sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[:2]
    (workdir / "two.cif").write_text(a.read_text() + "\n" + b.read_text())
    with pytest.raises(StructureError, match="two.cif: holds 2 structures"):
        read_structure(workdir / "two.cif")


def test_overlapping_atoms_are_refused_with_the_reason(workdir):
    lattice = Lattice.cubic(4.0)
    with pytest.raises(StructureError, match=r"x: sites 0 and 1 are 0.005 Å apart"):
        structure_to_graph(Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.00125, 0, 0]]), id="x")
    with pytest.raises(StructureError, match="overlapping"):
        structure_to_graph(Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0, 0, 0]]), id="y")
    records = [{"material_id": "ok", "structure": Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()},
               {"material_id": "on-top", "structure": Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0, 0, 0.001]]).as_dict()}]
    (workdir / "mp.json").write_text(json.dumps(records))
    report = build_cache([workdir / "mp.json"], workdir / "mp.h5", progress=False)
    assert report.structures == 1 and report.failures[0][0] == "on-top" and "apart" in report.failures[0][1]
    cif = ("data_x\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
           "_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
           "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
           "Na1 Na 0 0 0 1\nCl1 Cl 0 0 0 1\n")
    (workdir / "overlap.cif").write_text(cif)
    with pytest.raises(StructureError) as error:
        read_structure(workdir / "overlap.cif")
    assert "overlap.cif" in str(error.value) and "Occupancy 2.0 exceeded tolerance" in str(error.value)  # pymatgen's reason


@pytest.mark.parametrize("cutoff", [0.0, -1.0, math.nan, math.inf])
def test_a_cutoff_that_makes_no_graph_is_refused(workdir, shared, cutoff):
    with pytest.raises(ValueError, match="cutoff must be a positive number"):
        structure_to_graph(read_structure(next((shared / "data" / "togo15" / "cif").glob("*.cif"))), cutoff=cutoff)
    with pytest.raises(CacheError, match="cutoff"):
        build_cache([shared / "data" / "togo15"], workdir / "c.h5", cutoff=cutoff, progress=False)
    assert list(workdir.iterdir()) == []


def test_upper_case_cif_names_are_found(workdir, shared):
    (workdir / "in").mkdir()
    source = next((shared / "data" / "togo15" / "cif").glob("*.cif"))
    shutil.copy(source, workdir / "in" / "A.CIF")
    shutil.copy(source, workdir / "in" / "b.cif")
    assert [p.name for p in find_structure_files([workdir / "in"])] == ["A.CIF", "b.cif"]


def test_file_names_that_are_not_utf8_keep_their_row(workdir, shared, capsys):
    import os

    (workdir / "in").mkdir()
    source = next((shared / "data" / "togo15" / "cif").glob("*.cif"))
    with open(os.fsencode(workdir / "in") + b"/caf\xe9.cif", "wb") as f:  # Latin-1, not UTF-8
        f.write(source.read_bytes())
    assert predict_main([str(workdir / "in"), "-o", "out.csv", "--model", str(shared / "weights" / MODEL)]) == 0
    rows = list(csv.DictReader(open("out.csv")))
    assert [r["id"] for r in rows] == ["caf\\xe9"] and rows[0]["eform_ev_per_atom"]
    report = build_cache([workdir / "in"], workdir / "in.h5", progress=False)
    assert report.structures == 1 and GraphCache(workdir / "in.h5").ids == ["caf\\xe9"]


def test_ids_with_line_breaks_are_refused_before_a_cache_is_built(workdir):
    lattice = Lattice.cubic(4.0)
    good = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()
    (workdir / "mp.json").write_text(json.dumps([{"material_id": "mp-1", "structure": good},
                                                  {"material_id": "mp-2\nmp-3", "structure": good}]))
    with pytest.raises(CacheError, match=r"1 id\(s\) are empty or hold line breaks.*'mp-2\\nmp-3' \(in .*mp.json\)"):
        build_cache([workdir / "mp.json"], workdir / "mp.h5", progress=False)
    assert sorted(p.name for p in workdir.iterdir()) == ["mp.json"]


# --- command lines: outputs checked first, inputs that cannot be mixed ------------------------------

def test_predict_checks_its_arguments_before_any_work(workdir, shared, capsys):
    cifs = shared / "data" / "togo15" / "cif"
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(cifs), "-o", "x.csv", "--batch-size", "-3", "--model", str(shared / "weights" / MODEL)])
    assert exit_.value.code == 2 and not (workdir / "x.csv").exists()
    with pytest.raises(SystemExit):
        predict_main([str(cifs), "-o", "x.csv", "--batch-size", "0", "--model", str(shared / "weights" / MODEL)])
    assert "--batch-size: must be at least 1 (got 0)" in capsys.readouterr().err
    (workdir / "folder").mkdir()
    for out, message in (("folder", "is a folder"), ("missing/dir/x.csv", "does not exist")):
        assert predict_main([str(cifs), "-o", out, "--model", str(shared / "weights" / MODEL)]) == 2
        assert message in capsys.readouterr().err
    for name in ("one", "two"):
        (workdir / name).mkdir()
        shutil.copy(next(cifs.glob("*.cif")), workdir / name / "same.cif")
    assert predict_main([str(workdir / "one"), str(workdir / "two"), "-o", "dup.csv",
                         "--model", str(shared / "weights" / MODEL)]) == 2
    assert "1 duplicate id(s) in the inputs: same (in " in capsys.readouterr().err and not (workdir / "dup.csv").exists()


def test_predict_reads_what_cache_build_reads(workdir, shared):
    lattice = Lattice.cubic(5.6)
    rocksalt = Structure.from_spacegroup("Fm-3m", lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    (workdir / "mp.json").write_text(json.dumps([{"material_id": "mp-22862", "structure": rocksalt.as_dict()},
                                                  {"material_id": "mp-bad", "structure": {"not": "a structure"}}]))
    assert predict_main(["mp.json", "-o", "out.csv", "--model", str(shared / "weights" / MODEL)]) == 1
    rows = list(csv.DictReader(open("out.csv")))
    assert [r["id"] for r in rows] == ["mp-22862", "mp-bad"]
    assert rows[0]["eform_ev_per_atom"] and rows[1]["warning"].startswith("error:")


def test_cache_build_into_a_folder_is_refused_before_work(workdir, shared, capsys):
    (workdir / "out").mkdir()
    assert cache_main(["build", str(shared / "data" / "togo15"), "-o", "out", "--quiet"]) == 2
    assert "out: is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]


def test_cache_info_says_what_is_wrong(workdir, shared, capsys):
    cif = next((shared / "data" / "togo15" / "cif").glob("*.cif"))
    assert cache_main(["info", str(cif)]) == 2
    err = capsys.readouterr().err
    assert "not a graph cache (not an HDF5 file; to cache structure files" in err and "delete" not in err
    build_cache([shared / "data" / "togo15"], workdir / "t.h5", progress=False)
    with h5py.File(workdir / "t.h5", "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="no interrupted build of it is left to resume"):
        GraphCache(workdir / "t.h5")


def test_scan_refuses_two_caches(workdir, capsys):
    for name in ("a.h5", "b.h5"):
        (workdir / name).write_bytes(b"")
    assert scan.main(["a.h5", "b.h5", "--models", "runs/none"]) == 2
    assert "scan one graph cache at a time" in capsys.readouterr().err
    assert not (workdir / "data").exists()


# --- outputs that are impossible, inputs that are not what they seem (the fault probe of issue 25) -----------------

def test_convert_refuses_to_write_onto_the_files_it_converts(workdir, shared, capsys):
    from megnet_pt.convert import main as convert_main

    folder = workdir / "published"
    shutil.copytree(shared / "weights" / "MEGNet-MP-2018.6.1-Eform", folder)
    before = (folder / "state.pt").read_bytes()
    for target in ("state.pt", "model.json", "./state.pt"):
        assert convert_main([str(folder), "-o", str(folder / target)]) == 2
        assert "is one of the files it converts from" in capsys.readouterr().err
    assert (folder / "state.pt").read_bytes() == before
    assert convert_main([str(folder), "-o", str(workdir / "converted.pt")]) == 0  # and converts again after


def test_a_single_json_record_is_one_structure_not_a_mapping(workdir, capsys):
    nacl = Structure(Lattice.cubic(3.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # CsCl-type: bonds < 4 Å
    (workdir / "one.json").write_text(json.dumps({"material_id": "mp-22862", "band_gap": 5.0,
                                                  "structure": nacl.as_dict()}))
    (workdir / "mapping.json").write_text(json.dumps({"a": nacl.as_dict(), "b": nacl.as_dict()}))
    assert predict_main([str(workdir / "one.json"), str(workdir / "mapping.json"), "-o", str(workdir / "e.csv")]) == 0
    rows = list(csv.DictReader(open(workdir / "e.csv")))
    assert [r["id"] for r in rows] == ["mp-22862", "a", "b"] and all(not r["warning"] for r in rows)


def test_a_symbolic_link_that_leads_nowhere_keeps_its_row_with_the_reason(workdir, shared, capsys):
    folder = workdir / "cifs"
    folder.mkdir()
    shutil.copy(sorted((shared / "data" / "togo15" / "cif").glob("*.cif"))[0], folder / "real.cif")
    (folder / "loop-a.cif").symlink_to(folder / "loop-b.cif")
    (folder / "loop-b.cif").symlink_to(folder / "loop-a.cif")
    (folder / "dangling.cif").symlink_to(folder / "gone.cif")
    assert predict_main([str(folder), "-o", str(workdir / "e.csv")]) == 1
    rows = {r["id"]: r["warning"] for r in csv.DictReader(open(workdir / "e.csv"))}
    assert set(rows) == {"real", "loop-a", "loop-b", "dangling"} and not rows["real"]
    assert "symbolic link in a loop" in rows["loop-a"] and "symbolic link to" in rows["dangling"]
    assert "predicted 1 of 4" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty.json", "empty.xyz"])
def test_inputs_without_structures_are_an_error_everywhere(workdir, capsys, kind):
    if kind.endswith(".xyz"):
        pytest.importorskip("ase", reason="extended XYZ needs ASE (in .[test])")
    (workdir / kind).write_text("[]" if kind.endswith(".json") else "")
    assert predict_main([str(workdir / kind), "-o", str(workdir / "e.csv")]) == 2
    assert "hold no structures" in capsys.readouterr().err


def test_a_time_limit_that_is_not_a_positive_number_is_refused(workdir, capsys):
    for bad in ("-5", "nan", "0"):
        assert train_py.main(["--init", "rw", "--time-limit", bad, "--processes", "1"]) == 2
        assert "--time-limit must be a positive number of minutes" in capsys.readouterr().err


@pytest.mark.parametrize("code, says", [(28, "no space left on the device"), (30, "read-only file system"),
                                        (13, "permission denied")])
def test_an_os_error_while_saving_is_one_line_and_leaves_no_temporary_file(workdir, monkeypatch, capsys, code, says):
    """A full disk or a read-only folder while a checkpoint is written (root ignores permissions: the error is made
    where the file is written)."""
    import os

    from megnet_pt import checkpoint as ckpt

    real_save = ckpt.torch.save

    def failing_save(obj, path, *a, **k):
        if "state_" in str(path) and Path(path).name.endswith(".tmp"):
            real_save(obj, path, *a, **k)  # half written ...
            raise OSError(code, os.strerror(code), str(path))  # ... then the device says no
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with working_folder(workdir):
        rc = train_py.main(["--init", "rw", "--dataset", "togo15", "--epochs", "2", "--splits", "1,", "--processes", "1",
                            "--no-progress", "--run-dir", "runs/full"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and says in line[0] and "state_1.pt" in line[0] and "run the same command again" in line[0]
    assert not list((workdir / "runs" / "full").glob("*.tmp"))


def test_torch_saves_failure_on_a_full_disk_is_an_os_error(workdir, monkeypatch):
    from megnet_pt import checkpoint as ckpt

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 0 vs 123")

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError) as caught:
        ckpt.atomic_save({"x": 1}, workdir / "x.pt")
    assert caught.value.errno == 28 and not list(workdir.glob("x.pt*"))


CELL = """data_x
_cell_length_a {a}
_cell_length_b 4
_cell_length_c 4
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
{sites}"""


@pytest.mark.parametrize("a, sites, says", [
    ("0", "Na1 Na 0 0 0\n", "the cell length a is 0 (a cell of zero volume)"),
    ("4", "Na1 Na nan 0 0\n", "coordinate that is not a number"),
    ("4", "", "no atom sites"),
], ids=["zero-volume", "nan-coordinate", "no-atoms"])
def test_a_cif_pymatgen_cannot_read_is_named_with_what_is_wrong(workdir, a, sites, says):
    path = workdir / "bad.cif"
    path.write_text(CELL.format(a=a, sites=sites))
    with pytest.raises(StructureError, match=re.escape(says)):
        read_structure(path)


def test_a_graph_cache_given_to_predict_is_named_as_one(workdir, shared, capsys):
    cache = workdir / "t.h5"
    build_cache([shared / "data" / "togo15"], cache, cutoff=4.0, progress=False)
    assert predict_main([str(cache), "-o", str(workdir / "e.csv")]) == 2
    err = capsys.readouterr().err
    assert "is a graph cache" in err and "scan.py" in err
