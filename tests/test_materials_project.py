"""``cache build --from-mp``: the real mp-api client against a local server that answers as the Materials Project API.

The server (127.0.0.1, a thread of this process) serves ``/heartbeat`` and
``/materials/summary/`` with the shapes of the API's documentation: a JSON
``{"data": [...], "meta": {"total_doc": n}}``, paged by ``_limit`` / ``_skip``,
projected by ``_fields``, filtered by ``is_stable`` and ``material_ids``, the
key checked in the ``x-api-key`` header. No test reaches the internet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("mp_api.client", reason="the Materials Project client is optional (pip install mp-api, in .[test])")


from mp_server import KEY, FakeMP, material, serve  # noqa: E402

from megnet_pt.cache import GraphCache  # noqa: E402
from megnet_pt.cache.cli import main as cache_main  # noqa: E402
from megnet_pt.materials_project import MaterialsProjectError, download, parse_query  # noqa: E402

@pytest.fixture()
def server() -> Iterator[tuple[FakeMP, str]]:
    fake = FakeMP([material(k) for k in range(7)])
    with serve(fake) as url:
        yield fake, url


def structure_requests(fake: FakeMP) -> list[list[str]]:
    return [q["material_ids"].split(",") for q in fake.requests if "material_ids" in q]


def test_query_parsing() -> None:
    q = parse_query(["is_stable=true energy_above_hull=0,0.05", "elements=Si,O", "num_elements=2", "chemsys=Li-Fe-O"])
    assert q == {"is_stable": True, "energy_above_hull": (0.0, 0.05), "elements": ["Si", "O"], "num_elements": 2,
                 "chemsys": "Li-Fe-O"}
    assert parse_query("material_ids=mp-149,mp-13 band_gap=1")["material_ids"] == ["mp-149", "mp-13"]
    assert parse_query("band_gap=1")["band_gap"] == (1.0, 1.0)
    for bad, says in (("is_stable=maybe", "true or false"), ("stable=true", "not a criterion"),
                      ("is_stable", "name=value"), ("band_gap=1,2,3", "min,max"), ("theoretical=1 theoretical=0", "twice")):
        with pytest.raises(MaterialsProjectError, match=says):
            parse_query(bad)


def test_download_pages_fields_and_cache(server: tuple[FakeMP, str], tmp_path: Path, capsys: Any) -> None:
    fake, url = server
    out = tmp_path / "mp_stable.h5"
    rc = cache_main(["build", "--from-mp", "is_stable=true", "-o", str(out), "--api-key", KEY, "--mp-endpoint", url,
                     "--quiet"])
    assert rc == 0, capsys.readouterr().err
    stable = [d for d in fake.docs if d["is_stable"]]
    # ids first (fields=material_id), then one request per page of structures
    assert fake.requests[0]["_fields"] == "material_id" and fake.requests[0]["is_stable"].lower() == "true"
    assert sorted(i for page in structure_requests(fake) for i in page) == sorted(d["material_id"] for d in stable)
    cache = GraphCache(out)
    assert cache.ids == [d["material_id"] for d in stable] and not cache.failures
    for name in ("band_gap", "energy_above_hull", "density_atomic", "is_stable", "is_gap_direct", "theoretical"):
        assert name in cache.label_names
        expected = [float(d[name]) for d in stable]  # booleans as 1.0 / 0.0
        np.testing.assert_array_equal(cache.labels[:, cache.label_names.index(name)], expected)
    assert "formula_pretty" not in cache.label_names  # text fields are not labels
    info = capsys.readouterr()
    assert KEY not in info.out + info.err
    assert not any(KEY in p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file())
    assert cache_main(["info", str(out)]) == 0
    assert "field band_gap" in capsys.readouterr().out


def test_download_resumes_without_fetching_twice(server: tuple[FakeMP, str], tmp_path: Path) -> None:
    fake, url = server
    folder = tmp_path / "mp.h5.mp"
    fake.fail_after = 3  # the id query, two pages of structures, then the server fails
    with pytest.raises(MaterialsProjectError, match="500"):
        download(["is_stable=true"], folder, api_key=KEY, endpoint=url, page_size=2, progress=False)
    assert len(list(folder.glob("page-*.json.gz"))) == 2 and not list(folder.glob("*.tmp"))
    assert len(fake.served) == 2
    fake.fail_after = None
    pages = download(["is_stable=true"], folder, api_key=KEY, endpoint=url, page_size=2, progress=False)
    stable = [d["material_id"] for d in fake.docs if d["is_stable"]]
    assert sorted(i for page in fake.served for i in page) == sorted(stable)  # each id served once, over the two runs
    assert sum("material_ids" not in q for q in fake.requests) == 1  # the ids were asked for once
    assert len(pages) == 3
    records = [r for p in pages for r in json.loads(__import__("gzip").open(p).read())]
    assert [r["material_id"] for r in records] == stable
    with pytest.raises(MaterialsProjectError, match="another query"):
        download(["is_stable=false"], folder, api_key=KEY, endpoint=url, progress=False)


def test_missing_or_wrong_key(server: tuple[FakeMP, str], tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    _, url = server
    monkeypatch.delenv("MP_API_KEY", raising=False)
    from pymatgen.core import SETTINGS

    monkeypatch.setitem(SETTINGS, "PMG_MAPI_KEY", None)
    with pytest.raises(MaterialsProjectError, match="no Materials Project API key: set MP_API_KEY"):
        download(["is_stable=true"], tmp_path / "a", endpoint=url, progress=False)
    wrong = "w" * 32
    with pytest.raises(MaterialsProjectError, match="refused the API key") as error:
        download(["is_stable=true"], tmp_path / "b", api_key=wrong, endpoint=url, progress=False)
    assert wrong not in str(error.value)
    with pytest.raises(MaterialsProjectError, match="32 characters"):
        download(["is_stable=true"], tmp_path / "c", api_key="short", endpoint=url, progress=False)
    monkeypatch.setenv("MP_API_KEY", wrong)
    assert cache_main(["build", "--from-mp", "is_stable=true", "-o", str(tmp_path / "d.h5"), "--mp-endpoint", url]) == 2
    err = capsys.readouterr().err
    assert "refused the API key" in err and wrong not in err and "Traceback" not in err
    assert not (tmp_path / "d.h5").exists()


def test_empty_result(server: tuple[FakeMP, str], tmp_path: Path, capsys: Any) -> None:
    fake, url = server
    fake.docs = [d for d in fake.docs if d["is_stable"]]
    rc = cache_main(["build", "--from-mp", "is_stable=false", "-o", str(tmp_path / "none.h5"), "--api-key", KEY,
                     "--mp-endpoint", url, "--quiet"])
    assert rc == 2 and "matches no material" in capsys.readouterr().err
    assert not (tmp_path / "none.h5").exists() and not (tmp_path / "none.h5.mp").exists()


def test_record_without_structure_is_listed(server: tuple[FakeMP, str], tmp_path: Path) -> None:
    fake, url = server
    fake.docs[1]["structure"] = None
    out = tmp_path / "some.h5"
    assert cache_main(["build", "--from-mp", "is_stable=true", "-o", str(out), "--api-key", KEY, "--mp-endpoint", url,
                       "--quiet"]) == 0
    cache = GraphCache(out)
    assert [i for i, _ in cache.failures] == ["mp-101"] and "no structure" in cache.failures[0][1]
    assert "mp-101" not in cache.ids and len(cache) == sum(d["is_stable"] for d in fake.docs) - 1
