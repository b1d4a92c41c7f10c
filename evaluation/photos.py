"""Whole photos with annotated face boxes (../shared/photos): the set for detection recall and
per-photo runtime speed, split into a part for choosing (detection size, INT8 calibration and
budget) and a part for reporting (only ever reported).

    photos = load_photos(part="choose")        # [Photo(path, boxes (N, 4) x0 y0 x1 y1)]
    found = match(detections_xyxy, photo.boxes)  # per annotated box: matched or not
    recall_by_size(photos, results)            # {">=32": (found, total), ">=64": ..., ">=128": ...}

The split is fixed by a hash of the file name (crc32 % 2: even = choose, odd = report), so it
does not depend on the order or number of photos. A face's size is the longer side of its box.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.data import REPO, DataError

PARTS = ("choose", "report", "all")
SIZES = (32, 64, 128)          # recall is counted for boxes at least this large (longer side)
MATCH_IOU = 0.4


def photos_root() -> Path:
    return Path(os.environ.get("LANDMARK_PHOTOS") or REPO.parent / "shared" / "photos")


@dataclass
class Photo:
    path: Path
    boxes: np.ndarray            # (N, 4) x0, y0, x1, y1 in pixels

    @property
    def name(self) -> str:
        return self.path.name

    def sizes(self) -> np.ndarray:
        return np.maximum(self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1])


def part_of(name: str) -> str:
    return "choose" if zlib.crc32(name.encode()) % 2 == 0 else "report"


def load_photos(root: str | Path | None = None, part: str = "all") -> list[Photo]:
    """The photos of one part with their boxes (boxes.tsv: image, face, x, y, w, h)."""
    if part not in PARTS:
        raise DataError(f"photos part must be one of {', '.join(PARTS)}, got {part!r}")
    root = Path(root) if root else photos_root()
    tsv = root / "boxes.tsv"
    if not tsv.is_file():
        raise DataError(f"{tsv} does not exist: the whole-photo set is ../shared/photos "
                        "(or set LANDMARK_PHOTOS)")
    boxes: dict[str, list] = {}
    for i, line in enumerate(tsv.read_text().splitlines()):
        if i == 0 or not line.strip():
            continue
        f = line.split("\t")
        if len(f) != 6:
            raise DataError(f"{tsv} line {i + 1}: expected 6 tab-separated fields (image, face, "
                            f"x, y, w, h), got {len(f)}")
        try:
            x, y, w, h = map(float, f[2:])
        except ValueError:
            raise DataError(f"{tsv} line {i + 1}: x, y, w, h must be numbers, got {f[2:]}") from None
        if w <= 0 or h <= 0:
            raise DataError(f"{tsv} line {i + 1}: box {w} x {h} has no area")
        boxes.setdefault(f[0], []).append((x, y, x + w, y + h))
    out = []
    for name in sorted(boxes):
        if part != "all" and part_of(name) != part:
            continue
        p = root / name
        if not p.is_file():
            raise DataError(f"{tsv} names {name}, which is not in {root}")
        out.append(Photo(p, np.asarray(boxes[name], np.float64)))
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), xyxy."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(found: np.ndarray, truth: np.ndarray, min_iou: float = MATCH_IOU) -> np.ndarray:
    """Per annotated box, whether a found box matches it (greedy one-to-one, best IoU first,
    IoU >= min_iou)."""
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    hit = np.zeros(len(truth), bool)
    found = np.asarray(found, np.float64).reshape(-1, 4)
    if not len(found) or not len(truth):
        return hit
    m = iou_matrix(found, truth)
    used = np.zeros(len(found), bool)
    for k in np.argsort(-m, axis=None):
        i, j = divmod(int(k), len(truth))
        if m[i, j] < min_iou:
            break
        if not used[i] and not hit[j]:
            used[i], hit[j] = True, True
    return hit


def recall_by_size(photos: list[Photo], found_boxes: list[np.ndarray],
                   sizes: tuple[int, ...] = SIZES) -> dict[str, list[int]]:
    """{">=S": [found, total]} over the photos, for faces at least S px (longer box side)."""
    out = {f">={s}": [0, 0] for s in sizes}
    for ph, boxes in zip(photos, found_boxes):
        hit, sz = match(boxes, ph.boxes), ph.sizes()
        for s in sizes:
            sel = sz >= s
            out[f">={s}"][0] += int(hit[sel].sum())
            out[f">={s}"][1] += int(sel.sum())
    return out


def read_images(photos: list[Photo]) -> list[np.ndarray]:
    import cv2
    out = []
    for p in photos:
        img = cv2.imread(str(p.path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{p.path} could not be decoded as an image")
        out.append(img)
    return out


def rows_to_xyxy(rows: np.ndarray) -> np.ndarray:
    """YuNet rows (x, y, w, h, ...) -> (N, 4) x0, y0, x1, y1."""
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    return np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], 1)


def detector_recall(detect, photos: list[Photo], images: list[np.ndarray] | None = None
                    ) -> dict:
    """Recall per face size of `detect(image) -> (N, >=4) x, y, w, h rows` over the photos."""
    images = images if images is not None else read_images(photos)
    found = [rows_to_xyxy(detect(im)) for im in images]
    return recall_by_size(photos, found)


def pct(found_total) -> float:
    f, t = found_total
    return 100.0 * f / t if t else float("nan")
