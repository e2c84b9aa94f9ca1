"""Predict formation energies of crystal structures with a (published) MEGNet model.

    python -m megnet_pt.predict <CIF files or folders> -o out.csv \
        [--model NAME|CHECKPOINT|FOLDER] [--batch-size N] [--device auto|cpu|cuda]

Writes ``id,formula,n_atoms,n_edges,eform_ev_per_atom,warning``, one row per
input file, in input order. A file that cannot be predicted (unknown element,
partial occupancy, malformed CIF, ...) keeps its row with an empty prediction
and the reason in ``warning``; the others go on.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch_geometric.data import Batch, Data
from tqdm import tqdm

from .download import use_base_url
from .graph import StructureError, isolated_atoms, reduced_formula, structure_to_graph
from .model import MEGNet
from .structures import StructureEntry, StructureInputs, collect_structures, structure_id

COLUMNS = ["id", "formula", "n_atoms", "n_edges", "eform_ev_per_atom", "warning"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def graph_warning(data: Data, cutoff: float) -> str:
    """A note for a graph whose atoms lack neighbours within the cutoff (the published model gives NaN there)."""
    return isolated_warning(int(isolated_atoms(data)[0]), data.num_nodes, cutoff)


def isolated_warning(lonely: int, n_atoms: int, cutoff: float) -> str:
    return f"{lonely} of {n_atoms} atoms have no neighbour within {cutoff:g} Å" if lonely else ""


@torch.no_grad()
def predict_graphs(model: MEGNet, graphs: Sequence[Data], device: torch.device | str = "cpu"):
    """Run ``model`` on a list of graphs as one batch; returns the ``MEGNetOutput`` on the CPU."""
    batch = Batch.from_data_list(list(graphs)).to(device)
    out = model(batch)
    return type(out)(*(t.cpu() for t in out))


def predict_files(
    files: Iterable[str | Path | StructureEntry], model: MEGNet, batch_size: int = 64,
    device: torch.device | str = "cpu", progress: bool = True,
) -> Iterable[dict]:
    """Yield one result row per structure file (or listed entry), in order (see ``COLUMNS``)."""
    entries = [f if isinstance(f, StructureEntry) else StructureEntry(structure_id(f), Path(f)) for f in files]
    model = model.to(device).eval()
    cutoff = model.config.cutoff
    bar = tqdm(total=len(entries), unit="structure", disable=not progress or len(entries) < 100)
    for start in range(0, len(entries), batch_size):
        rows, graphs, slots = [], [], []
        for entry in entries[start : start + batch_size]:
            row = dict.fromkeys(COLUMNS, "")
            row["id"] = entry.id
            try:
                structure = entry.load()
                row["formula"] = reduced_formula(structure)
                g = structure_to_graph(structure, cutoff=cutoff, id=row["id"])
                row.update(n_atoms=g.num_nodes, n_edges=g.num_edges, warning=graph_warning(g, cutoff))
                slots.append(len(rows))
                graphs.append(g)
            except (StructureError, ValueError, TypeError) as exc:
                row["warning"] = f"error: {exc}"
            rows.append(row)
        if graphs:
            pred = predict_graphs(model, graphs, device).prediction
            for i, value in zip(slots, pred.tolist()):
                rows[i]["eform_ev_per_atom"] = f"{value:.6f}"
        bar.update(len(rows))
        yield from rows
    bar.close()


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def check_output_file(path: Path) -> None:
    """Refuse, before any work, an output that cannot be written: a folder, or a file in a folder that does not exist."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the name of a file to write")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")


def check_unique_ids(listed: StructureInputs) -> None:
    """Two structures that would write rows with the same id (e.g. a.cif in two folders) are an error naming both."""
    if listed.duplicates_message():
        raise ValueError(f"{listed.duplicates_message()}: each would have two rows; rename the files or predict the "
                         "folders one at a time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megnet_pt.predict",
        description="Predict the formation energy (eV/atom) of crystal structures with MEGNet. "
        "Writes id,formula,n_atoms,n_edges,eform_ev_per_atom,warning; files that fail keep their row with the reason.",
    )
    parser.add_argument("inputs", nargs="+", help="what python -m megnet_pt.cache build reads: CIF files or folders "
                        "(searched for *.cif), dataset folders, pymatgen JSON (structures or Materials Project records), "
                        "extended XYZ")
    parser.add_argument("-o", "--output", default="-", help="CSV to write (default: standard output)")
    parser.add_argument("--model", default="MEGNet-MP-2018.6.1-Eform",
                        help="a published model name (found or converted via MEGNET_PT_HOME), a converted checkpoint (.pt), "
                        "or a folder with state.pt and model.json (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="structures per batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--base-url", default=None, metavar="URL",
                        help="download the published weights from this mirror (a URL or folder laid out as "
                        "<base>/matgl/<path>; default: $MEGNET_PT_BASE_URL, else GitHub)")
    args = parser.parse_args(argv)
    use_base_url(args.base_url)

    from .checkpoint import CheckpointError
    from .pretrained import load_model

    try:
        if args.output != "-":
            check_output_file(Path(args.output))
        listed = collect_structures(args.inputs)
        check_unique_ids(listed)
        files = listed.entries
        if not files:
            raise ValueError(f"{', '.join(map(str, args.inputs))}: the inputs hold no structures")
        device = resolve_device(args.device)
        model = load_model(args.model)
    except (FileNotFoundError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
    failed = 0
    try:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in predict_files(files, model, args.batch_size, device):
            writer.writerow(row)
            if row["warning"].startswith("error:"):
                failed += 1
                print(f"{row['id']}: {row['warning']}", file=sys.stderr)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"predicted {len(files) - failed} of {len(files)} structures"
          + (f"; {failed} failed (listed above, rows kept with the reason)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
