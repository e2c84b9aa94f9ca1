"""Crystal to graph: a periodic structure becomes a PyG ``Data``.

Nodes are the atoms of the cell; ``node_type`` is each atom's index in the
89-element vocabulary (``megnet_pt.elements``). Edges are every ordered pair
``(i, j, n)`` with

    0 < d_ij = | r_j + n · L - r_i | <= cutoff

under full periodic boundary conditions, where ``n`` is the integer image of
``j``. Edge source is ``i`` (the centre), target ``j`` (the neighbour), so
each bond appears once in each direction.

Fields of the returned ``Data``:
    node_type   long [N]        element index
    edge_index  long [2, E]     (source i, target j)
    edge_dist   float32 [E]     d_ij in Å
    edge_image  float32 [E, 3]  image n of the target
    pos         float32 [N, 3]  Cartesian positions (Å)
    lattice     float32 [1, 3, 3]
    state       float32 [1, 2]  the graph attribute, [0, 0] for every crystal (the formation-energy model);
                long [1]        with ``state=k``: an integer state, the fidelity of the band-gap model
    id, formula str
"""
from __future__ import annotations

import math
import warnings

from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure
from pymatgen.optimization.neighbors import find_points_in_spheres
from torch_geometric.data import Data

from .elements import Z_TO_INDEX, UnsupportedElementError

DEFAULT_CUTOFF = 4.0
MIN_DISTANCE = 0.5  # Å; the shortest bond in a crystal (H-H) is about 0.74 Å


class StructureError(ValueError):
    """A structure cannot be turned into a graph (named in the message)."""


def as_structure(obj: Any, id: str | None = None) -> Structure:
    """Accept a pymatgen ``Structure`` or an ASE ``Atoms``."""
    if isinstance(obj, Structure):
        return obj
    if any(c.__name__ == "Atoms" and c.__module__.startswith("ase") for c in type(obj).__mro__):  # subclasses too
        if not all(obj.pbc) or obj.cell.rank < 3:
            raise StructureError(f"{id or obj.get_chemical_formula()}: ASE Atoms must be periodic in 3D with a full cell")
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(obj)
    raise TypeError(f"{id or 'structure'}: expected a pymatgen Structure or ASE Atoms, got {type(obj).__name__}")


def reduced_formula(structure: Structure) -> str:
    """``structure``'s reduced formula, quietly.

    pymatgen orders a formula's elements by Pauling electronegativity and warns ("No Pauling electronegativity
    for He. Setting to NaN") for the noble gases that have none; it changes only where He, Ne or Ar stand in the
    formula string, nothing of the graph or the prediction.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No Pauling electronegativity", category=UserWarning)
        return structure.composition.reduced_formula


def element_indices(structure: Structure, id: str | None = None) -> np.ndarray:
    """Element index of every site; clear errors for disorder and unknown elements."""
    name = id or reduced_formula(structure)
    if len(structure) == 0:
        raise StructureError(f"{name}: the structure has no sites")
    try:
        species = structure.species  # one pass over the sites; pymatgen raises for a site that is not ordered
    except AttributeError:
        bad = next(i for i, site in enumerate(structure) if not site.is_ordered)
        raise StructureError(
            f"{name}: site {bad} has partial occupancy ({structure[bad].species}); "
            "disordered structures are not supported: order them first (e.g. pymatgen's OrderDisorderedStructureTransformation)"
        ) from None
    z = np.array([getattr(sp, "Z", 0) for sp in species], dtype=np.int64)
    index = np.array([Z_TO_INDEX[v] if 0 < v < len(Z_TO_INDEX) else -1 for v in z], dtype=np.int64)
    if (index < 0).any():
        missing = sorted({str(structure[i].specie) for i in np.flatnonzero(index < 0)})
        raise UnsupportedElementError(
            f"{name}: element(s) {', '.join(missing)} not in the model's 89-element vocabulary (H-Bi, Ac-Pu)"
        )
    return index


def neighbor_list(
    cart_coords: np.ndarray, lattice: np.ndarray, cutoff: float = DEFAULT_CUTOFF
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, image, d) with 0 < d <= cutoff under periodic boundaries.

    Raises ``StructureError`` when two sites are closer than
    ``MIN_DISTANCE`` (atoms on top of each other, a duplicated site).
    """
    coords = np.ascontiguousarray(cart_coords, dtype=float)
    src, dst, images, dist = find_points_in_spheres(
        coords,
        coords,
        r=float(cutoff),
        pbc=np.array([1, 1, 1], dtype=np.int64),
        lattice=np.ascontiguousarray(lattice, dtype=float),
        tol=1e-8,
    )
    self_pair = (src == dst) & (np.abs(images).sum(axis=1) == 0)
    close = ~self_pair & (dist < MIN_DISTANCE)
    if close.any():
        k = int(np.flatnonzero(close)[np.argmin(dist[close])])
        raise StructureError(f"sites {src[k]} and {dst[k]} are {dist[k]:.3g} Å apart (closer than {MIN_DISTANCE} Å): "
                             "overlapping or duplicated atoms")
    keep = ~self_pair
    return src[keep].astype(np.int64), dst[keep].astype(np.int64), images[keep], dist[keep]


def check_cutoff(cutoff: float) -> None:
    """A cutoff must be a positive, finite distance (Å): 0, a negative or NaN cutoff makes graphs without edges."""
    if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"the neighbour cutoff must be a positive number of Å (got {cutoff!r})")


def graph_state(state: int | None) -> torch.Tensor:
    """A graph's ``state``: ``[[0, 0]]`` (float) by default, ``[k]`` (long) for an integer state ``k``."""
    if state is None:
        return torch.zeros(1, 2)
    if isinstance(state, bool) or not isinstance(state, int) or state < 0:
        raise ValueError(f"state must be a non-negative integer (a fidelity index), got {state!r}")
    return torch.tensor([state], dtype=torch.long)


def structure_to_graph(structure: Any, cutoff: float = DEFAULT_CUTOFF, id: str | None = None,
                       state: int | None = None) -> Data:
    """Build the MEGNet graph of one crystal (see the module docstring); ``state``: an integer state, e.g. the
    fidelity of the band-gap model (``megnet_pt.pretrained.FIDELITIES``)."""
    check_cutoff(cutoff)
    state_tensor = graph_state(state)
    structure = as_structure(structure, id)
    formula = reduced_formula(structure)  # pymatgen rebuilds the composition on every access: once
    name = id or formula
    node_type = element_indices(structure, name)
    lattice = structure.lattice.matrix
    if abs(np.linalg.det(lattice)) < 1e-6:
        raise StructureError(f"{name}: the lattice has zero volume")
    cart_coords = structure.cart_coords
    try:
        src, dst, images, dist = neighbor_list(cart_coords, lattice, cutoff)
    except StructureError as exc:
        raise StructureError(f"{name}: {exc}") from None
    return Data(
        node_type=torch.from_numpy(node_type),
        edge_index=torch.from_numpy(np.stack([src, dst])),
        edge_dist=torch.from_numpy(dist.astype(np.float32)),
        edge_image=torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, 3)),
        pos=torch.from_numpy(cart_coords.astype(np.float32)),
        lattice=torch.from_numpy(lattice.astype(np.float32)).unsqueeze(0),
        state=state_tensor,
        num_nodes=len(structure),
        id=id if id is not None else formula,
        formula=formula,
    )


def with_cutoff(data: Data, cutoff: float) -> Data:
    """``data``'s crystal (its ``pos`` and ``lattice``) as a graph at another cutoff, e.g. a cached 4 Å graph for a
    model of 5 Å; state, id and formula are kept."""
    check_cutoff(cutoff)
    lattice = data.lattice.reshape(3, 3).double().numpy()
    src, dst, images, dist = neighbor_list(data.pos.double().numpy(), lattice, cutoff)
    out = data.clone()
    out.edge_index = torch.from_numpy(np.stack([src, dst]))
    out.edge_dist = torch.from_numpy(dist.astype(np.float32))
    out.edge_image = torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, 3))
    return out


def isolated_atoms(data: Data) -> torch.Tensor:
    """Atoms with no neighbour within the cutoff, per graph of ``data`` (a ``Data``, or a PyG ``Batch``): ``[num_graphs]``."""
    has_neighbor = torch.zeros(data.num_nodes, dtype=torch.bool)
    has_neighbor[data.edge_index[0]] = True
    batch = getattr(data, "batch", None)
    if batch is None:
        return (~has_neighbor).sum().view(1)
    return torch.bincount(batch[~has_neighbor], minlength=data.num_graphs)
