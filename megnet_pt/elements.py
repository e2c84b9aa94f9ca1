"""The 89-element vocabulary of the published MEGNet-MP-2018.6.1 models.

Hydrogen to bismuth (Z 1-83) in order, then Ac, Th, Pa, U, Np, Pu (Z 89-94):

    index(Z) = Z - 1   for Z <= 83
    index(Z) = Z - 6   for 89 <= Z <= 94

Po, At, Rn, Fr, Ra (Z 84-88) and everything above Pu have no embedding.
"""
from __future__ import annotations

from pymatgen.core.periodic_table import Element

ATOMIC_NUMBERS: tuple[int, ...] = tuple(range(1, 84)) + tuple(range(89, 95))
ELEMENTS: tuple[str, ...] = tuple(Element.from_Z(z).symbol for z in ATOMIC_NUMBERS)
ELEMENT_INDEX: dict[str, int] = {symbol: i for i, symbol in enumerate(ELEMENTS)}
# Z -> index, -1 where there is no embedding; indexed by atomic number.
Z_TO_INDEX: tuple[int, ...] = tuple(
    ATOMIC_NUMBERS.index(z) if z in ATOMIC_NUMBERS else -1 for z in range(0, 119)
)


class UnsupportedElementError(ValueError):
    """A structure holds an element outside the model's vocabulary."""
