"""Which pool faces are the same face as a really labelled one, so that the real label wins.

The pool (../shared/wider_unlabeled: detector crops, teacher labels) and the WFLW train faces
(landmark crops, real labels) were cut from many of the same WIDER photos; a person may be in
both. Two crops of one photo differ only by a scale and a shift, so a pool face and a real face
of the same source image are matched by
  1. fitting that scale and shift from the pool face's five detector points to the same five of
     the real face's 98 (eye centres, nose tip, mouth corners), then
  2. warping the real crop into the pool crop with it and comparing the pixels of the face
     (normalised cross-correlation inside the real face's landmark extent).
Both must agree: a similar five-point layout alone also fits another person in the photo.

    drop = same_faces(real_faces, load_pool(root))     # {pool crop path: real face source}
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# WFLW's 98 points that correspond to the detector's five (pool order: right eye, left eye,
# nose, mouth right, mouth left: the subject's right is the image's left)
WFLW_FIVE = (96, 97, 54, 76, 82)
MIN_NCC = 0.6          # pixels of the face agree (different people in one photo stay far below)
MAX_FIT = 0.25         # five-point fit residual, in units of the real face's eye distance


def source_stem(path: str | Path, tag: str) -> str:
    """`0_Parade_Parade_0_12_face1.jpg` -> `0_Parade_Parade_0_12` (tag "_face"; "_train")."""
    stem = Path(path).stem
    return stem.rsplit(tag, 1)[0] if tag in stem else stem


def fit_scale_shift(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(s, t, rms) minimising |s * src + t - dst|."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    s = float((a * b).sum() / max((a * a).sum(), 1e-9))
    t = md - s * ms
    rms = float(np.sqrt(((s * src + t - dst) ** 2).sum(1).mean()))
    return s, t, rms


def match_score(real, pool) -> tuple[float, float]:
    """(ncc, fit residual / eye distance) of a real face (evaluation.data.Face, 98 points) and a
    pool face (train.pseudo_label.PoolFace) cut from the same photo."""
    src = real.points[list(WFLW_FIVE)].astype(np.float64)
    s, t, rms = fit_scale_shift(src, pool.five.astype(np.float64))
    iod = float(np.linalg.norm(src[0] - src[1])) * s
    fit = rms / max(iod, 1e-6)
    if not (s > 0) or fit > MAX_FIT:
        return -1.0, fit
    pool_img = cv2.imread(str(pool.image_path), cv2.IMREAD_GRAYSCALE)
    real_img = real.image()
    real_gray = cv2.cvtColor(real_img, cv2.COLOR_BGR2GRAY) if real_img.ndim == 3 else real_img
    if pool_img is None:
        return -1.0, fit
    h, w = pool_img.shape
    m = np.array([[s, 0, t[0]], [0, s, t[1]]], np.float64)
    warped = cv2.warpAffine(real_gray, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    valid = cv2.warpAffine(np.full(real_gray.shape, 255, np.uint8), m, (w, h), borderValue=0) > 0
    lo = np.floor(s * real.points.min(0) + t).astype(int)
    hi = np.ceil(s * real.points.max(0) + t).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], w), min(hi[1], h)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return -1.0, fit
    sel = valid[y0:y1, x0:x1]
    a = warped[y0:y1, x0:x1][sel].astype(np.float64)
    b = pool_img[y0:y1, x0:x1][sel].astype(np.float64)
    if a.size < 64:
        return -1.0, fit
    a, b = a - a.mean(), b - b.mean()
    ncc = float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-9))
    return ncc, fit


def same_faces(real_faces, pool_faces, min_ncc: float = MIN_NCC) -> dict[str, str]:
    """{pool image path: real face source} for every pool face that is one of the real faces."""
    by_stem: dict[str, list] = {}
    for p in pool_faces:
        by_stem.setdefault(source_stem(p.image_path, "_face"), []).append(p)
    out = {}
    for r in real_faces:
        for p in by_stem.get(source_stem(r.image_path, "_train"), []):
            ncc, _ = match_score(r, p)
            if ncc >= min_ncc:
                out[str(p.image_path)] = r.source
    return out
