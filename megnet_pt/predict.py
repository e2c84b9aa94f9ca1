"""Predict formation energies (or band gaps) of crystal structures with a (published) MEGNet model.

    python -m megnet_pt.predict <CIF files or folders> -o out.csv \
        [--model NAME|CHECKPOINT|FOLDER] [--fidelity pbe|gllb-sc|hse|scan] [--batch-size N] [--device auto|cpu|cuda]

Writes ``id,formula,n_atoms,n_edges,<target>,warning``, one row per input file,
in input order; ``<target>`` is ``eform_ev_per_atom`` for the formation-energy
model, ``band_gap_ev`` for ``MEGNet-MP-2019.4.1-BandGap-mfi`` (at ``--fidelity``,
default PBE). A file that cannot be predicted (unknown element,
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

COLUMNS = ["id", "formula", "n_atoms", "n_edges", "eform_ev_per_atom", "warning"]  # of the formation-energy model


def columns(model: MEGNet) -> list[str]:
    """The CSV columns of ``model``'s predictions: :data:`COLUMNS` with its target in the middle."""
    return [*COLUMNS[:4], model.config.target_name, COLUMNS[-1]]


def state_index(model: MEGNet, fidelity: str | int | None) -> int | None:
    """The integer state of ``fidelity`` (a name in ``model.config.state_names`` or an index); None for a model
    without states, 0 (PBE for the band-gap model) when none is given."""
    names = model.config.state_names
    if not model.config.num_state_types:
        if fidelity is not None:
            raise ValueError(f"--fidelity {fidelity}: this model ({model.config.target_name}) has no fidelities")
        return None
    if fidelity is None:
        return 0
    if isinstance(fidelity, int) or str(fidelity).isdigit():
        k = int(fidelity)
        if 0 <= k < model.config.num_state_types:
            return k
    elif str(fidelity).lower() in names:
        return names.index(str(fidelity).lower())
    raise ValueError(f"--fidelity {fidelity}: expected one of {', '.join(names)} (or 0..{model.config.num_state_types - 1})")


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
def predict_graphs(model: MEGNet, graphs: Sequence[Data], device: torch.device | str = "cpu", state: int | None = None):
    """Run ``model`` on a list of graphs as one batch (``state``: the same integer state for all, e.g. a
    fidelity); returns the ``MEGNetOutput`` on the CPU."""
    batch = Batch.from_data_list(list(graphs)).to(device)
    out = model(batch, state)
    return type(out)(*(t.cpu() for t in out))


def predict_files(
    files: Iterable[str | Path | StructureEntry], model: MEGNet, batch_size: int = 64,
    device: torch.device | str = "cpu", progress: bool = True, state: int | None = None,
) -> Iterable[dict]:
    """Yield one result row per structure file (or listed entry), in order (see :func:`columns`)."""
    entries = [f if isinstance(f, StructureEntry) else StructureEntry(structure_id(f), Path(f)) for f in files]
    model = model.to(device).eval()
    cutoff, target = model.config.cutoff, model.config.target_name
    bar = tqdm(total=len(entries), unit="structure", disable=not progress or len(entries) < 100)
    for start in range(0, len(entries), batch_size):
        rows, graphs, slots = [], [], []
        for entry in entries[start : start + batch_size]:
            row = dict.fromkeys(columns(model), "")
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
            pred = predict_graphs(model, graphs, device, state).prediction
            for i, value in zip(slots, pred.tolist()):
                rows[i][target] = f"{value:.6f}"
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
        description="Predict the formation energy (eV/atom), or with the band-gap model the band gap (eV), of crystal "
        "structures with MEGNet. Writes id,formula,n_atoms,n_edges,eform_ev_per_atom (or band_gap_ev),warning; "
        "files that fail keep their row with the reason.",
    )
    parser.add_argument("inputs", nargs="+", help="what python -m megnet_pt.cache build reads: CIF files or folders "
                        "(searched for *.cif), dataset folders, pymatgen JSON (structures or Materials Project records), "
                        "extended XYZ")
    parser.add_argument("-o", "--output", default="-", help="CSV to write (default: standard output)")
    parser.add_argument("--model", default="MEGNet-MP-2018.6.1-Eform",
                        help="a published model name (MEGNet-MP-2018.6.1-Eform, MEGNet-MP-2019.4.1-BandGap-mfi) (found or converted via MEGNET_PT_HOME), a converted checkpoint (.pt), "
                        "or a folder with state.pt and model.json (default: %(default)s)")
    parser.add_argument("--fidelity", default=None, help="the band-gap model's fidelity: pbe, gllb-sc, hse or scan "
                        "(default: pbe); refused for a model without fidelities")
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
        state = state_index(model, args.fidelity)
    except (FileNotFoundError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
    failed = 0
    try:
        writer = csv.DictWriter(out, fieldnames=columns(model))
        writer.writeheader()
        for row in predict_files(files, model, args.batch_size, device, state=state):
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
