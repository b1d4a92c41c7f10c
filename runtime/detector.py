"""Face detectors for the device runtime, with boxes calibrated to the landmark crop convention.

A detector's box is not what the landmark network was trained to be cropped from (the extent
of the face's landmarks, see runtime.preprocess.landmark_box), so each detector maps its own
boxes through a measured `BoxCalibration` to a square "landmark-extent" box that
Preprocess.crop_matrix takes as is.

- `HaarDetector`: OpenCV Haar cascades whose files ship inside opencv-python-headless 4.x
  (cv2.data.haarcascades). A chain of stages (frontal, frontal on an equalised image, frontal
  on the image rolled by +-15 deg, profile and mirrored profile, ...) stops at the first stage
  that finds a face, so a frontal face costs one cascade and harder faces cost more.
- `YuNetDetector` (the default): OpenCV Zoo's YuNet CNN (MIT, shipped in runtime/detectors/
  with its licence) as a detector bundle run by the runtime's own engines (runtime.yunet), or
  through cv2.FaceDetectorYN where no engine is installed. Its five points give the face's roll: the
  detection carries that angle, and the crop is cut upright ("levelled"), so a tilted face
  reaches the landmark network like the upright training faces.

How a detector's box maps to the landmark crop is data, not code: runtime/detectors/
calibration.json, measured on the 300-W training faces by `python tools/calibrate_detector.py
--write` (never on a test set).

    det = make_detector("yunet")
    for d in det.detect(image_bgr):          # largest face first
        d.box, d.angle                       # square landmark-extent box (centre, side) and roll
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from runtime.errors import ConfigError, LandmarkError


class DetectorError(LandmarkError, RuntimeError):
    """A detector cannot be built (missing cascade/model file, unsupported OpenCV)."""


@dataclass(frozen=True)
class BoxCalibration:
    """Detector box -> landmark-extent box, in units of the detector box side.

    scale: landmark-extent side (max of width, height) / detector box side
    dx, dy: (landmark-extent centre - detector box centre) / detector box side, measured in
            the frame the detector saw (so flipped or rotated stages get their own values)
    """
    scale: float
    dx: float
    dy: float
    measured: bool = True

    def apply(self, cx: float, cy: float, side: float, angle: float = 0.0
              ) -> tuple[float, float, float]:
        """(centre x, centre y, side) of a detector box -> the same for the landmark extent;
        with `angle` (degrees) the offset is taken in the face's levelled frame."""
        if angle:
            t = np.radians(angle)
            c, s = np.cos(t), np.sin(t)
            return (cx + (self.dx * c - self.dy * s) * side,
                    cy + (self.dx * s + self.dy * c) * side, self.scale * side)
        return cx + self.dx * side, cy + self.dy * side, self.scale * side


DETECTOR_DIR = Path(__file__).resolve().parent / "detectors"
CALIBRATION_FILE = DETECTOR_DIR / "calibration.json"
YUNET_MODEL = DETECTOR_DIR / "face_detection_yunet_2023mar.onnx"
YUNET_BUNDLE = DETECTOR_DIR / "yunet_onnx_fp32"   # export/detector.py (onnx_sim_fp32): the fastest here


def load_calibration(path: str | Path = CALIBRATION_FILE) -> dict:
    """The measured box calibrations: {"haar": {stage: BoxCalibration}, "yunet": {"levelled":
    ..., "axis": ...}, plus the file's other settings}. DetectorError names a bad file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        out = dict(raw)
        out["haar"] = {k: BoxCalibration(float(v["scale"]), float(v["dx"]), float(v["dy"]))
                       for k, v in raw["haar"].items()}
        out["yunet"] = {k: BoxCalibration(float(v["scale"]), float(v["dx"]), float(v["dy"]))
                        for k, v in raw["yunet"].items() if isinstance(v, dict)}
        return out
    except FileNotFoundError:
        raise DetectorError(f"the detector calibration {path} is missing; copy the whole "
                            "runtime/ folder") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DetectorError(f"{path} is not a detector calibration written by "
                            f"tools/calibrate_detector.py ({type(e).__name__}: {e})") from None


@dataclass
class Detection:
    box: tuple[float, float, float, float]   # square, landmark-extent convention, image px:
                                             # centre and side of the crop, in the face's
                                             # levelled frame when `angle` is not 0
    raw: tuple[float, float, float, float]   # the detector's own box, image px (axis-aligned)
    stage: str
    score: float = 1.0
    angle: float = 0.0                       # roll of the face, degrees (crops are rotated by it)
    points5: np.ndarray | None = None        # YuNet: eyes, nose tip, mouth corners (image px)


@dataclass(frozen=True)
class HaarStage:
    name: str
    cascade: str                 # file name in cv2.data.haarcascades
    equalize: bool = False       # histogram-equalise first (dark / low-contrast faces)
    mirror: bool = False         # run on the mirrored image (the profile cascade sees one side)
    roll: float = 0.0            # then rotate by this many degrees, so "x-mirror-roll-15" is
                                 # the mirror image of "x-roll-15"


# Tried in this order; the first stage that finds a face wins. Chosen on the WFLW crops in
# ../shared/wflw (greedy on the calibration third of evaluation.data.calibration_split, then made
# left/right symmetric; the held-out two thirds gave about the same share): the frontal
# cascade finds about two thirds of those hard faces, rolled and profile stages most of the
# rest. Later stages cost time only on images where the earlier ones found nothing.
_FRONT, _FRONT_DEFAULT, _PROFILE = ("haarcascade_frontalface_alt2.xml",
                                    "haarcascade_frontalface_default.xml",
                                    "haarcascade_profileface.xml")
HAAR_STAGES: dict[str, HaarStage] = {s.name: s for s in (
    HaarStage("frontal", _FRONT),
    HaarStage("frontal-eq", _FRONT_DEFAULT, equalize=True),
    HaarStage("frontal-roll-15", _FRONT_DEFAULT, roll=-15.0),
    HaarStage("frontal-roll+15", _FRONT_DEFAULT, roll=15.0),
    HaarStage("profile", _PROFILE),
    HaarStage("profile-mirror", _PROFILE, mirror=True),
    HaarStage("profile-roll-15", _PROFILE, roll=-15.0),
    HaarStage("profile-mirror-roll-15", _PROFILE, mirror=True, roll=-15.0),
    HaarStage("profile-roll+15", _PROFILE, roll=15.0),
    HaarStage("profile-mirror-roll+15", _PROFILE, mirror=True, roll=15.0),
    HaarStage("frontal-eq-roll-30", _FRONT_DEFAULT, equalize=True, roll=-30.0),
    HaarStage("frontal-eq-roll+30", _FRONT_DEFAULT, equalize=True, roll=30.0),
)}
DEFAULT_HAAR_CHAIN = tuple(HAAR_STAGES)
# Tuned for speed on the WFLW crops (benchmark/runtime_measure.py images): faces below 30% of the shorter
# side are not searched, so the image is shrunk until such a face is 30 px (close to the
# cascades' 20-24 px windows); scale steps of 1.15 instead of 1.1 cut the median detection
# time by about 0.4 ms for one face fewer of 505 found right; min_neighbors 1 finds more of
# the blurred and occluded faces, and min_face keeps out the small false detections that this
# lets in. For small faces in a large frame, lower min_face (run.py --min-face): slower.
HAAR_DEFAULTS = {"min_face": 0.3, "search_px": 30, "scale_factor": 1.15, "min_neighbors": 1}


def _cascade_dir() -> Path:
    data = getattr(cv2, "data", None)
    if data is None or not getattr(data, "haarcascades", None):
        raise DetectorError(
            f"OpenCV {cv2.__version__} has no cv2.data.haarcascades (OpenCV 5.x dropped the Haar "
            "cascades); install opencv-python-headless 4.x (runtime/requirements.txt pins "
            "4.14.0.94) or use --detector yunet --detector-model face_detection_yunet.onnx")
    return Path(data.haarcascades)


class HaarDetector:
    """Chain of Haar cascades on a downscaled grey image; the first stage that finds a face wins.

    min_face: smallest face searched, as a fraction of the image's shorter side. The image is
        shrunk so that this face is `search_px` pixels, which is what makes Haar fast on large
        frames; lower it (and expect slower detection) to find small faces.
    """
    name = "haar"

    @classmethod
    def create(cls, model=None, min_face: float | None = None, **options) -> "HaarDetector":
        """The registry's constructor: Haar needs no model file (its cascades ship with OpenCV)."""
        return cls(**options, **({} if min_face is None else {"min_face": min_face}))

    def __init__(self, chain: tuple[str, ...] = DEFAULT_HAAR_CHAIN,
                 min_face: float = HAAR_DEFAULTS["min_face"],
                 search_px: int = HAAR_DEFAULTS["search_px"],
                 scale_factor: float = HAAR_DEFAULTS["scale_factor"],
                 min_neighbors: int = HAAR_DEFAULTS["min_neighbors"],
                 calibration: dict[str, BoxCalibration] | None = None):
        if not hasattr(cv2, "CascadeClassifier"):
            raise DetectorError(f"OpenCV {cv2.__version__} has no CascadeClassifier; install "
                                "opencv-python-headless 4.x (pinned in runtime/requirements.txt)")
        unknown = [c for c in chain if c not in HAAR_STAGES]
        if unknown:
            raise DetectorError(f"unknown Haar stage(s) {', '.join(unknown)}; known: "
                                f"{', '.join(HAAR_STAGES)}")
        if not 0 < min_face <= 1:
            raise ConfigError(f"min_face must be in (0, 1], got {min_face}")
        folder = _cascade_dir()
        self.stages = [HAAR_STAGES[c] for c in chain]
        self.cascades: dict[str, cv2.CascadeClassifier] = {}
        for st in self.stages:
            if st.cascade in self.cascades:
                continue
            path = folder / st.cascade
            if not path.is_file():
                raise DetectorError(f"Haar cascade {path} is missing from this OpenCV install "
                                    f"({cv2.__version__}); install opencv-python-headless 4.x")
            c = cv2.CascadeClassifier(str(path))
            if c.empty():
                raise DetectorError(f"Haar cascade {path} could not be loaded (corrupt file?)")
            self.cascades[st.cascade] = c
        self.min_face, self.search_px = float(min_face), int(search_px)
        self.scale_factor, self.min_neighbors = float(scale_factor), int(min_neighbors)
        self.calibration = load_calibration()["haar"] if calibration is None else calibration
        self.calibrated = all(self.calibration[s.name].measured for s in self.stages)

    # -- the pieces calibrate_detector.py also uses -----------------------------------------
    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Grey image shrunk so the smallest searched face is search_px: (grey, scale)."""
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        h, w = gray.shape
        s = min(1.0, self.search_px / (self.min_face * min(h, w)))
        if s < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                              interpolation=cv2.INTER_AREA)
        return gray, s

    def run_stage(self, gray: np.ndarray, stage: HaarStage, cache: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Raw (N, 4) x, y, w, h boxes in the stage's frame and the 2x3 map from `gray` to it."""
        img = gray
        if stage.equalize:
            if cache is not None and "eq" in cache:
                img = cache["eq"]
            else:
                img = cv2.equalizeHist(gray)
                if cache is not None:
                    cache["eq"] = img
        h, w = img.shape
        m = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        if stage.mirror:
            img = cv2.flip(img, 1)
            m = np.array([[-1.0, 0, w - 1], [0, 1.0, 0]])
        if stage.roll:
            r = cv2.getRotationMatrix2D((w / 2, h / 2), stage.roll, 1.0)
            img = cv2.warpAffine(img, r, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
            m = r @ np.vstack([m, [0, 0, 1]])
        rects = self.cascades[stage.cascade].detectMultiScale(
            img, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.search_px, self.search_px))
        return np.asarray(rects, np.float64).reshape(-1, 4), m

    # -- the detector ------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[Detection]:
        gray, s = self.prepare(image)
        cache: dict = {}
        for st in self.stages:
            rects, m = self.run_stage(gray, st, cache)
            if len(rects):
                return self._to_image(rects, m, s, st)
        return []

    def _to_image(self, rects, m, s, stage: HaarStage) -> list[Detection]:
        back = cv2.invertAffineTransform(m)
        cal = self.calibration[stage.name]
        out = []
        for x, y, w, h in rects:
            side = float(max(w, h))
            cx, cy, ext = cal.apply(x + w / 2, y + h / 2, side)
            c = np.array([cx, cy]) @ back[:, :2].T + back[:, 2]
            corners = np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) @ back[:, :2].T \
                + back[:, 2]
            raw = (*(corners.min(0) / s), *(corners.max(0) / s))
            cx, cy, ext = c[0] / s, c[1] / s, ext / s
            out.append(Detection((cx - ext / 2, cy - ext / 2, cx + ext / 2, cy + ext / 2),
                                 tuple(map(float, raw)), stage.name))
        out.sort(key=lambda d: d.box[2] - d.box[0], reverse=True)
        return out


def default_yunet() -> Path:
    """The shipped YuNet detector bundle when an engine that runs it is installed
    (onnxruntime, or OpenVINO, which reads ONNX too), else the bare ONNX file, which runs
    through OpenCV's cv2.FaceDetectorYN (the fallback: OpenCV is always there)."""
    import importlib.util
    if YUNET_BUNDLE.is_dir() and any(importlib.util.find_spec(m) for m in ("onnxruntime",
                                                                           "openvino")):
        return YUNET_BUNDLE
    return YUNET_MODEL


class YuNetDetector:
    """YuNet (OpenCV Zoo, 2023mar): boxes, five points, scores.

    model: a detector bundle folder (runtime.detector_bundle; run by the runtime's own engines
        with numpy decoding, runtime.yunet), or a bare YuNet .onnx file (run by
        cv2.FaceDetectorYN, the fallback). Default: default_yunet().
    size: the longer side the image is shrunk to before detection, fixed (0: full
        resolution); default: a size that follows the image (runtime.yunet.target_size: 3/8 of
        its longer side, between 128 and the bundle's measured size, chosen on whole photos by
        `python benchmark/photos.py choose`; DETECTION_SIZE for a bare file).
    level: each detection carries the roll angle of its eye line, and its box is calibrated in
        the face's levelled frame (crops are then cut upright); off: axis-aligned boxes.
    min_face_px: detections smaller than this (box side, image px) are dropped.
    """
    name = "yunet"

    @classmethod
    def create(cls, model=None, min_face: float | None = None, **options) -> "YuNetDetector":
        return cls(model, **options, **({} if min_face is None else {"min_face_px": min_face}))

    def __init__(self, model: str | Path | None = None, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, size: int | None = None, level: bool = True,
                 min_face_px: float = 16.0, top_k: int = 5000,
                 calibration: BoxCalibration | None = None, engine: str | None = None,
                 threads: int = 1, max_side: int | None = None):
        from runtime.detector_bundle import is_detector_bundle
        from runtime.yunet import DETECTION_SIZE, MIN_SIZE, SIZE_SCALE, YuNetBundleDetector
        self.model = Path(model) if model else default_yunet()
        size = max_side if size is None else size
        self.bundle = None
        if self.model.is_dir() or (self.model.is_file() and is_detector_bundle(self.model)):
            self.bundle = YuNetBundleDetector(self.model, size, engine, threads, score_threshold,
                                              nms_threshold, top_k)
            self.size = self.bundle.size
            self.runs_on = f"{self.bundle.engine.name} ({self.model.name})"
        else:
            if not self.model.is_file():
                raise DetectorError(f"YuNet model {self.model} does not exist (the runtime ships "
                                    "it in runtime/detectors/; or use --detector haar)")
            if not hasattr(cv2, "FaceDetectorYN"):
                raise DetectorError(f"OpenCV {cv2.__version__} has no FaceDetectorYN (needs "
                                    ">= 4.5.4)")
            # the same size rule as a bundle's (runtime.yunet.target_size); an explicit size is
            # a fixed one
            self.size = int(DETECTION_SIZE if size is None else size)
            self._rule = (MIN_SIZE, SIZE_SCALE) if size is None else (self.size, 1.0)
            n = self.size or 320
            try:
                self.net = cv2.FaceDetectorYN.create(str(self.model), "", (n, n),
                                                     score_threshold, nms_threshold, top_k)
                self.net.detect(np.zeros((n, n, 3), np.uint8))  # fail now
            except cv2.error as e:
                raise DetectorError(f"{self.model} could not be run as a YuNet face detector: "
                                    f"{str(e).strip().splitlines()[-1]}") from None
            self.runs_on = "cv2.FaceDetectorYN (fallback)"
        self.max_side = self.size
        self.level, self.min_face_px = bool(level), float(min_face_px)
        cal = load_calibration()
        self.calibration = calibration or cal["yunet"]["levelled" if level else "axis"]
        self.calibrated = True
        self._size = None

    def rows(self, image: np.ndarray) -> np.ndarray:
        """YuNet rows (x, y, w, h, 5 x/y keypoints, score) in image pixels, best first."""
        if self.bundle is not None:
            return self.bundle.raw(image)
        from runtime.yunet import shrink, target_size
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        if min(h, w) < 8:             # too small to hold a face the network can see
            return np.zeros((0, 15), np.float32)
        image, s = shrink(image, target_size(w, h, self.size, *self._rule))
        size = (image.shape[1], image.shape[0])
        if size != self._size:
            self.net.setInputSize(size)
            self._size = size
        _, faces = self.net.detect(image)
        rows = np.zeros((0, 15), np.float32) if faces is None else np.asarray(faces, np.float32)
        rows[:, :14] /= s
        return rows

    def detect(self, image: np.ndarray) -> list[Detection]:
        out = []
        for f in self.rows(image):
            x, y, w, h = (float(v) for v in f[:4])
            if not (np.isfinite(f[:14]).all() and w > 0 and h > 0) or max(w, h) < self.min_face_px:
                continue
            pts = f[4:14].reshape(5, 2).astype(np.float64)
            angle = eye_angle(pts[0], pts[1]) if self.level else 0.0
            cx, cy, ext = self.calibration.apply(x + w / 2, y + h / 2, max(w, h), angle)
            out.append(Detection((cx - ext / 2, cy - ext / 2, cx + ext / 2, cy + ext / 2),
                                 (x, y, x + w, y + h), "yunet", float(f[-1]), angle, pts))
        out.sort(key=lambda d: d.box[2] - d.box[0], reverse=True)
        return out


def eye_angle(right_eye, left_eye) -> float:
    """Roll of a face in degrees from its eyes ("right" = the person's right, image left):
    0 when upright, positive when the image-right eye is lower."""
    d = np.asarray(left_eye, np.float64) - np.asarray(right_eye, np.float64)
    return float(np.degrees(np.arctan2(d[1], d[0])))


DETECTORS = {HaarDetector.name: HaarDetector, YuNetDetector.name: YuNetDetector}


def make_detector(name: str = "yunet", model: str | Path | None = None, **options):
    """A detector by name from DETECTORS; `model` is its model file (if it takes one)."""
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name].create(model, **options)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
