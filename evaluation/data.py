"""Readers for the two real annotation formats: WFLW (official layout) and 300-W (.pts).

Torch-free (numpy + opencv): the benchmark and quantizer read faces through this module too.
Every malformed input raises DataError naming the file and line and what was expected.

Data roots come from flags, else the environment (LANDMARK_WFLW, LANDMARK_300W), else the
folders beside the repository (../shared/wflw, ../shared/300w).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from runtime.errors import LandmarkError

REPO = Path(__file__).resolve().parents[1]
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
WFLW_LIST_DIR = Path("WFLW_annotations/list_98pt_rect_attr_train_test")
WFLW_IMAGE_DIR = Path("WFLW_images")


class DataError(LandmarkError):
    """Malformed or missing data; the message names the file (and line) at fault."""


@dataclass
class Face:
    image_path: Path
    points: np.ndarray                      # (K, 2) float32, pixel coords of the image
    rect: np.ndarray | None = None          # official face rectangle (x0, y0, x1, y1)
    attributes: np.ndarray = field(default_factory=lambda: np.zeros(6, np.int64))
    source: str = ""                        # "file:line" of the annotation
    key: str = ""                           # location-independent id (hold-out split); see SPLIT_PREFIX
    _image: np.ndarray | None = field(default=None, repr=False)

    def image(self) -> np.ndarray:
        """The BGR uint8 image (cached once read)."""
        if self._image is None:
            self._image = read_image(self.image_path, self.source)
        return self._image


def read_image(path: Path, source: str = "") -> np.ndarray:
    where = f" (annotation {source})" if source else ""
    if not Path(path).is_file():
        raise DataError(f"image {path} does not exist{where}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"image {path} could not be decoded{where}; is it a valid image file?")
    return img


def default_root(name: str) -> Path:
    env = {"wflw": "LANDMARK_WFLW", "300w": "LANDMARK_300W"}[name]
    return Path(os.environ.get(env) or REPO.parent / "shared" / name)


# -- WFLW -----------------------------------------------------------------------------------
def wflw_list(root: str | Path, split: str) -> Path:
    if split not in ("train", "test"):
        raise DataError(f"WFLW split must be 'train' or 'test', got {split!r}")
    return Path(root) / WFLW_LIST_DIR / f"list_98pt_rect_attr_{split}.txt"


def load_wflw(root: str | Path | None = None, split: str = "test",
              check_images: bool = True) -> list[Face]:
    """Faces of one split of the official WFLW layout (207 fields a line)."""
    root = Path(root) if root else default_root("wflw")
    path = wflw_list(root, split)
    if not path.is_file():
        raise DataError(f"WFLW annotation file {path} does not exist; pass --wflw or set "
                        "LANDMARK_WFLW to the folder holding WFLW_annotations/ and WFLW_images/")
    faces = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        f = line.split()
        if len(f) != 207:
            raise DataError(f"{path}:{n}: {len(f)} fields, expected 207 "
                            "(196 coordinates, 4 rectangle, 6 attributes, image path)")
        try:
            pts = np.array(f[:196], np.float32).reshape(98, 2)
            rect = np.array(f[196:200], np.float32)
            attrs = np.array([int(v) for v in f[200:206]], np.int64)
        except ValueError as e:
            raise DataError(f"{path}:{n}: non-numeric value ({e})") from None
        if not np.isfinite(pts).all():
            raise DataError(f"{path}:{n}: coordinates must be finite numbers")
        if ((attrs != 0) & (attrs != 1)).any():
            raise DataError(f"{path}:{n}: attribute flags must be 0 or 1, got {f[200:206]}")
        img = root / WFLW_IMAGE_DIR / f[206]
        if check_images and not img.is_file():
            raise DataError(f"{path}:{n}: image {img} does not exist")
        faces.append(Face(img, pts, rect, attrs, f"{path}:{n}", split_key("wflw", f[206])))
    return faces


# -- 300-W ----------------------------------------------------------------------------------
def read_pts(path: str | Path, num_points: int = 68) -> np.ndarray:
    """A 300-W .pts file, with or without the 'version / n_points / {' header."""
    path = Path(path)
    rows, declared = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s in "{}":
            continue
        if ":" in s:
            key, _, val = s.partition(":")
            if key.strip() == "n_points":
                try:
                    declared = int(val)
                except ValueError:
                    raise DataError(f"{path}:{n}: n_points is not an integer: {val.strip()!r}") from None
            continue
        parts = s.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: {len(parts)} values, expected 2 (x y)")
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise DataError(f"{path}:{n}: non-numeric coordinate {s!r}") from None
    expected = declared or num_points
    if len(rows) != expected:
        raise DataError(f"{path}: {len(rows)} points, expected {expected}")
    return np.array(rows, np.float32)


def _image_for(pts: Path) -> Path:
    for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
        p = pts.with_suffix(ext)
        if p.is_file():
            return p
    raise DataError(f"{pts}: no image beside it (looked for {pts.stem}.jpg/.png)")


W300_SPLITS = {
    "train": ("lfpw/trainset", "helen/trainset", "afw"),
    "helen_test": ("helen/testset",),
    "common_test": ("lfpw/testset", "helen/testset"),
    "challenging_test": ("ibug",),
}


def load_300w(root: str | Path | None = None, split: str = "train") -> list[Face]:
    """Faces of a standard 300-W split (the folders of it that exist), or of any folder."""
    root = Path(root) if root else default_root("300w")
    if split in W300_SPLITS:
        dirs = [root / d for d in W300_SPLITS[split] if (root / d).is_dir()]
        if not dirs:
            raise DataError(f"300-W root {root} has none of {', '.join(W300_SPLITS[split])}; "
                            "pass --w300 or set LANDMARK_300W")
    else:
        dirs = [Path(split) if Path(split).is_dir() else root / split]
        if not dirs[0].is_dir():
            raise DataError(f"300-W split {split!r}: not a known split "
                            f"({', '.join(W300_SPLITS)}) nor a folder")
    faces = []
    for d in dirs:
        base = root if split in W300_SPLITS else d
        for pts in sorted(d.rglob("*.pts")):
            faces.append(Face(_image_for(pts), read_pts(pts), None, np.zeros(6, np.int64),
                              str(pts), split_key("300w", pts.relative_to(base))))
    if not faces:
        raise DataError(f"no .pts files under {', '.join(map(str, dirs))}")
    return faces


def load(dataset: str, split: str, root: str | Path | None = None) -> list[Face]:
    if dataset == "wflw":
        return load_wflw(root, split)
    if dataset == "300w":
        return load_300w(root, split)
    raise DataError(f"unknown dataset {dataset!r}; expected 'wflw' or '300w'")


# -- the WFLW calibration / evaluation split ---------------------------------------------------
def _rel(face: Face) -> str:
    parts = Path(face.image_path).parts
    return "/".join(parts[parts.index("WFLW_images") + 1:]) if "WFLW_images" in parts else \
        Path(face.image_path).name


# The hold-out split hashes each face's path relative to its dataset root behind a fixed prefix:
# the root the split was first drawn on, where it hashed the path as read. Keeping that string
# as a constant keeps the held-out faces (and every choice made on them: the shipped models'
# epochs, the ablations) identical in every checkout and on every machine.
SPLIT_PREFIX = {"300w": "/work/shared/300w/", "pool": "../shared/wider_unlabeled/images/",
                "wflw": "wflw/WFLW_images/"}


def split_key(kind: str, relative: str | Path) -> str:
    """The hold-out key of a face whose file is `relative` to the root of a `kind` dataset."""
    return SPLIT_PREFIX[kind] + Path(relative).as_posix()


def holdout_split(faces: list[Face], fraction: float) -> tuple[list[Face], list[Face]]:
    """(kept, held out): a deterministic split by crc32 of each face's key (`split_key`; the
    annotation source for faces without one), the one training uses to hold faces out for model
    selection. It does not depend on where the data or the checkout lie."""
    import zlib
    if fraction <= 0:
        return faces, []
    key = [zlib.crc32((f.key or f.source).encode()) % 10000 / 10000 for f in faces]
    return ([f for f, k in zip(faces, key) if k >= fraction],
            [f for f, k in zip(faces, key) if k < fraction])


HELDOUT_FRACTION = 0.05     # train's default val_fraction: the 300-W faces no model trains on
WFLW_HELDOUT_FRACTION = 0.10   # the WFLW train faces no model trains on (selection only)


def wflw_train_split(root: str | Path | None = None) -> tuple[list[Face], list[Face]]:
    """(train, held out) of the WFLW train faces: the hash split of `holdout_split` on each
    image path relative to WFLW_images/, at WFLW_HELDOUT_FRACTION (about 180 of 1,825)."""
    return holdout_split(load_wflw(root, "train"), WFLW_HELDOUT_FRACTION)


WFLW_CALIB_EVERY = 8   # one in 8 of the WFLW training faces (not held out) calibrates INT8


def wflw_calibration(root: str | Path | None = None) -> list[Face]:
    """The INT8 calibration faces: WFLW train faces that training keeps (not the held-out part
    selection uses) whose crc32 of the hold-out key is divisible by WFLW_CALIB_EVERY (about 200
    of 1,630), in annotation order. No test face is among them."""
    import zlib
    kept, _ = wflw_train_split(root)
    return [f for f in kept if zlib.crc32(f.key.encode()) % WFLW_CALIB_EVERY == 0]


def calibration_split(faces: list[Face], every: int = 3) -> tuple[list[Face], list[Face]]:
    """Split faces into (calibration, evaluation), disjoint and deterministic.

    A face is a calibration face when crc32 of its image path (relative to WFLW_images/, plus
    its annotation index for images with several faces) is divisible by `every`; on the 505
    faces in ../shared/wflw that is about a third for calibration and two thirds for evaluation.
    INT8 calibration uses only the first part; drift is reported only on the second.
    """
    import zlib
    calib, evals = [], []
    for f in faces:
        key = zlib.crc32(_rel(f).encode()) % every
        (calib if key == 0 else evals).append(f)
    return calib, evals
