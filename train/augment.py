"""Training augmentation in which points move with pixels.

One affine (box jitter, rotation, horizontal flip) maps image pixels to the crop, and the
same matrix maps the points; a flip also re-indexes points with the scheme's mirror table so
index i stays the same facial part. Photometric changes (colour, blur, occlusion) touch
pixels only.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from runtime.preprocess import landmark_box
from runtime.schemes import Scheme


@dataclass
class AugmentConfig:
    flip: float = 0.5              # probability of a horizontal flip
    rotate: float = 30.0           # max rotation in degrees (uniform)
    rotate_p: float = 0.6
    scale: tuple[float, float] = (1.1, 1.65)   # crop side / landmark-extent side
    shift_x: float = 0.07          # crop centre jitter, x landmark-extent side
    shift_y: tuple[float, float] = (-0.15, 0.05)
    occlude_p: float = 0.3
    color_p: float = 0.8
    gray_p: float = 0.1
    blur_p: float = 0.2


def crop_affine(center, side: float, size: int, angle_deg: float = 0.0, flip: bool = False):
    """2x3 matrix: image -> size x size crop of a square (side) at center, rotated, flipped."""
    s = size / side
    m = cv2.getRotationMatrix2D((float(center[0]), float(center[1])), angle_deg, s)
    m[:, 2] += np.array([size / 2, size / 2]) - np.array(center, np.float64)
    if flip:
        m = np.array([[-1, 0, size - 1], [0, 1, 0]], np.float64) @ np.vstack([m, [0, 0, 1]])
    return m


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    return points @ m[:, :2].T + m[:, 2]


def warp(image, points, m, size, scheme: Scheme, flipped: bool):
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    pts = apply_affine(np.asarray(points, np.float64), m)
    if flipped:
        pts = scheme.flip_index(pts)
    return crop, pts


def augment(image: np.ndarray, points: np.ndarray, scheme: Scheme, size: int,
            rng: np.random.Generator, cfg: AugmentConfig | None = None):
    """A random training crop: (uint8 BGR size x size crop, (K, 2) points in crop pixels)."""
    crop, pts = augment_sets(image, {scheme.name: points}, {scheme.name: scheme}, size, rng, cfg)
    return crop, pts[scheme.name]


def augment_sets(image: np.ndarray, point_sets: dict[str, np.ndarray], schemes: dict[str, Scheme],
                 size: int, rng: np.random.Generator, cfg: AugmentConfig | None = None,
                 return_matrix: bool = False):
    """One random crop for a face labelled in several schemes: the affine comes from the
    extent of the first set; every set moves with the pixels and is re-indexed on a flip with
    its own scheme's mirror table. Returns (crop, {name: (K, 2) crop pixels}), plus the
    image -> crop affine under "_matrix" with return_matrix."""
    cfg = cfg or AugmentConfig()
    x0, y0, x1, y1 = landmark_box(next(iter(point_sets.values())))
    ext = max(x1 - x0, y1 - y0)
    center = np.array([(x0 + x1) / 2 + rng.uniform(-cfg.shift_x, cfg.shift_x) * ext,
                       (y0 + y1) / 2 + rng.uniform(*cfg.shift_y) * ext])
    side = rng.uniform(*cfg.scale) * ext
    angle = rng.uniform(-cfg.rotate, cfg.rotate) if rng.random() < cfg.rotate_p else 0.0
    flip = bool(rng.random() < cfg.flip)
    m = crop_affine(center, side, size, angle, flip)
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    out = {}
    for name, pts in point_sets.items():
        q = apply_affine(np.asarray(pts, np.float64), m)
        out[name] = schemes[name].flip_index(q) if flip else q
    if return_matrix:
        out["_matrix"] = m
    return photometric(crop, rng, cfg), out


def photometric(crop: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    img = crop.astype(np.float32)
    if rng.random() < cfg.color_p:
        img = img * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40)       # contrast, brightness
        img = img * rng.uniform(0.85, 1.15, size=3)                      # per-channel gain
    if rng.random() < cfg.gray_p:
        img[:] = img.mean(-1, keepdims=True)
    if rng.random() < cfg.blur_p:
        k = int(rng.choice([3, 5]))
        img = cv2.GaussianBlur(img, (k, k), 0)
    if rng.random() < cfg.occlude_p:
        h, w = img.shape[:2]
        oh, ow = (int(rng.uniform(0.15, 0.45) * d) for d in (h, w))
        y, x = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
        img[y:y + oh, x:x + ow] = rng.uniform(0, 255, size=(1, 1, 3))
    return np.clip(img, 0, 255).astype(np.uint8)
