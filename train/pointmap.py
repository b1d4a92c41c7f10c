"""Maps from one point scheme to another: the standard 98 -> 68 index map, or a linear map
fitted on faces that carry both (teacher 98-point output and real 68-point labels).

The linear map is p68 = W (p98 - c) + c with c the centroid of the 98 points and one W
(68 x 98) shared by x and y, so it commutes with translation, scale and rotation of the face.
WFLW and 300-W place the jaw and the brows differently; a fitted map carries a WFLW model's
points onto 300-W's conventions better than picking indices.

    m = PointMap.fit(teacher98_train, real68_train)
    p68 = m(teacher98)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.schemes import get_scheme
from runtime.errors import ConfigError

MAPS = ("none", "index", "linear")


@dataclass
class PointMap:
    weights: np.ndarray          # (K_out, K_in)

    @classmethod
    def index(cls, src: str = "wflw98") -> "PointMap":
        s = get_scheme(src)
        w = np.zeros((68, s.num_points))
        w[np.arange(68), list(s.to_68)] = 1.0
        return cls(w)

    @classmethod
    def fit(cls, src: np.ndarray, dst: np.ndarray, ridge: float = 1e-4) -> "PointMap":
        """Least squares on (N, K_in, 2) and (N, K_out, 2) point sets of the same faces."""
        src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
        if len(src) != len(dst) or len(src) < 10:
            raise ConfigError(f"a point map needs >= 10 paired faces, got {len(src)} and {len(dst)}")
        c = src.mean(1, keepdims=True)
        s = np.sqrt(((src - c) ** 2).sum(-1).mean(1))[:, None, None]
        x, y = (src - c) / s, (dst - c) / s
        xx = np.einsum("nkd,njd->kj", x, x)
        yx = np.einsum("nkd,njd->kj", y, x)
        return cls(yx @ np.linalg.inv(xx + ridge * len(src) * np.eye(xx.shape[0])))

    def matrix(self) -> np.ndarray:
        """The (K_out, K_in) matrix A with self(p) == A @ p for every (K_in, 2) point set p:
        the centroid subtraction folded in (each row sums to 1, so A commutes with translation)."""
        w = np.asarray(self.weights, np.float64)
        return w + (1.0 - w.sum(1, keepdims=True)) / w.shape[1]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, np.float64)
        c = p.mean(-2, keepdims=True)
        return (np.einsum("kj,...jd->...kd", self.weights, p - c) + c).astype(np.float32)
