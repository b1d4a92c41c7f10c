"""Teacher labelling: 98-point pseudo-labels for unlabelled (and 68-point) faces.

Torch-free: the teacher runs through the runtime's engines (any bundle, or a model file with a
spec JSON), so any engine's model can teach.

Per face, from a start box:
1. pass 1 on the crop cut from the start box (a detector box mapped by a box -> crop rule
   fitted on labelled 300-W training faces, or the landmark extent of a labelled face);
2. pass 2 on the teacher's own crop rule applied to the extent of its pass-1 points;
3. the pass-2 crop flipped horizontally, its points un-flipped and re-indexed with the
   scheme's mirror table.
The label is the mean of passes 2 and 3. Per face and per point the disagreement
|pass 2 - pass 3| (and |pass 1 - pass 2|) is kept, divided by the label's outer-eye distance:
a large one flags a false detection or an occluded point.

Labels are written atomically to one .npz plus a .json of the settings, keyed by the teacher's
sha256, the settings and the face list, so a rerun with the same key reuses them.

    labels = label_faces(teacher, faces, settings, cache="runs/labels/wider")
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from runtime.bundle import (BundleMeta, SpecError, atomic_write_bytes, atomic_write_json,
                            load_spec, sha256)
from runtime.decode import Landmarker
from runtime.engines import ENGINES, load_bundle
from runtime.preprocess import Preprocess, landmark_box
from runtime.schemes import Scheme
from runtime.errors import LandmarkError

LABEL_VERSION = 1
POOL_TSV = "faces.tsv"


class LabelError(LandmarkError):
    """Bad teacher, pool file or cache; the message names the file."""


@dataclass(frozen=True)
class BoxRule:
    """Detector box -> start box for pass 1: a square of side `scale` x max(box w, h), centred
    on the box centre moved by (dx, dy) x that side. Fitted by `fit_box_rule`."""
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    fitted_on: str = ""

    def apply(self, box) -> np.ndarray:
        x0, y0, x1, y1 = map(float, box)
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2 + self.dx * side, (y0 + y1) / 2 + self.dy * side
        h = self.scale * side / 2
        return np.array([cx - h, cy - h, cx + h, cy + h])


@dataclass(frozen=True)
class LabelSettings:
    box_rule: BoxRule = BoxRule()
    flip: bool = True
    batch: int = 64


@dataclass
class Teacher:
    """A model run through the runtime's engines and decoders (runtime.decode.Landmarker)."""
    name: str
    model: Landmarker
    sha256: str

    @property
    def pre(self) -> Preprocess:
        return self.model.pre

    @property
    def scheme(self) -> Scheme:
        return self.model.scheme

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)


def load_teacher(model: str | Path, spec: str | Path | None = None, engine: str | None = None,
                 threads: int = 1, output: str | int | None = "wflw98") -> Teacher:
    """A teacher from a bundle folder (any engine's), or from a model file and its spec JSON.
    `output` picks the head of a multi-head bundle (default: its 98-point one, else the first)."""
    model = Path(model)
    if model.is_dir():
        meta, eng = load_bundle(model, engine, threads=threads, precision="f32")
        which = output if any(output in (o.scheme, o.num_points) for o in meta.outputs) else None
        return Teacher(model.name, Landmarker(meta, eng, which), meta.sha256)
    if spec is None:
        raise LabelError(f"teacher {model} is a model file: give its spec JSON too (--teacher-spec)")
    try:
        s = load_spec(spec)
    except SpecError as e:
        raise LabelError(str(e)) from None
    name = engine or s.get("engine") or next(
        (n for n, c in ENGINES.items() if model.suffix in c.suffixes), None)
    if name is None:
        raise LabelError(f"teacher {model}: no engine runs {model.suffix} files")
    meta = BundleMeta.from_spec(model, s, name, spec)
    eng = ENGINES[name](model, threads=threads, precision="f32")
    return Teacher(model.stem, Landmarker(meta, eng), sha256(model))


# -- faces --------------------------------------------------------------------------------------
@dataclass
class PoolFace:
    """An unlabelled face: its image, the detector's box and five points (from faces.tsv)."""
    image_path: Path
    box: np.ndarray                 # x0 y0 x1 y1 in the image
    five: np.ndarray                # (5, 2): right eye, left eye, nose, mouth right, mouth left
    score: float
    source: str                     # "faces.tsv:LINE"


POOL_COLUMNS = ("crop", "source_image", "source_box_side_px", "score", "x1", "y1", "x2", "y2",
                "right_eye_x", "right_eye_y", "left_eye_x", "left_eye_y", "nose_x", "nose_y",
                "mouth_right_x", "mouth_right_y", "mouth_left_x", "mouth_left_y")


def load_pool(root: str | Path) -> list[PoolFace]:
    """The faces of an unlabelled pool folder (faces.tsv + images/), e.g. ../shared/wider_unlabeled."""
    root = Path(root)
    tsv = root / POOL_TSV
    if not tsv.is_file():
        raise LabelError(f"pool {root} has no {POOL_TSV} (a tab-separated list: "
                         f"{', '.join(POOL_COLUMNS[:8])}, ...)")
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t") if lines else []
    missing = [c for c in POOL_COLUMNS if c not in header]
    if missing:
        raise LabelError(f"{tsv}:1: header lacks {', '.join(missing)}")
    col = {c: header.index(c) for c in POOL_COLUMNS}
    faces = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) != len(header):
            raise LabelError(f"{tsv}:{n}: {len(f)} fields, expected {len(header)}")
        try:
            box = np.array([float(f[col[c]]) for c in ("x1", "y1", "x2", "y2")])
            five = np.array([float(f[col[c]]) for c in POOL_COLUMNS[8:]]).reshape(5, 2)
            score = float(f[col["score"]])
        except ValueError as e:
            raise LabelError(f"{tsv}:{n}: non-numeric value ({e})") from None
        if not (box[2] > box[0] and box[3] > box[1]):
            raise LabelError(f"{tsv}:{n}: box {box.tolist()} has no area")
        faces.append(PoolFace(root / f[col["crop"]], box, five, score, f"{tsv.name}:{n}"))
    if not faces:
        raise LabelError(f"{tsv} lists no faces")
    return faces


def fit_box_rule(faces, detect: Callable[[np.ndarray], np.ndarray], crop_scale: float,
                 name: str) -> BoxRule:
    """Fit the detector-box -> teacher-crop rule on labelled faces (evaluation.data.Face).

    For each face the detector box that contains the centre of the landmark extent is matched;
    scale = median(crop_scale x extent side / box side), dx, dy = median(centre offset / box
    side). Use training faces only, never test faces.
    """
    s, dx, dy = [], [], []
    for f in faces:
        boxes = detect(f.image())
        x0, y0, x1, y1 = landmark_box(f.points)
        cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
        for b in boxes:
            if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]:
                bs = max(b[2] - b[0], b[3] - b[1])
                s.append(crop_scale * side / bs)
                dx.append((cx - (b[0] + b[2]) / 2) / bs)
                dy.append((cy - (b[1] + b[3]) / 2) / bs)
                break
    if len(s) < 10:
        raise LabelError(f"box rule: the detector matched only {len(s)} of {len(faces)} faces")
    return BoxRule(round(float(np.median(s)), 4), round(float(np.median(dx)), 4),
                   round(float(np.median(dy)), 4), f"{name}: {len(s)}/{len(faces)} faces")


def yunet_boxes(model: str | Path, score: float = 0.8):
    """A detect(image) -> (N, 4) boxes function with OpenCV's YuNet (the pool's own detector)."""
    det = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score, 0.3, 50)

    def detect(img: np.ndarray) -> np.ndarray:
        det.setInputSize((img.shape[1], img.shape[0]))
        _, rows = det.detect(img)
        if rows is None:
            return np.zeros((0, 4))
        return np.stack([rows[:, 0], rows[:, 1], rows[:, 0] + rows[:, 2], rows[:, 1] + rows[:, 3]], 1)
    return detect


# -- labelling ------------------------------------------------------------------------------------
def _points(teacher: Teacher, crops: list[np.ndarray], mats: list[np.ndarray]) -> np.ndarray:
    return teacher.pre.decode(teacher(teacher.pre.normalize(np.stack(crops))), mats)


def _flip_matrix(m: np.ndarray, size: int) -> np.ndarray:
    return np.array([[-1, 0, size - 1], [0, 1, 0]], np.float64) @ np.vstack([m, [0, 0, 1]])


def label_batch(teacher: Teacher, images: Sequence[np.ndarray], start_boxes: Sequence,
                flip: bool = True) -> dict[str, np.ndarray]:
    """Three passes of the teacher over faces given by image and start box (see module doc).

    Returns points (N, K, 2) in image pixels, p1/p2/p3 (each pass), and the disagreements
    (N, K) in units of the label's outer-eye distance: `dis_flip` = |p2 - p3|,
    `dis_refine` = |p1 - p2|.
    """
    pre, n = teacher.pre, teacher.pre.input_size
    # the start box is already a crop square: pass 1 cuts it as is
    as_is = replace(pre, crop_scale=1.0, box_shift_y=0.0)
    m1 = [as_is.crop_matrix(b) for b in start_boxes]
    p1 = _points(teacher, [pre.crop(im, m) for im, m in zip(images, m1)], m1)
    m2 = [pre.crop_matrix(landmark_box(p)) for p in p1]
    crops2 = [pre.crop(im, m) for im, m in zip(images, m2)]
    p2 = _points(teacher, crops2, m2)
    if flip:
        m3 = [_flip_matrix(m, n) for m in m2]
        p3 = teacher.scheme.flip_index(_points(teacher, [c[:, ::-1] for c in crops2], m3))
    else:
        p3 = p2
    pts = (p2 + p3) / 2 if flip else p2
    a, b = teacher.scheme.eye_corners
    eye = np.linalg.norm(pts[:, a] - pts[:, b], axis=-1)[:, None]
    eye = np.maximum(eye, 1e-6)
    return {"points": pts.astype(np.float32), "p1": p1.astype(np.float32),
            "p2": p2.astype(np.float32), "p3": p3.astype(np.float32),
            "dis_flip": (np.linalg.norm(p2 - p3, axis=-1) / eye).astype(np.float32),
            "dis_refine": (np.linalg.norm(p1 - p2, axis=-1) / eye).astype(np.float32)}


def cache_key(teacher: Teacher, settings: LabelSettings, paths: Sequence[str],
              boxes: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": LABEL_VERSION, "teacher": teacher.sha256,
                         "preprocess": teacher.pre.to_meta(), "scheme": teacher.scheme.name,
                         "settings": asdict(settings)}, sort_keys=True).encode())
    h.update("\n".join(map(str, paths)).encode())
    h.update(np.round(np.asarray(boxes, np.float64), 3).tobytes())
    return h.hexdigest()


def label_faces(teacher: Teacher, paths: Sequence[Path], start_boxes: np.ndarray,
                settings: LabelSettings, cache: str | Path | None = None,
                progress: Callable[[int], None] | None = None) -> dict:
    """Label every (image, start box); reuse `cache`.npz when its key matches, else write it.

    Returns the label arrays plus 'paths', 'key', and 'reused' (True when read from the cache).
    """
    paths = [str(p) for p in paths]
    start_boxes = np.asarray(start_boxes, np.float64)
    key = cache_key(teacher, settings, paths, start_boxes)
    if cache is not None:
        npz, js = Path(f"{cache}.npz"), Path(f"{cache}.json")
        if npz.is_file() and js.is_file():
            try:
                info = json.loads(js.read_text())
            except json.JSONDecodeError:
                info = {}
            if info.get("key") == key:
                with np.load(npz) as z:
                    out = {k: z[k] for k in z.files}
                out.update(paths=paths, key=key, reused=True)
                return out
    parts: dict[str, list] = {}
    for i in range(0, len(paths), settings.batch):
        chunk = paths[i:i + settings.batch]
        images = [_read(p) for p in chunk]
        res = label_batch(teacher, images, start_boxes[i:i + settings.batch], settings.flip)
        for k, v in res.items():
            parts.setdefault(k, []).append(v)
        if progress:
            progress(len(chunk))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["start_boxes"] = start_boxes.astype(np.float32)
    if cache is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        atomic_write_bytes(Path(f"{cache}.npz"), buf.getvalue())
        atomic_write_json(Path(f"{cache}.json"), {
            "key": key, "version": LABEL_VERSION, "teacher": teacher.name,
            "teacher_sha256": teacher.sha256, "scheme": teacher.scheme.name,
            "settings": asdict(settings), "faces": len(paths), "paths": paths,
            "disagreement": {"flip_median": float(np.median(out["dis_flip"])),
                             "refine_median": float(np.median(out["dis_refine"]))}})
    out.update(paths=paths, key=key, reused=False)
    return out


def _read(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise LabelError(f"image {path} could not be read")
    return img


def read_labels(cache: str | Path) -> dict:
    """A label file written by label_faces (npz + json), with its paths."""
    npz, js = Path(f"{cache}.npz"), Path(f"{cache}.json")
    for p in (npz, js):
        if not p.is_file():
            raise LabelError(f"label file {p} does not exist; run `train/run.py pseudo-label` first")
    info = json.loads(js.read_text())
    with np.load(npz) as z:
        out = {k: z[k] for k in z.files}
    if len(out["points"]) != len(info["paths"]):
        raise LabelError(f"{npz}: {len(out['points'])} labels but {len(info['paths'])} paths in {js}")
    out["paths"] = info["paths"]
    out["info"] = info
    return out


# -- the pipeline step ------------------------------------------------------------------------------
def pseudo_label(teacher: Teacher, images: str, out: str | Path, detector: str | Path | None = None,
                 data_root: str | None = None, flip: bool = True, batch: int = 64,
                 progress: Callable[[int], None] | None = None, log=print) -> dict:
    """Label a pool folder (faces.tsv: start boxes from its detector boxes through a box rule
    fitted on the 300-W training faces) or a labelled set DATASET:SPLIT (start boxes from the
    landmark extent); write/reuse `out`.npz/.json. Returns label_faces' result."""
    from evaluation import data as D
    if ":" in images and not Path(images).exists():
        ds, _, split = images.partition(":")
        faces = D.load(ds, split, data_root)
        boxes = []
        for f in faces:
            x0, y0, x1, y1 = landmark_box(f.points)
            boxes.append(BoxRule(teacher.pre.crop_scale).apply((x0, y0, x1, y1)))
        settings = LabelSettings(BoxRule(teacher.pre.crop_scale, 0, 0, "landmark extent"), flip, batch)
        paths = [f.image_path for f in faces]
    else:
        pool = load_pool(images)
        if detector is None:
            raise LabelError("labelling a pool needs the detector that made its boxes "
                             "(--detector, e.g. ../shared/detectors/yunet/face_detection_yunet_2023mar.onnx)")
        fit_faces = D.load("300w", "train", data_root)
        rule = fit_box_rule(fit_faces, yunet_boxes(detector), teacher.pre.crop_scale,
                            "300w:train, YuNet")
        log(f"box rule {rule}")
        settings = LabelSettings(rule, flip, batch)
        boxes = [rule.apply(f.box) for f in pool]
        paths = [f.image_path for f in pool]
    return label_faces(teacher, paths, np.array(boxes), settings, out, progress)
