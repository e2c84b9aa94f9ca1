"""Structures and their fields from the Materials Project, through its official client (``mp-api``).

    python -m megnet_pt.cache build --from-mp "is_stable=true" -o mp_stable.h5

A query is any criterion of the client's ``MPRester().materials.summary.search``
written ``name=value``: booleans ``is_stable=true``, ranges
``energy_above_hull=0,0.05`` (min,max; one number means exactly it), lists
``elements=Si,O`` / ``material_ids=mp-149,mp-13``, chemical systems
``chemsys=Li-Fe-O``. The download has two steps, and resumes after an
interruption without fetching anything twice:

1. the material ids the query matches (one paged query for the ids alone),
   saved with the query in ``<folder>/query.json``;
2. their structures and fields, ``page_size`` ids a request, each page written
   whole to ``<folder>/page-NNNNN.json.gz`` (under a temporary name, then
   renamed): a page on disk is complete, and a re-run fetches only the others.

A page is a JSON list of ``{"material_id", "structure", <fields>...}`` records
(structures as ``Structure.as_dict()``), which ``megnet_pt.cache`` reads like
any JSON input: the numeric and boolean fields become the cache's labels. An id
the server returns without a structure keeps a record with ``"structure":
null`` and a reason, listed among the cache's failures; the others go on.

The API key comes from ``api_key`` or the ``MP_API_KEY`` environment variable
(pymatgen's ``PMG_MAPI_KEY`` setting too); it is never written to disk or printed.
"""
from __future__ import annotations

import gzip
import json
import os
import types
import typing
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

# The fields of each material the paper correlates the predictions with (Tables 1-4), and its distance to the hull.
PAPER_FIELDS = ("energy_per_atom", "formation_energy_per_atom", "band_gap", "is_gap_direct", "is_stable", "theoretical",
                "nsites", "volume", "density", "density_atomic", "nelements", "uncorrected_energy_per_atom",
                "energy_above_hull")
PAGE_SIZE = 500  # ids per request for structures: well under the server's limit of 1000 documents
ID_CHUNK = 1000
MANIFEST = "query.json"
FORMAT = "megnet_pt Materials Project download"
NOT_CRITERIA = {"self", "return", "num_chunks", "chunk_size", "all_fields", "fields", "_page", "_sort_fields", "kwargs"}
KEY_HELP = "https://next-gen.materialsproject.org/api"


class MaterialsProjectError(ValueError):
    """A query, key, server answer or download folder that cannot be used; the message says which and why."""


def _client_module() -> Any:
    try:
        import mp_api.client
    except ImportError as exc:
        raise MaterialsProjectError(
            f"reading from the Materials Project needs its client: pip install mp-api ({exc})") from None
    return mp_api.client


def search_criteria() -> dict[str, Any]:
    """The criteria of the installed client's summary search, with their type hints."""
    from mp_api.client.routes.materials.summary import SummaryRester

    hints = typing.get_type_hints(SummaryRester.search)
    return {k: v for k, v in hints.items() if k not in NOT_CRITERIA}


def parse_query(text: Sequence[str] | str) -> dict[str, Any]:
    """``["is_stable=true energy_above_hull=0,0.05"]`` -> keyword arguments of the client's summary search."""
    _client_module()
    criteria = search_criteria()
    tokens = [t for item in ([text] if isinstance(text, str) else text) for t in item.split()]
    query: dict[str, Any] = {}
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or not name or not value:
            raise MaterialsProjectError(f"{token!r}: a criterion is name=value (e.g. is_stable=true, "
                                        "energy_above_hull=0,0.05, elements=Si,O)")
        if name not in criteria:
            raise MaterialsProjectError(f"{name!r} is not a criterion of the Materials Project summary search; "
                                        f"the client knows: {', '.join(sorted(criteria))}")
        if name in query:
            raise MaterialsProjectError(f"{name!r} is given twice")
        query[name] = _value(name, value, criteria[name])
    return query


def _value(name: str, text: str, hint: Any) -> Any:
    kinds = [k for k in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
             if k is not type(None)]
    # "a,b" is a range or a list; a single value a scalar first (a range min=max, or a list of one, otherwise)
    kinds.sort(key=lambda k: (typing.get_origin(k) in (tuple, list)) != ("," in text))
    for kind in kinds:
        try:
            return _convert(text, kind)
        except (TypeError, ValueError):
            continue
    raise MaterialsProjectError(f"{name}={text}: expected {_describe(kinds)}")


def _convert(text: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        element = typing.get_args(kind)[0]
        parts = text.split(",")
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError(text)
        return tuple(_scalar(p, element) for p in parts)
    if origin is list:
        return [_scalar(p, typing.get_args(kind)[0]) for p in text.split(",")]
    return _scalar(text, kind)


def _scalar(text: str, kind: Any) -> Any:
    if "," in text:
        raise ValueError(text)
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(text)
    if kind in (int, float, str):
        return kind(text)
    raise TypeError(kind)


def _describe(kinds: list[Any]) -> str:
    names = []
    for k in kinds:
        origin = typing.get_origin(k)
        if origin is tuple:
            names.append("min,max")
        elif origin is list:
            names.append("a comma-separated list")
        elif k is bool:
            names.append("true or false")
        elif isinstance(k, type) and issubclass(k, Enum):
            names.append("one of " + ", ".join(str(m.value) for m in k))
        else:
            names.append(getattr(k, "__name__", str(k)))
    return " or ".join(dict.fromkeys(names))


def api_key_from(given: str | None) -> str:
    """The key to use: ``given``, else ``MP_API_KEY``, else pymatgen's ``PMG_MAPI_KEY`` setting."""
    key = given or os.environ.get("MP_API_KEY")
    if not key:
        from pymatgen.core import SETTINGS

        key = SETTINGS.get("PMG_MAPI_KEY")
    if not key:
        raise MaterialsProjectError(f"no Materials Project API key: set MP_API_KEY (your key is on {KEY_HELP}) "
                                    "or pass --api-key")
    return key


@contextmanager
def _rester(api_key: str, endpoint: str | None) -> Iterator[Any]:
    """An ``MPRester``; the client's errors become ``MaterialsProjectError``, with the key never in a message."""
    client = _client_module()
    import requests
    from mp_api.client.core.client import MPRestError

    def clean(exc: BaseException) -> str:
        text = str(exc).replace(api_key, "<key>").strip()
        if any(code in text for code in ("status code 401", "status code 403")):
            return (f"the Materials Project refused the API key (check MP_API_KEY or --api-key; your key is on {KEY_HELP}): "
                    + text.splitlines()[-1])
        if "32 characters" in text:
            return f"the API key is not a Materials Project key (they have 32 characters; yours is on {KEY_HELP})"
        return text

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the client's notices (versions, deprecations) are not the user's concern
            rester = client.MPRester(api_key=api_key, endpoint=endpoint, use_document_model=False, mute_progress_bars=True)
        with rester:
            yield rester
    except MPRestError as exc:
        raise MaterialsProjectError(clean(exc)) from None
    except requests.exceptions.RequestException as exc:  # no connection, timeouts
        where = endpoint or "the Materials Project"
        raise MaterialsProjectError(f"cannot reach {where}: {clean(exc)}") from None


def _read_json(path: Path) -> Any:
    try:
        with gzip.open(path, "rt") if path.name.endswith(".gz") else open(path) as f:
            return json.load(f)
    except (OSError, ValueError, EOFError) as exc:
        raise MaterialsProjectError(f"{path}: damaged ({type(exc).__name__}: {exc}); delete it and re-run to fetch "
                                    "it again") from None


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") if path.name.endswith(".gz") else open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """A JSON value: structures as dicts, enums as their values, ids as strings."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def download(
    query_text: Sequence[str] | str,
    folder: str | Path,
    fields: Sequence[str] = PAPER_FIELDS,
    api_key: str | None = None,
    endpoint: str | None = None,
    page_size: int = PAGE_SIZE,
    progress: bool = True,
) -> list[Path]:
    """Fetch the structures and ``fields`` of the materials matching the query into ``folder``; the page files.

    Resumes a download of the same query and fields in ``folder``; a folder
    holding another query is refused. ``endpoint`` defaults to the client's
    (the ``MP_API_ENDPOINT`` environment variable, else the official server).
    """
    folder = Path(folder)
    query = parse_query(query_text)
    fields = list(dict.fromkeys(f for f in fields if f not in ("material_id", "structure")))
    wanted = {"query": {k: _plain(v) for k, v in sorted(query.items())}, "fields": fields}
    key = api_key_from(api_key)
    manifest_path = folder / MANIFEST
    manifest = _read_json(manifest_path) if manifest_path.is_file() else None
    if manifest is not None and {k: manifest.get(k) for k in wanted} != wanted:
        raise MaterialsProjectError(f"{folder}: holds the download of another query ({manifest.get('query')}, fields "
                                    f"{manifest.get('fields')}); delete it to start again, or write to another -o")
    with _rester(key, endpoint) as rester:
        summary = rester.materials.summary
        if manifest is None:
            docs = summary.search(**query, fields=["material_id"], chunk_size=ID_CHUNK)
            ids = list(dict.fromkeys(str(d["material_id"]) for d in docs))  # a page served twice adds nothing
            if not ids:
                raise MaterialsProjectError(f"the query {' '.join(f'{k}={v}' for k, v in wanted['query'].items())} "
                                            "matches no material of the Materials Project")
            manifest = {"format": FORMAT, "version": 1, **wanted, "page_size": page_size, "ids": ids,
                        "db_version": getattr(rester, "db_version", ""), "endpoint": endpoint or "",
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(manifest_path, manifest)
        ids, size = manifest["ids"], int(manifest["page_size"])
        pages = [ids[a : a + size] for a in range(0, len(ids), size)]
        paths = [folder / f"page-{k:05d}.json.gz" for k in range(len(pages))]
        bar = tqdm(total=len(ids), unit="structure", desc=f"Materials Project -> {folder.name}", disable=not progress)
        for page_ids, path in zip(pages, paths):
            if path.is_file():
                records = _read_json(path)
                if not isinstance(records, list) or [r.get("material_id") for r in records] != page_ids:
                    raise MaterialsProjectError(f"{path}: not the page of these ids; delete it and re-run to fetch it again")
            else:
                docs = summary.search(material_ids=page_ids, fields=["material_id", "structure", *fields],
                                      chunk_size=len(page_ids))
                found = {str(d["material_id"]): d for d in docs}
                records = []
                for sid in page_ids:
                    doc = found.get(sid)
                    if doc is None:
                        records.append({"material_id": sid, "structure": None,
                                        "reason": "the Materials Project returned no record for this id"})
                        continue
                    record = {"material_id": sid, "structure": _plain(doc.get("structure"))}
                    if record["structure"] is None:
                        record["reason"] = "the Materials Project record has no structure"
                    records.append(record | {f: _plain(doc.get(f)) for f in fields})
                _write_json(path, records)
            bar.update(len(page_ids))
        bar.close()
    return paths
