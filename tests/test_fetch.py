"""Fetching the datasets and published weights from their public sources.

The sources are replaced by the mirror in ../shared/upstream (a ``file://``
base URL, or a local web server), and what the fetch builds in a fresh
PARAISITE_HOME is compared with ../shared/data and ../shared/weights.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import importlib.util
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Structure

from megnet_pt import download as dl
from paraisite.data import fetch as data
from paraisite.data import paths
from paraisite.data import sources

ROOT = Path(__file__).resolve().parents[1]
MODEL = "MEGNet-MP-2018.6.1-Eform"
ROWS = {"togo15": 95, "miyazaki21": 143, "aflow_agl": 3269}


@pytest.fixture(scope="module")
def upstream(shared: Path) -> Path:
    folder = shared / "upstream"
    if not folder.is_dir():
        pytest.skip(f"no upstream mirror at {folder}")
    return folder


@pytest.fixture(scope="module")
def fetched(upstream: Path, tmp_path_factory: pytest.TempPathFactory):
    """Everything fetched once from the file:// mirror into a fresh PARAISITE_HOME."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARAISITE_HOME", str(home))
        mp.delenv(paths.BASE_URL_ENV, raising=False)
        folders = sources.fetch(base_url=upstream.as_uri())
        weights = sources.fetch_weights(base_url=upstream.as_uri())
        yield home, folders, weights


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty PARAISITE_HOME for one test."""
    folder = tmp_path / "home"
    monkeypatch.setenv("PARAISITE_HOME", str(folder))
    monkeypatch.delenv(paths.BASE_URL_ENV, raising=False)
    return folder


def read_labels(folder: Path) -> list[list[str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.reader(f))


def read(path: Path) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_file(path)


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def no_network(*args, **kwargs):
    raise AssertionError("the network was used")


# --------------------------------------------------------------------------
# The rebuild equals ../shared


@pytest.mark.parametrize("name", list(ROWS))
def test_labels_equal_shared(fetched, shared: Path, name: str):
    home, folders, _ = fetched
    assert folders[name] == home / "data" / name
    mine, ref = read_labels(folders[name]), read_labels(shared / "data" / name)
    assert mine[0] == ["id", "formula", "ltc"]
    assert len(mine) - 1 == ROWS[name]
    assert mine == ref  # same ids, formulas and labels, as strings, in the same order
    ids = [row[0] for row in mine[1:]]
    assert sorted(p.name for p in (folders[name] / "cif").iterdir()) == sorted(f"{i}.cif" for i in ids)


@pytest.mark.parametrize("name", ["togo15", "miyazaki21"])
def test_rebuilt_structures_equal_shared(fetched, shared: Path, name: str):
    folder = fetched[1][name]
    for (id, *_rest) in read_labels(folder)[1:]:
        mine, ref = read(folder / "cif" / f"{id}.cif"), read(shared / "data" / name / "cif" / f"{id}.cif")
        assert [str(s.species) for s in mine] == [str(s.species) for s in ref], id
        np.testing.assert_allclose(mine.lattice.matrix, ref.lattice.matrix, rtol=0, atol=1e-6, err_msg=id)
        np.testing.assert_allclose(mine.frac_coords, ref.frac_coords, rtol=0, atol=1e-6, err_msg=id)
        np.testing.assert_allclose(mine.cart_coords, ref.cart_coords, rtol=0, atol=1e-6, err_msg=id)


def test_aflow_cifs_copied_unchanged(fetched, shared: Path):
    folder = fetched[1]["aflow_agl"] / "cif"
    ref = shared / "data" / "aflow_agl" / "cif"
    names = sorted(p.name for p in ref.iterdir())
    assert len(names) == ROWS["aflow_agl"]
    different = [n for n in names if (folder / n).read_bytes() != (ref / n).read_bytes()]
    assert not different


def test_weights_byte_equal_shared(fetched, shared: Path):
    home, _, weights = fetched
    assert weights == home / "weights" / MODEL
    for file in ("state.pt", "model.json"):
        assert (weights / file).read_bytes() == (shared / "weights" / MODEL / file).read_bytes()


def test_nothing_partial_left(fetched):
    home = fetched[0]
    leftovers = [p for p in home.rglob(".*")]
    assert not leftovers


def test_manifest_is_what_the_script_makes(upstream: Path):
    spec = importlib.util.spec_from_file_location("make_aflow_manifest", ROOT / "scripts" / "make_aflow_manifest.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = (ROOT / "paraisite" / "data" / sources.MANIFEST).read_text()
    assert script.make_manifest(upstream) == committed
    rows = list(csv.DictReader(committed.splitlines()))
    assert len(rows) == 5578 and sum(1 for r in rows if r["sha256"]) == ROWS["aflow_agl"]


# --------------------------------------------------------------------------
# Reuse


def test_second_fetch_reuses(fetched, upstream: Path, shared: Path, monkeypatch: pytest.MonkeyPatch):
    home, folders, weights = fetched
    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    before = {n: (f / "labels.csv").stat().st_ino for n, f in folders.items()}
    assert sources.fetch(base_url=upstream.as_uri()) == folders
    assert sources.fetch() == folders  # no base URL: still nothing to download
    assert {n: sources.ensure_dataset(n) for n in ROWS} == folders
    assert {n: (f / "labels.csv").stat().st_ino for n, f in folders.items()} == before
    assert sources.fetch_weights() == weights
    # --force rebuilds from the verified downloads, still without the network.
    sources.fetch(["togo15"], force=True)
    assert (folders["togo15"] / "labels.csv").stat().st_ino != before["togo15"]
    assert read_labels(folders["togo15"]) == read_labels(shared / "data" / "togo15")
    assert len(list((folders["togo15"] / "cif").iterdir())) == ROWS["togo15"]


def test_ensure_dataset_fetches_only_what_is_asked(home: Path, upstream: Path):
    folder = sources.ensure_dataset("miyazaki21", base_url=str(upstream))  # a plain folder works as base URL
    assert folder == home / "data" / "miyazaki21"
    assert sorted(p.name for p in (home / "data").iterdir()) == ["miyazaki21"]
    assert all_files(home / "raw") == ["ParAIsite/main/src/structures_scalers/Dataset2.pkl"]
    with pytest.raises(ValueError, match="unknown dataset"):
        sources.ensure_dataset("nope")


def test_base_url_from_the_environment(home: Path, upstream: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(paths.BASE_URL_ENV, upstream.as_uri())
    sources.fetch(["togo15"])
    assert len(read_labels(home / "data" / "togo15")) - 1 == ROWS["togo15"]


# --------------------------------------------------------------------------
# Failures: checksum, missing file, offline


def test_checksum_mismatch_names_the_url_and_saves_nothing(home: Path, upstream: Path, tmp_path: Path):
    mirror = tmp_path / "mirror"
    shutil.copytree(upstream / "matgl", mirror / "matgl")
    tampered = mirror / "matgl" / "pretrained_models" / MODEL / "model.json"
    tampered.chmod(0o644)
    tampered.write_bytes(tampered.read_bytes().replace(b"MEGNet", b"MEGNeT", 1))
    with pytest.raises(dl.ChecksumError) as error:
        sources.fetch_weights(base_url=mirror.as_uri())
    message = str(error.value)
    assert tampered.as_uri() in message
    assert dl.PUBLISHED_WEIGHTS[MODEL]["model.json"] in message
    assert "PARAISITE_HOME" in message
    # state.pt was fine and is kept; of model.json, not even a partial file.
    assert all_files(home / "weights") == [f"{MODEL}/state.pt"]


def test_checksum_mismatch_in_a_dataset_leaves_no_dataset(home: Path, upstream: Path, tmp_path: Path):
    mirror = tmp_path / "mirror"
    pickle_path = mirror / "ParAIsite" / sources.TOGO15_PICKLE.path
    pickle_path.parent.mkdir(parents=True)
    pickle_path.write_bytes((upstream / "ParAIsite" / sources.TOGO15_PICKLE.path).read_bytes()[:-10])  # truncated
    with pytest.raises(dl.ChecksumError, match="Dataset1.pkl"):
        sources.fetch(["togo15"], base_url=mirror.as_uri())
    assert all_files(home) == []
    assert not (home / "data" / "togo15").exists()
    with pytest.raises(dl.ChecksumError):  # and it is not mistaken for a dataset next time
        sources.ensure_dataset("togo15", base_url=mirror.as_uri())


def test_file_missing_from_the_mirror(home: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(dl.DownloadError) as error:
        sources.fetch_weights(base_url=empty.as_uri())
    message = str(error.value)
    assert f"{empty.as_uri()}/matgl/pretrained_models/{MODEL}/" in message
    assert "PARAISITE_HOME" in message and "base URL" in message
    assert all_files(home) == []


def test_offline_names_the_github_url(home: Path, monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    with pytest.raises(dl.DownloadError) as error:
        sources.fetch(["togo15"])
    message = str(error.value)
    url = (
        "https://raw.githubusercontent.com/liudakl/ParAIsite/cc0c1ff578cbed186ba930784db2909b0066a80e/"
        "main/src/structures_scalers/Dataset1.pkl"
    )
    assert url in message
    assert "offline" in message and "PARAISITE_HOME" in message and paths.BASE_URL_ENV in message
    assert all_files(home) == []


def test_unreachable_server(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/state.pt"
    with pytest.raises(dl.DownloadError, match="offline") as error:
        dl.download(url, tmp_path / "state.pt", "0" * 64, timeout=5)
    assert url in str(error.value)
    assert list(tmp_path.iterdir()) == []


class _CutShort:
    """A response that delivers some bytes, then loses the connection."""

    def __init__(self, payload: bytes):
        self.chunks = [payload[: len(payload) // 2]]

    def read(self, n: int) -> bytes:
        if self.chunks:
            return self.chunks.pop()
        raise ConnectionResetError(104, "Connection reset by peer")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interrupted_download_is_retried_and_never_left_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    payload = b"complete file" * 1000
    sha = hashlib.sha256(payload).hexdigest()
    calls = []

    def cut_short(request, timeout):
        calls.append(request.full_url)
        return _CutShort(payload)

    monkeypatch.setattr(dl.urllib.request, "urlopen", cut_short)
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    url = "https://example.org/file.bin"
    with pytest.raises(dl.DownloadError, match="interrupted") as error:
        dl.download(url, tmp_path / "file.bin", sha)
    assert url in str(error.value) and len(calls) == 3
    assert list(tmp_path.iterdir()) == []

    class Once:  # cut short once, then whole
        n = 0

        def __call__(self, request, timeout):
            self.n += 1
            if self.n == 1:
                return _CutShort(payload)
            return io.BytesIO(payload)

    monkeypatch.setattr(dl.urllib.request, "urlopen", Once())
    assert dl.download(url, tmp_path / "file.bin", sha).read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


# --------------------------------------------------------------------------
# An http:// mirror


@pytest.fixture
def http_mirror(upstream: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(upstream))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_mirror(home: Path, http_mirror: str, shared: Path):
    weights = sources.fetch_weights(base_url=http_mirror)
    for file in ("state.pt", "model.json"):
        assert (weights / file).read_bytes() == (shared / "weights" / MODEL / file).read_bytes()
    with pytest.raises(dl.DownloadError, match="HTTP 404") as error:
        dl.download(f"{http_mirror}/nothing/here.pt", home / "x.pt", "0" * 64)
    assert f"{http_mirror}/nothing/here.pt" in str(error.value)
    assert not (home / "x.pt").exists()


# --------------------------------------------------------------------------
# URLs, the restricted unpickler, the command line


def test_default_urls_are_github_at_pinned_commits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(paths.BASE_URL_ENV, raising=False)
    assert dl.resolve_base_url() is None
    assert dl.published_weights_urls(MODEL)["state.pt"] == (
        "https://raw.githubusercontent.com/materialsvirtuallab/matgl/e9cde2291acd0b4c4a342428e7dd5e4d596b7bf9/"
        f"pretrained_models/{MODEL}/state.pt"
    )
    assert sources.CRABNET_AGL_TABLES[0].url() == (
        "https://raw.githubusercontent.com/anthony-wang/CrabNet/457b4d4835737ecbe4dd33e53174bd818bd82143/"
        "data/benchmark_data/aflow__agl_thermal_conductivity_300K/train.csv"
    )
    assert sources.TOGO15_PICKLE.url("https://mirror.example/up/") == (
        "https://mirror.example/up/ParAIsite/main/src/structures_scalers/Dataset1.pkl"
    )
    with pytest.raises(ValueError, match="no published weights"):
        dl.published_weights_urls("MEGNet-nope")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_unpickler_refuses_other_classes(tmp_path: Path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        sources.load_pickle(path)


def test_help_explains(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit:
        data.main(["fetch", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "--base-url" in text and "--dataset" in text and "--force" in text


def test_command_line_on_a_fresh_machine(upstream: Path, tmp_path: Path):
    """The README's command, in a new process with no cache and no ../shared in sight."""
    env = {k: v for k, v in os.environ.items() if k not in ("PARAISITE_HOME", paths.BASE_URL_ENV)}
    env.update(PARAISITE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    fetch = subprocess.run(
        [sys.executable, "-m", "paraisite.data", "fetch", "--dataset", "togo15", "--base-url", str(upstream)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert fetch.returncode == 0, fetch.stderr
    assert f"togo15: {tmp_path / 'cache' / 'data' / 'togo15'}" in fetch.stdout
    assert f"weights: {tmp_path / 'cache' / 'weights' / MODEL}" in fetch.stdout


def test_command_line_info_and_errors(home: Path, upstream: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert data.main(["fetch", "--dataset", "togo15", "--no-weights", "--base-url", str(upstream)]) == 0
    assert data.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "togo15: 95 rows" in out and "miyazaki21: not fetched" in out and f"weights {MODEL}: not fetched" in out
    assert data.main(["fetch", "--dataset", "miyazaki21", "--base-url", str(tmp_path / "nowhere")]) == 1
    assert "error: cannot download" in capsys.readouterr().err


def test_every_entry_point_takes_the_base_url_the_advice_names(home: Path, upstream: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """The offline advice says "pass --base-url": train.py, scan.py and megnet_pt.predict take it, and it is used."""
    root = Path(__file__).resolve().parents[1]
    assert "--base-url" in paths.download_advice() and "--base-url" in dl.default_advice()
    for cmd in (["train.py"], ["scan.py"], ["-m", "megnet_pt.predict"], ["-m", "paraisite.data", "fetch"]):
        text = subprocess.run([sys.executable, *cmd, "--help"], cwd=root, capture_output=True, text=True).stdout
        assert "--base-url" in text, cmd
    sys.path.insert(0, str(root))
    import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--init", "rw", "--dataset", "togo15", "--epochs", "1", "--splits", "1", "--no-progress",
                       "--base-url", str(upstream)]) == 0
    assert len(read_labels(home / "data" / "togo15")) - 1 == ROWS["togo15"]  # fetched from the mirror
