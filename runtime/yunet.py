"""YuNet as a bundle: its decoding in numpy/OpenCV and a detector that runs it through the
runtime's own engines (onnxruntime, OpenVINO; runtime.engines), not cv2.FaceDetectorYN.

A detector bundle is a folder with the model file and a meta.json of kind "detector"
(runtime.detector_bundle.DetectorMeta): input layout, colour, padding divisor, the decoder and the
order of its outputs, and the detection size chosen on whole photos. The decoding is YuNet's
(OpenCV 4.x face_detect.cpp): per stride 8/16/32 and grid cell, score = sqrt(cls * obj), box
centre (cell + d) * stride, size exp(d) * stride, five points (cell + d) * stride; then NMS.

    det = YuNetBundleDetector("runtime/detectors/yunet_onnx_int8")   # or a bundle folder of yours
    rows = det.raw(image_bgr)      # (N, 15): x, y, w, h, 5 x/y points, score, in image pixels

How big the image is when it reaches the network (`size`: its longer side, in pixels) decides
which faces are found and what it costs; `size` 0 runs the image at its own resolution.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from runtime.errors import ConfigError

STRIDES = (8, 16, 32)
OUTPUTS = tuple(f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in STRIDES)
# The default detection size (longer image side): the smallest size whose recall of faces of
# 64 px and up on the choosing part of ../shared/photos is within 1 point of the best size's,
# `python benchmark/photos.py choose` (docs/runtime.md); export/detector.py writes it into the
# bundles' meta.json, which is what the runtime reads.
DETECTION_SIZE = 384
# Smaller images get a proportionally smaller input, down to MIN_SIZE: the network sees an image
# at SIZE_SCALE of its resolution (384 / 1024, the photos' width: a 64-px face stays at least
# 24 px wherever it can), at least MIN_SIZE and at most DETECTION_SIZE px on the longer side.
# MIN_SIZE is the size chosen on the 300-W training crops (tools/calibrate_detector.py), where
# the face fills the frame: a face crop of up to 341 px is detected at 128 px.
MIN_SIZE = 128
SIZE_SCALE = 0.375


def target_size(w: int, h: int, size: int, min_size: int = MIN_SIZE,
                scale: float = SIZE_SCALE) -> int:
    """The longer side (px) an image of w x h is detected at: round(longer * scale) clamped to
    [min_size, size]; 0 when `size` is 0 (full resolution)."""
    if not size:
        return 0
    return int(min(size, max(min_size, round(max(w, h) * scale))))


def network_size(w: int, h: int, size: int, divisor: int = 32) -> tuple[float, int, int, int, int]:
    """(scale, resized w, resized h, padded w, padded h) for an image of w x h run at `size`
    (longer side; 0: as is). Images are only ever shrunk; the padding is to a multiple of
    `divisor` (zeros at the right and bottom, as OpenCV's FaceDetectorYN pads)."""
    s = 1.0 if not size else min(1.0, size / max(w, h))
    rw, rh = max(1, round(w * s)), max(1, round(h * s))
    pw, ph = (rw - 1) // divisor * divisor + divisor, (rh - 1) // divisor * divisor + divisor
    return s, rw, rh, pw, ph


RESIZE = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def shrink(image: np.ndarray, size: int, resize: str = "linear") -> tuple[np.ndarray, float]:
    """The image shrunk so its longer side is `size` (0, or already smaller: as is) and the
    scale. resize: "linear" (the default: about 15x cheaper than "area" on a 1024-px photo, the
    same recall on the choosing photos, docs/runtime.md) or "area"."""
    h, w = image.shape[:2]
    s, rw, rh, _, _ = network_size(w, h, size)
    if s < 1.0:
        image = cv2.resize(image, (rw, rh), interpolation=RESIZE[resize])
    return image, s


def prepare(image: np.ndarray, size: int, divisor: int = 32, resize: str = "linear"
            ) -> tuple[np.ndarray, float]:
    """BGR uint8 image -> (1, 3, H, W) float32 blob (BGR, 0-255, zero-padded to a multiple of
    `divisor`) and its scale."""
    image, s = shrink(image, size, resize)
    rh, rw = image.shape[:2]
    ph, pw = (rh - 1) // divisor * divisor + divisor, (rw - 1) // divisor * divisor + divisor
    blob = np.zeros((1, 3, ph, pw), np.float32)
    blob[0, :, :rh, :rw] = image.transpose(2, 0, 1)
    return blob, s


_GRIDS: dict = {}


def _grid(pw: int, ph: int, stride: int) -> np.ndarray:
    key = (pw, ph, stride)
    if key not in _GRIDS:
        cols, rows = pw // stride, ph // stride
        c, r = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
        _GRIDS[key] = np.stack([c.ravel(), r.ravel()], 1)
        if len(_GRIDS) > 64:
            _GRIDS.pop(next(iter(_GRIDS)))
    return _GRIDS[key]


def decode(outputs: dict[str, np.ndarray], pw: int, ph: int, score_threshold: float = 0.6,
           nms_threshold: float = 0.3, top_k: int = 5000) -> np.ndarray:
    """YuNet's 12 outputs for a padded pw x ph input -> (N, 15) rows in network pixels:
    x, y, w, h, five x/y points, score; best first, after NMS."""
    rows = []
    for s in STRIDES:
        cls = np.clip(outputs[f"cls_{s}"].reshape(-1), 0, 1)
        obj = np.clip(outputs[f"obj_{s}"].reshape(-1), 0, 1)
        score = np.sqrt(cls * obj)
        keep = np.nonzero(score >= score_threshold)[0]
        if not len(keep):
            continue
        grid = _grid(pw, ph, s)
        if len(grid) != len(cls):
            raise ConfigError(f"YuNet output cls_{s} has {len(cls)} cells, expected {len(grid)} "
                              f"for a {pw} x {ph} input (not a YuNet model, or a fixed-size one?)")
        g = grid[keep]
        box = outputs[f"bbox_{s}"].reshape(-1, 4)[keep]
        kps = outputs[f"kps_{s}"].reshape(-1, 10)[keep]
        centre = (g + box[:, :2]) * s
        size = np.exp(box[:, 2:4]) * s
        pts = (np.tile(g, 5) + kps) * s
        rows.append(np.concatenate([centre - size / 2, size, pts, score[keep, None]], 1))
    if not rows:
        return np.zeros((0, 15), np.float32)
    rows = np.concatenate(rows).astype(np.float32)
    idx = cv2.dnn.NMSBoxes(rows[:, :4].tolist(), rows[:, 14].tolist(), score_threshold,
                           nms_threshold, top_k=top_k)
    idx = np.asarray(idx, np.int64).reshape(-1)
    return rows[idx]


class YuNetBundleDetector:
    """Raw YuNet detections from a detector bundle run by one of runtime.engines.

    size: the longer side the image is shrunk to before detection (0: full resolution);
        None: the bundle's measured default (meta.json "defaults").
    engine: override the bundle's engine (OpenVINO also reads a .onnx bundle).
    """

    def __init__(self, bundle: str | Path, size: int | None = None, engine: str | None = None,
                 threads: int = 1, score_threshold: float | None = None,
                 nms_threshold: float | None = None, top_k: int = 5000, verify: bool = True,
                 device: str | None = None, precision: str | None = None):
        from runtime.detector_bundle import DetectorMeta
        from runtime.engines import get_engine
        self.meta = DetectorMeta.load(bundle, verify=verify)
        self.meta.check_machine()
        d = self.meta.defaults
        self.size = int(d.get("size", DETECTION_SIZE) if size is None else size)
        # an explicit size is a fixed one (the size sweeps of benchmark/photos.py)
        self.min_size = int(d.get("min_size", MIN_SIZE)) if size is None else self.size
        self.scale = float(d.get("scale", SIZE_SCALE)) if size is None else 1.0
        if self.size < 0:
            raise ConfigError(f"detection size must be >= 0 (0: full resolution), got {self.size}")
        self.score_threshold = float(d.get("score_threshold", 0.6) if score_threshold is None
                                     else score_threshold)
        self.nms_threshold = float(d.get("nms_threshold", 0.3) if nms_threshold is None
                                   else nms_threshold)
        self.top_k = int(top_k)
        eng = get_engine(engine or self.meta.engine)
        path = self.meta.model_file
        if eng.suffixes and path.suffix not in eng.suffixes and not (
                eng.name == "openvino" and path.suffix == ".onnx"):
            raise ConfigError(f"detector bundle {bundle} holds a {path.suffix} model; engine "
                              f"{eng.name} runs {', '.join(eng.suffixes)} files")
        self.engine = eng(path, threads=threads, device=device, precision=precision)
        self.names = list(self.meta.outputs)
        self.divisor = int(self.meta.input.get("divisor", 32))
        self.resize = str(d.get("resize", "linear"))
        if self.resize not in RESIZE:
            raise ConfigError(f"{self.meta.folder}: defaults.resize {self.resize!r} is not one "
                              f"of {', '.join(RESIZE)}")

    def raw(self, image: np.ndarray) -> np.ndarray:
        """(N, 15) rows (x, y, w, h, 5 x/y points, score) in image pixels, best first."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        if min(h, w) < 8:              # nothing the network could call a face
            return np.zeros((0, 15), np.float32)
        n = target_size(w, h, self.size, self.min_size, self.scale)
        blob, s = prepare(image, n, self.divisor, self.resize)
        outs = dict(zip(self.names, self.engine.run(blob)))
        rows = decode(outs, blob.shape[3], blob.shape[2], self.score_threshold,
                      self.nms_threshold, self.top_k)
        rows[:, :14] /= s
        return rows
