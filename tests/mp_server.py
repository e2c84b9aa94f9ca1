"""A local server that answers as the Materials Project API (``/heartbeat``, ``/materials/summary/``), for the real
mp-api client: a JSON ``{"data": [...], "meta": {"total_doc": n}}``, paged by ``_limit`` / ``_skip``, projected by
``_fields``, filtered by ``is_stable`` and ``material_ids``, the key checked in the ``x-api-key`` header."""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

from pymatgen.core import Lattice, Structure

KEY = "k" * 32


def material(k: int) -> dict[str, Any]:
    a = 4.0 + 0.1 * k
    structure = Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return {"material_id": f"mp-{100 + k}", "structure": structure.as_dict(), "formula_pretty": "NaCl",
            "energy_per_atom": -3.0 - k, "formation_energy_per_atom": -1.0 - 0.1 * k, "band_gap": 0.5 * k,
            "is_gap_direct": k % 2 == 0, "is_stable": k != 3, "theoretical": k > 4, "nsites": 2,
            "volume": a**3, "density": 2.0 + k, "density_atomic": a**3 / 2, "nelements": 2,
            "uncorrected_energy_per_atom": -2.9 - k, "energy_above_hull": 0.0 if k != 3 else 0.2}


class FakeMP:
    """The documents, and what was asked of them."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.requests: list[dict[str, str]] = []
        self.served: list[list[str]] = []  # the ids of each page of structures answered
        self.fail_after: int | None = None  # answer 500 to every summary request after this many

    def answer(self, path: str, query: dict[str, str], key: str | None) -> tuple[int, Any]:
        if path.rstrip("/") == "/heartbeat":
            return 200, {"db_version": "2025.09.25", "access_controlled_batch_ids": [], "version": "0.87.3"}
        if path.rstrip("/") != "/materials/summary":
            return 404, {"detail": "Not Found"}
        if key != KEY:
            return 401, {"detail": "Invalid authentication credentials"}
        self.requests.append(query)
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            return 500, {"detail": "Internal Server Error"}
        docs = self.docs
        if "is_stable" in query:
            docs = [d for d in docs if str(d["is_stable"]).lower() == query["is_stable"].lower()]
        if "material_ids" in query:
            wanted = set(query["material_ids"].split(","))
            docs = [d for d in docs if d["material_id"] in wanted]
        skip, limit = int(query.get("_skip", 0)), int(query.get("_limit", 1000))
        fields = query.get("_fields", "").split(",") if query.get("_fields") else None
        page = [{f: d.get(f) for f in fields} if fields else d for d in docs[skip : skip + limit]]
        if "material_ids" in query:
            self.served.append([d["material_id"] for d in page])
        return 200, {"data": page, "meta": {"total_doc": len(docs), "max_limit": 1000}}


@contextlib.contextmanager
def serve(fake: FakeMP) -> Iterator[str]:
    """``fake`` served on 127.0.0.1 from a thread of this process; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            status, body = fake.answer(url.path, query, self.headers.get("x-api-key"))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
