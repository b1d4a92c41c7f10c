"""Landmark schemes as data: point count, mirror table, NME eye corners, 98 -> 68 map.

Everything that depends on a point layout (horizontal flip, NME normalisation, head pose,
scoring a 68-point model on WFLW) reads it from here, so adding a scheme is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from runtime.errors import UnknownNameError


def _mirror(n: int, pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    table = list(range(n))
    for a, b in pairs:
        table[a], table[b] = b, a
    return tuple(table)


def _pairs_68() -> list[tuple[int, int]]:
    p = [(i, 16 - i) for i in range(8)]                       # jaw
    p += [(17 + i, 26 - i) for i in range(5)]                 # brows
    p += [(31, 35), (32, 34)]                                 # nostrils
    p += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    p += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]   # outer lip
    p += [(60, 64), (61, 63), (65, 67)]                       # inner lip
    return p


def _pairs_98() -> list[tuple[int, int]]:
    p = [(i, 32 - i) for i in range(16)]                      # jaw
    p += [(33 + i, 46 - i) for i in range(5)]                 # upper brows
    p += [(38 + i, 50 - i) for i in range(4)]                 # lower brows
    p += [(55, 59), (56, 58)]                                 # nostrils
    p += [(60 + i, 72 - i) for i in range(5)]                 # eye corners and upper lids
    p += [(65, 75), (66, 74), (67, 73)]                       # lower lids
    p += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86)]   # outer lip
    p += [(88, 92), (89, 91), (93, 95)]                       # inner lip
    p += [(96, 97)]                                           # pupils
    return p


# Standard WFLW (98) -> iBUG/300-W (68) correspondence.
WFLW98_TO_68: tuple[int, ...] = tuple(
    list(range(0, 33, 2))                                     # jaw: every other point
    + [33, 34, 35, 36, 37, 42, 43, 44, 45, 46]                # upper brow contours
    + [51, 52, 53, 54, 55, 56, 57, 58, 59]                    # nose
    + [60, 61, 63, 64, 65, 67, 68, 69, 71, 72, 73, 75]        # eyes (6 of 8 each)
    + list(range(76, 96))                                     # mouth
)


@dataclass(frozen=True)
class Scheme:
    name: str
    num_points: int
    mirror: tuple[int, ...]
    eye_corners: tuple[int, int]   # outer eye corners: NME normaliser ("inter-ocular")
    to_68: tuple[int, ...] | None  # indices that give the 68-point layout (None: is 68)

    def flip_index(self, points: np.ndarray) -> np.ndarray:
        """Reorder points after a horizontal flip so index i is again the same facial part."""
        return points[..., list(self.mirror), :]

    def as_68(self, points: np.ndarray) -> np.ndarray:
        return points if self.to_68 is None else points[..., list(self.to_68), :]


SCHEMES: dict[str, Scheme] = {
    "300w68": Scheme("300w68", 68, _mirror(68, _pairs_68()), (36, 45), None),
    "wflw98": Scheme("wflw98", 98, _mirror(98, _pairs_98()), (60, 72), WFLW98_TO_68),
}


def get_scheme(name_or_points: str | int) -> Scheme:
    """Look a scheme up by name ("300w68", "wflw98") or point count (68, 98)."""
    for s in SCHEMES.values():
        if name_or_points in (s.name, s.num_points):
            return s
    raise UnknownNameError(f"unknown landmark scheme {name_or_points!r}; known: "
                   f"{', '.join(f'{s.name} ({s.num_points} points)' for s in SCHEMES.values())}")
