"""The HDF5 graph cache: graphs read back equal graphs built directly, and nothing is silently wrong."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader as PyGDataLoader

import megnet_pt.cache.format as cache_format
import megnet_pt.cache.workers as cache_workers
import megnet_pt.cache.writer as cache_module
from megnet_pt.cache import CacheError, GraphCache, build_cache, describe, ensure_cache, main, read_progress
from megnet_pt.elements import ELEMENTS
from megnet_pt.graph import structure_to_graph
from megnet_pt.structures import iter_structures, read_structure

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("togo15", "miyazaki21", "aflow_agl")
TENSOR_FIELDS = ("node_type", "edge_index", "edge_dist", "edge_image", "pos", "lattice", "state")


def direct_graph(path: Path) -> Data:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return structure_to_graph(read_structure(path), id=path.stem)


def direct_arrays(path: Path) -> dict:
    """``direct_graph`` as numpy arrays: tensors sent between processes go through shared memory, slowly."""
    g = direct_graph(path)
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in g.to_dict().items()}


def direct_graphs(paths: list[Path]) -> list[Data]:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        arrays = pool.map(direct_arrays, paths, chunksize=64)
    return [Data(**{k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}) for a in arrays]


def assert_same_graph(got: Data, want: Data) -> None:
    """Same fields, dtypes, shapes and values (float32 data are stored as float32: exact)."""
    for key in TENSOR_FIELDS:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (want.id, key, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (want.id, key)
    assert (got.num_nodes, got.id, got.formula) == (want.num_nodes, want.id, want.formula)


def assert_same_batch(got: Batch, want: Batch) -> None:
    assert set(got.keys()) == set(want.keys())
    for key in want.keys():
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        else:
            assert a == b, key
    assert got.num_graphs == want.num_graphs and got.num_nodes == want.num_nodes
    for key, value in want._slice_dict.items():
        assert torch.equal(got._slice_dict[key], value), key
    for key, value in want._inc_dict.items():
        assert (got._inc_dict[key] is None and value is None) or torch.equal(got._inc_dict[key], value), key


def labels_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One cache per shared dataset, built with two workers."""
    out = tmp_path_factory.mktemp("caches")
    paths = {}
    for name in DATASETS:
        report = build_cache([shared / "data" / name], out / f"{name}.h5", workers=2, progress=False)
        assert report.failures == [], report.failures
        paths[name] = report.path
    return paths


# ---------------------------------------------------------------------------
# Graphs read back are the graphs built directly


@pytest.mark.parametrize("name", DATASETS)
def test_every_graph_equals_the_direct_graph(built: dict[str, Path], shared: Path, name: str) -> None:
    folder = shared / "data" / name
    rows = labels_csv(folder)
    cache = GraphCache(built[name], cutoff=4.0, vocabulary=ELEMENTS)
    assert cache.ids == [r["id"] for r in rows]
    assert cache.label_names == ["ltc"]
    np.testing.assert_array_equal(cache.labels[:, 0], [float(r["ltc"]) for r in rows])
    files = [folder / "cif" / f"{r['id']}.cif" for r in rows]
    for k, want in enumerate(direct_graphs(files)):
        got = cache[k]
        assert_same_graph(got, want)
        assert got.y.dtype == torch.float32 and got.y.shape == (1, 1)
        assert got.y.item() == pytest.approx(float(rows[k]["ltc"]), rel=1e-6)


def test_build_does_not_depend_on_workers(shared: Path, built: dict[str, Path], tmp_path: Path) -> None:
    one = build_cache([shared / "data" / "togo15"], tmp_path / "one.h5", workers=1, progress=False).path
    with h5py.File(one, "r") as a, h5py.File(built["togo15"], "r") as b:
        names = []
        a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
        for name in names:
            assert np.array_equal(a[name][:], b[name][:]), name
        for key in ("cutoff", "vocabulary", "label_names", "sources_sha256", "ids_sha256", "n_edges"):
            assert a.attrs[key] == b.attrs[key], key


def test_batch_equals_batch_from_data_list(built: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    for in_memory in (True, False):
        cache = GraphCache(built["aflow_agl"], in_memory=in_memory)
        assert cache.in_memory is in_memory
        for indices in (rng.integers(0, len(cache), 48), [7, 7, 3, 2000, 0], np.arange(100, 164), [5]):
            got = cache.batch(indices)
            want = Batch.from_data_list([cache[int(i)] for i in indices])
            assert_same_batch(got, want)
            assert got.state.shape == (len(indices), 2) and got.ptr.shape == (len(indices) + 1,)
            for a, b in zip(got.to_data_list(), want.to_data_list()):
                assert_same_graph(a, b)
        assert_same_batch(cache[10:20], Batch.from_data_list([cache[i] for i in range(10, 20)]))
        before = cache[10]
        for edited in (cache[10:20], cache[10]):  # batches and graphs are copies, not views of the cache
            for key in TENSOR_FIELDS:
                edited[key].add_(1)
        assert_same_graph(cache[10], before)
        assert_same_batch(cache[torch.tensor([3, 1])], Batch.from_data_list([cache[3], cache[1]]))
        assert cache[-1].id == cache.ids[-1]
        with pytest.raises(IndexError):
            cache[len(cache)]
        with pytest.raises(IndexError):
            cache.batch([0, len(cache)])
        with pytest.raises(IndexError):
            next(cache.iter_batches(4, indices=[1, -len(cache) - 1]))


def test_iter_batches_streams_in_bounded_blocks(built: dict[str, Path]) -> None:
    whole = GraphCache(built["aflow_agl"])
    streamed = GraphCache(built["aflow_agl"], in_memory=False, block_bytes=100_000)
    assert streamed._structures_per_block(32) < len(streamed) // 10  # many blocks
    for a, b in zip(whole.iter_batches(32), streamed.iter_batches(32), strict=True):
        assert_same_batch(a, b)
    subset = np.arange(0, len(whole), 7)[::-1]
    seen = [i for b in streamed.iter_batches(50, indices=subset) for i in b.id]
    assert seen == [whole.ids[i] for i in subset]
    for cache in (whole, streamed):
        shuffled = [i for b in cache.iter_batches(64, shuffle=True, seed=1) for i in b.id]
        assert sorted(shuffled) == sorted(whole.ids) and shuffled != whole.ids
        sizes = [b.num_graphs for b in cache.iter_batches(64, shuffle=True, seed=1, drop_last=True)]
        assert set(sizes) == {64} and len(sizes) == len(whole) // 64


def test_dataloader_with_two_workers(built: dict[str, Path]) -> None:
    for in_memory in (True, False):
        cache = GraphCache(built["miyazaki21"], in_memory=in_memory)
        cache[0]  # the parent has the file open; forked workers must open their own
        batches = list(cache.loader(batch_size=16, shuffle=True, seed=0, num_workers=2))
        ids = [i for b in batches for i in b.id]
        assert sorted(ids) == sorted(cache.ids)
        assert_same_batch(batches[0], cache.batch([cache.index_of(i) for i in batches[0].id]))
        pyg = list(PyGDataLoader(cache, batch_size=16, num_workers=2))
        assert_same_batch(pyg[1], cache.batch(np.arange(16, 32)))
    clone = pickle.loads(pickle.dumps(cache))
    assert_same_graph(clone[5], cache[5])


# ---------------------------------------------------------------------------
# Interrupted builds resume


def test_resume_after_an_exception(shared: Path, built: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    inputs = [shared / "data" / "togo15", shared / "data" / "miyazaki21"]
    out = tmp_path / "mix.h5"
    real, calls = cache_workers._convert, []

    def flaky(entry, cutoff):
        calls.append(entry.id)
        if len(calls) == 120:
            raise KeyboardInterrupt
        return real(entry, cutoff)

    monkeypatch.setattr(cache_workers, "_convert", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(inputs, out, commit_every=50, progress=False, workers=1)
    assert not out.exists() and read_progress(out)["inputs"] == 119
    with pytest.raises(CacheError, match="re-run the build to resume"):
        GraphCache(out)
    assert "unfinished build, 119 inputs done" in describe(out)
    monkeypatch.setattr(cache_workers, "_convert", real)
    report = build_cache(inputs, out, commit_every=50, progress=False)
    assert report.resumed == 119 and report.structures == 95 + 143
    assert not Path(str(out) + ".partial").exists()
    cache = GraphCache(out)
    parts = [GraphCache(built["togo15"]), GraphCache(built["miyazaki21"])]
    assert cache.ids == parts[0].ids + parts[1].ids
    for k, i in enumerate(cache.ids):
        part = parts[0] if k < 95 else parts[1]
        assert_same_graph(cache[k], part[part.index_of(i)])


def test_resume_after_a_kill(shared: Path, built: dict[str, Path], tmp_path: Path) -> None:
    """A build killed with SIGKILL mid-way resumes from its last flushed chunk."""
    files = sorted((shared / "data" / "aflow_agl" / "cif").glob("*.cif"))[:400]
    out = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "megnet_pt.cache", "build", *map(str, files), "-o", str(out), "--commit-every", "20", "--quiet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = read_progress(out)["inputs"]
        except (OSError, KeyError):
            done = 0
        if done >= 80:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 80 <= done < 400, f"the build was not caught mid-way ({done} done; {proc.stderr.read().decode()[-500:]})"
    assert not out.exists()
    report = build_cache(files, out, workers=2, progress=False)
    assert report.resumed >= done and report.structures == 400 and not report.failures
    cache, reference = GraphCache(out), GraphCache(built["aflow_agl"])
    assert cache.ids == [f.stem for f in files] and cache.labels is None
    for k, i in enumerate(cache.ids):
        assert_same_graph(cache[k], reference[reference.index_of(i)])


def test_a_partial_file_of_another_build_is_not_resumed(shared: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "togo.h5"

    def boom(entry, cutoff):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_workers, "_convert", boom)
    with pytest.raises(KeyboardInterrupt):
        build_cache([shared / "data" / "togo15"], out, cutoff=5.0, progress=False, workers=1)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="another cutoff; starting over"):
        report = build_cache([shared / "data" / "togo15"], out, cutoff=4.0, progress=False)
    assert report.resumed == 0 and GraphCache(out, cutoff=4.0).cutoff == 4.0


def test_concurrent_builds_of_one_cache_wait_for_each_other(shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "togo.h5"
    results = []
    with cache_module._build_lock(out):  # as if another process were building it
        worker = threading.Thread(target=lambda: results.append(ensure_cache([shared / "data" / "togo15"], out, progress=False)))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not Path(str(out) + ".partial").exists()
    worker.join(120)
    assert len(results[0]) == 95 and not Path(str(out) + ".lock").exists()


# ---------------------------------------------------------------------------
# Damage and mismatches are reported, with the path and the reason


def test_truncated_and_corrupt_files_are_detected(built: dict[str, Path], tmp_path: Path) -> None:
    source = built["miyazaki21"]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CacheError, match=f"{truncated}: .*truncated or corrupt"):
        GraphCache(truncated)

    corrupt = tmp_path / "corrupt.h5"
    shutil.copy(source, corrupt)
    with h5py.File(corrupt, "r") as f:
        chunk = f["edge_dist"].id.get_chunk_info(0)
    data = bytearray(corrupt.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{corrupt}: corrupt"):
        GraphCache(corrupt)  # small: loaded whole, so checked at once
    streamed = GraphCache(corrupt, in_memory=False)
    with pytest.raises(CacheError, match=f"{corrupt}: corrupt"):
        streamed[0]
    with pytest.raises(CacheError, match="corrupt"):
        streamed.verify()

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not HDF5 at all" * 100)
    with pytest.raises(CacheError, match=f"{garbage}: not a graph cache \\(not an HDF5 file; damaged"):
        GraphCache(garbage)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CacheError, match="not a megnet_pt graph cache"):
        GraphCache(other)
    with pytest.raises(CacheError, match="no such graph cache"):
        GraphCache(tmp_path / "missing.h5")


def test_inconsistent_arrays_and_ids_are_detected(built: dict[str, Path], tmp_path: Path) -> None:
    def damaged(name: str, edit) -> Path:
        path = tmp_path / f"{name}.h5"
        shutil.copy(built["togo15"], path)
        with h5py.File(path, "r+") as f:
            edit(f)
            # the deeper checks below, each on its own: the header's own digest is made to match the edit
            f.attrs["header_sha256"] = cache_format.header_sha256({k: cache_format._attr(f, k) for k in f.attrs})
        return path

    def shorten(f: h5py.File) -> None:
        f["edge_dist"].resize((f["edge_dist"].shape[0] - 1,))

    def bad_pointer(f: h5py.File) -> None:
        f["node_ptr"][3] = 10**6

    def duplicate(f: h5py.File) -> None:
        ids = f["ids"].asstr()[:]
        ids[1] = ids[0]
        f["ids"][:] = ids
        f.attrs["ids_sha256"] = cache_format._strings_sha256(list(ids))

    def edited_id(f: h5py.File) -> None:
        f["ids"][0] = "mp-0"

    def schema(f: h5py.File) -> None:
        f.attrs["schema_version"] = 99

    def incomplete(f: h5py.File) -> None:
        f.attrs["complete"] = False

    def bad_edge(f: h5py.File) -> None:
        f["edge_target"][0] = 50

    for edit, reason in [
        (shorten, "array edge_dist should have"),
        (bad_pointer, "node_ptr is not a valid offset array"),
        (duplicate, "duplicate ids mp-23231"),
        (edited_id, "ids or formulas do not match their checksum"),
        (schema, "schema version 99"),
        (incomplete, "incomplete"),
        (bad_edge, "edge_target points outside its structure"),
    ]:
        path = damaged(edit.__name__, edit)
        with pytest.raises(CacheError, match=f"{path}: .*{reason}"):
            GraphCache(path)
    path = tmp_path / "attribute.h5"
    shutil.copy(built["togo15"], path)
    with h5py.File(path, "r+") as f:
        f.attrs["n_failed"] = 3
    with pytest.raises(CacheError, match="its attributes .* do not match their sha256"):
        GraphCache(path)


def test_cutoff_vocabulary_and_source_mismatches_are_refused(shared: Path, built: dict[str, Path], tmp_path: Path) -> None:
    path = built["togo15"]
    with pytest.raises(CacheError, match=f"{path}: built with cutoff 4 Å, the model needs 5 Å"):
        GraphCache(path, cutoff=5.0)
    with pytest.raises(CacheError, match="element vocabulary differs"):
        GraphCache(path, vocabulary=ELEMENTS[:-1])
    with pytest.raises(CacheError, match="element vocabulary differs"):
        GraphCache(path, vocabulary=("He", "H") + ELEMENTS[2:])
    with pytest.raises(CacheError, match="built with cutoff 4 Å"):
        ensure_cache([shared / "data" / "togo15"], path, cutoff=6.0)
    with pytest.raises(CacheError, match="vocabulary"):
        ensure_cache([shared / "data" / "togo15"], path, vocabulary=ELEMENTS[:80])

    # Reused while the sources are unchanged; refused once they change.
    folder = tmp_path / "togo15"
    shutil.copytree(shared / "data" / "togo15", folder)
    out = tmp_path / "togo.h5"
    first = ensure_cache([folder], out, progress=False)
    stamp = out.stat().st_mtime_ns
    again = ensure_cache([folder], out, progress=False)
    assert out.stat().st_mtime_ns == stamp and again.ids == first.ids
    assert first.sources_sha256 == GraphCache(path).sources_sha256  # contents and names, not location
    (folder / "cif" / "mp-23231.cif").write_text((folder / "cif" / "mp-22922.cif").read_text())
    with pytest.raises(CacheError, match=f"{out}: built from other sources"):
        ensure_cache([folder], out, progress=False)
    assert ensure_cache([folder], out, rebuild=True, progress=False).sources_sha256 != first.sources_sha256


def test_duplicate_ids_are_an_error(shared: Path, tmp_path: Path) -> None:
    cif = shared / "data" / "togo15" / "cif" / "mp-23231.cif"
    with pytest.raises(CacheError, match=r"duplicate id\(s\) in the inputs: mp-23231 \(in .*mp-23231.cif"):
        build_cache([shared / "data" / "togo15", cif], tmp_path / "dup.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Bad structures are listed and the build goes on; other input formats


def write_cif(path: Path, structure: Structure) -> None:
    CifWriter(structure).write_file(path)


def test_failing_structures_are_listed_and_the_build_goes_on(shared: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    (folder / "cif").mkdir(parents=True)
    good = ["mp-23231", "mp-22922"]
    for i in good:
        shutil.copy(shared / "data" / "togo15" / "cif" / f"{i}.cif", folder / "cif")
    write_cif(folder / "cif" / "polonium.cif", Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]]))
    write_cif(folder / "cif" / "alloy.cif", Structure(Lattice.cubic(2.9), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]]))
    (folder / "cif" / "empty.cif").write_text("")
    (folder / "cif" / "malformed.cif").write_text("data_x\n_cell_length_a banana\nloop_\n_atom_site_label\n")
    rows = ["id,formula,ltc,source", "mp-23231,AgBr,0.53,x", "polonium,Po,1,x", "alloy,FeCo,2,x",
            "mp-22922,AgCl,,x", "empty,,3,x", "malformed,,4,x", "absent,,5,x"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    report = build_cache([folder], tmp_path / "mixed.h5", progress=False)
    reasons = dict(report.failures)
    assert list(reasons) == ["polonium", "alloy", "empty", "malformed", "absent"]
    assert "Po" in reasons["polonium"] and "vocabulary" in reasons["polonium"]
    assert "partial occupancy" in reasons["alloy"]
    assert "empty" in reasons["empty"]
    assert "cannot read" in reasons["malformed"] or "no atomic sites" in reasons["malformed"]
    assert "no such file" in reasons["absent"]
    cache = GraphCache(tmp_path / "mixed.h5")
    assert cache.ids == good and cache.failures == report.failures
    assert cache.label_names == ["ltc"]  # 'source' is text, not a label
    assert cache.labels[0, 0] == 0.53 and np.isnan(cache.labels[1, 0])
    assert main(["info", str(tmp_path / "mixed.h5"), "--failures", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "failed          5" in out and "failed alloy:" in out and "checksums and values sound" in out


def test_pymatgen_json_inputs(shared: Path, tmp_path: Path) -> None:
    ids = ["mp-23231", "mp-22922", "mp-1190"]
    structures = [read_structure(shared / "data" / "togo15" / "cif" / f"{i}.cif") for i in ids]
    records = tmp_path / "mp.json"
    records.write_text(json.dumps([{"material_id": i, "structure": s.as_dict(), "band_gap": 1.5 + k, "note": "x"}
                                   for k, (i, s) in enumerate(zip(ids, structures))]))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([s.as_dict() for s in structures[:2]]))
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"a": structures[2].as_dict(), "b": {"lattice": "broken"}}))
    report = build_cache([records, plain, mapping], tmp_path / "json.h5", progress=False)
    assert [i for i, _ in report.failures] == ["b"]
    cache = GraphCache(tmp_path / "json.h5")
    assert cache.ids == ids + ["plain-0", "plain-1", "a"]
    assert cache.label_names == ["band_gap"]
    np.testing.assert_array_equal(cache.labels[:3, 0], [1.5, 2.5, 3.5])
    assert np.isnan(cache.labels[3:, 0]).all()
    for k, s in enumerate(structures + structures[:2] + structures[2:]):
        assert_same_graph(cache[k], structure_to_graph(s, id=cache.ids[k]))


def test_extxyz_inputs(shared: Path, tmp_path: Path) -> None:
    ase_io = pytest.importorskip("ase.io", reason="extended-XYZ inputs are read with ASE (pip install ase, in .[test])")
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = []
    for k, i in enumerate(["mp-23231", "mp-1190"]):
        atoms = AseAtomsAdaptor.get_atoms(read_structure(shared / "data" / "togo15" / "cif" / f"{i}.cif"))
        atoms.info.update(id=i, ltc=0.5 + k)
        frames.append(atoms)
    frames.append(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))  # a molecule: no cell
    path = tmp_path / "frames.extxyz"
    ase_io.write(path, frames, format="extxyz")
    report = build_cache([path], tmp_path / "xyz.h5", progress=False)
    assert [i for i, _ in report.failures] == ["frames-2"] and "periodic" in report.failures[0][1]
    cache = GraphCache(tmp_path / "xyz.h5")
    assert cache.ids == ["mp-23231", "mp-1190"] and cache.label_names == ["ltc"]
    np.testing.assert_array_equal(cache.labels[:, 0], [0.5, 1.5])
    for k, (i, atoms) in enumerate(zip(cache.ids, ase_io.read(path, index=":2"))):
        assert_same_graph(cache[k], structure_to_graph(atoms, id=i))
    listed = list(iter_structures([path]))
    assert [i for i, _, _ in listed] == ["mp-23231", "mp-1190", "frames-2"]
    assert isinstance(listed[0][1], Structure) and isinstance(listed[2][1], Exception)
