"""Reference band gaps of the published multi-fidelity MEGNet, computed with upstream's own stack.

    upstream/bin/python scripts/make_bandgap_reference.py $PARAISITE_HOME -o tests/data/megnet_bandgap_reference.jsonl

Run with the interpreter of a virtual environment holding upstream ParAIsite's stack (matgl 1.2.1 + DGL 2.1 on
torch 2.2, as ``benchmarks/bench_peers.py`` makes it: ``python -m venv upstream && upstream/bin/pip install
torch==2.2.0 dgl==2.1.0 matgl==1.2.1 "numpy<2" "pymatgen<2025"``); it imports nothing of this project. For each of
the 536 structures of ``reference/megnet_eform_reference.jsonl`` (Togo15, Miyazaki2021, AFLOW AGL), it writes one
JSON line: the set, id, atoms and edges of matgl's own graph at the model's cutoff, and the band gap (eV) at each
of the four fidelities (state 0 PBE, 1 GLLB-SC, 2 HSE, 3 SCAN), as matgl's ``MEGNet.predict_structure`` gives it,
times the model.json normaliser's std plus its mean (what matgl's ``TransformedTargetModel`` does):
``band_gap_ev`` in float32 as matgl runs by default, ``band_gap_ev_float64`` with ``matgl.set_default_dtype("float",
64)``, so that a parity test can tell a real difference from float32 rounding. Each precision runs in a process of
its own (``--precision``), since matgl fixes its dtype when it builds graphs.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

NAME = "MEGNet-MP-2019.4.1-BandGap-mfi"
FIDELITIES = ("pbe", "gllb-sc", "hse", "scan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shared", type=Path, help="the shared folder: data/, reference/, upstream/matgl/")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--precision", type=int, choices=(32, 64), default=None, help="one precision only (internal)")
    args = p.parse_args()
    if args.precision is None:
        with tempfile.TemporaryDirectory() as tmp:
            parts = {}
            for bits in (32, 64):
                part = Path(tmp) / f"{bits}.jsonl"
                subprocess.run([sys.executable, __file__, str(args.shared), "-o", str(part), "--precision", str(bits)],
                               check=True)
                parts[bits] = [json.loads(line) for line in open(part)]
        with open(args.output, "w") as out:
            for row, row64 in zip(parts[32], parts[64]):
                assert (row["id"], row["n_edges"]) == (row64["id"], row64["n_edges"])
                out.write(json.dumps(row | {"band_gap_ev_float64": row64["band_gap_ev"]}) + "\n")
        print(f"wrote {args.output}: {len(parts[32])} structures, float32 and float64")
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import matgl

    if args.precision == 64:
        matgl.set_default_dtype("float", 64)
    from matgl.ext.pymatgen import Structure2Graph
    from matgl.models import MEGNet
    from pymatgen.core import Structure

    folder = args.shared / "upstream" / "matgl" / "pretrained_models" / NAME
    meta = json.loads((folder / "model.json").read_text())
    init = meta["kwargs"]["model"]["init_args"]
    mean, std = map(float, re.search(r"Mean\s*=\s*([-0-9.eE]+).*Std:\s*([-0-9.eE]+)",
                                     meta["kwargs"]["target_transformer"]).groups())
    model = MEGNet(**init)
    state = torch.load(folder / "state.pt", map_location="cpu")
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.to(torch.get_default_dtype())
    model.eval()
    converter = Structure2Graph(element_types=model.element_types, cutoff=model.cutoff)
    rows = [json.loads(line) for line in open(args.shared / "reference" / "megnet_eform_reference.jsonl")]
    with open(args.output, "w") as out:
        for r in rows:
            structure = Structure.from_file(args.shared / "data" / r["set"] / "cif" / f"{r['id']}.cif")
            graph, _, _ = converter.get_graph(structure)
            gaps = {name: float(model.predict_structure(structure, state_attr=torch.tensor([k]))) * std + mean
                    for k, name in enumerate(FIDELITIES)}
            out.write(json.dumps({"set": r["set"], "id": r["id"], "n_atoms": int(graph.num_nodes()),
                                  "n_edges": int(graph.num_edges()), "band_gap_ev": gaps}) + "\n")
    print(f"wrote {args.output}: {len(rows)} structures, matgl {matgl.__version__}, torch {torch.__version__}, "
          f"cutoff {model.cutoff} Å, {torch.get_default_dtype()}")


if __name__ == "__main__":
    main()
