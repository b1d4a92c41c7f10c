"""The device inference loop as importable code: detect (or track) -> crop -> landmarks -> pose.

    from runtime.pipeline import Pipeline
    pipe = Pipeline("artifacts/pfld68_w05/tflite_fp32")          # engine from meta.json
    for frame in frames:                                        # BGR uint8 images
        for face in pipe.process(frame):
            face["points"], face["pose"], face["ms"]

run.py is a thin CLI over this class; runtime/measure.py times it. Depends on numpy, opencv and
one engine only (never torch). Set cv2.setNumThreads yourself if OpenCV's own threads matter
(run.py sets it to --threads).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .decode import Landmarker
from .detector import DetectorError, make_detector
from .pose import head_pose
from .preprocess import landmark_box
from .tracker import Tracker, TrackerConfig

STAGES = ("detect", "crop", "landmarks", "pose")


def _plausible(box, new_box, max_step: float = 2.0) -> bool:
    """Is the first pass's point extent a face near the detector's box (not scattered points)?"""
    side = max(box[2] - box[0], box[3] - box[1])
    new = max(new_box[2] - new_box[0], new_box[3] - new_box[1])
    shift = max(abs(new_box[0] + new_box[2] - box[0] - box[2]),
                abs(new_box[1] + new_box[3] - box[1] - box[3])) / 2
    return side / max_step <= new <= side * max_step and shift <= side / 2


class Pipeline:
    """Faces in a frame (or a video's frames, one call each) -> points, head pose, timings.

    bundle: model bundle folder (runtime.bundle); engine/threads/device/precision override or
        pass through to runtime.engines.load_bundle.
    points: which output of a multi-head bundle to use (scheme name or point count, e.g. 98);
        None: the bundle's first output.
    detector: "haar" | "yunet" | an object with detect(image) -> list[Detection].
    track: reuse the previous frame's points to place the next crop (runtime.tracker); call
        reset() between unrelated images or videos.
    refine: for a face just found by the detector, run the network a second time on the crop
        cut from the first pass's points (what tracking does on the next frame anyway). On by
        default: with the shipped model it lowers the NME of the detected faces on the WFLW
        crops (mean 0.1453 -> 0.1398, median 0.0886 -> 0.0805) and on the HELEN test images
        (mean 0.0529 -> 0.0480), for one more network run per new face (onnxruntime FP32, 1
        thread: 4.8 -> 6.7 ms per WFLW image; `python runtime/measure.py images --model
        artifacts/pfld68_w05/onnx_fp32 --ground-truth wflw|helen --no-pose --refine/--no-refine`).
        It used to be off: with an early, weaker model (epoch 41 of the first training phase)
        it made the WFLW mean worse (0.1786 -> 0.1820).
    """
    clock = staticmethod(time.perf_counter)     # stage timer; measure.py --clock cpu swaps it

    def __init__(self, bundle: str | Path, engine: str | None = None, threads: int = 1,
                 device: str | None = None, precision: str | None = None, detector="haar",
                 detector_model: str | Path | None = None, track: bool = True,
                 pose: bool = True, refine: bool = True, max_faces: int = 1, fps: float = 30.0,
                 tracker: TrackerConfig | None = None, verify: bool = True,
                 points: str | int | None = None):
        if max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {max_faces}")
        self.model = Landmarker.open(bundle, engine, threads, device, precision, verify, points)
        self.meta, self.engine = self.model.meta, self.model.engine
        self.pre, self.scheme = self.model.pre, self.model.scheme
        self.detector = make_detector(detector, detector_model) if isinstance(detector, str) \
            else detector
        if not hasattr(self.detector, "detect"):
            raise DetectorError(f"detector {detector!r} has no detect(image) method")
        self.pose, self.refine, self.max_faces, self.fps = pose, refine, max_faces, fps
        cfg = tracker or TrackerConfig()
        cfg.max_faces = max_faces
        self.tracker = Tracker(cfg) if track else None
        self.frame_index = 0
        self.detector_runs = 0
        self.last_ms = dict.fromkeys(STAGES, 0.0)

    def reset(self) -> None:
        """Forget tracks and counters (start of a new video)."""
        if self.tracker:
            self.tracker.reset()
        self.frame_index = 0
        self.detector_runs = 0

    # -- stages --------------------------------------------------------------------------------
    def _landmarks(self, image, boxes, ms) -> np.ndarray:
        t = self.clock()
        batch, mats = self.pre(image, boxes)
        t1 = self.clock()
        pts = self.pre.decode(self.model(batch), mats)
        t2 = self.clock()
        ms["crop"] += (t1 - t) * 1e3
        ms["landmarks"] += (t2 - t1) * 1e3
        return pts

    def _detect(self, image, ms):
        t = self.clock()
        dets = self.detector.detect(image)
        ms["detect"] += (self.clock() - t) * 1e3
        self.detector_runs += 1
        return dets

    def process(self, frame: np.ndarray, timestamp: float | None = None) -> list[dict]:
        """One BGR uint8 frame -> a dict per face (largest first for new detections):

        box      (x0, y0, x1, y1) crop box the points were predicted from (landmark-extent
                 convention: a calibrated detector box, its refinement, or the tracked box)
        points   (K, 2) float64 image pixels (smoothed when tracking)
        pose     {"yaw", "pitch", "roll"} degrees, or None with pose=False
        source   "detect" (found by the detector on this frame) or "track"
        stage    detector stage that found the face (e.g. "frontal", "profile"), "" if tracked
        track    track id (None without tracking)
        ms       this frame's milliseconds per stage (detect, crop, landmarks, pose; shared by
                 all faces of the frame, also in self.last_ms)
        """
        if frame is None or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError("process() takes a BGR uint8 image of shape (H, W, 3), got "
                             f"{None if frame is None else (frame.shape, frame.dtype)}")
        ms = dict.fromkeys(STAGES, 0.0)
        t_start = self.clock()
        h, w = frame.shape[:2]
        t_video = self.frame_index / self.fps if timestamp is None else timestamp

        if self.tracker is not None:
            dets = self._detect(frame, ms) if self.tracker.needs_detection() else None
            tracks = self.tracker.start_frame(dets)
            items = [(tr, tr.box, tr.fresh, tr.stage if tr.fresh else "") for tr in tracks]
        else:
            dets = self._detect(frame, ms)[:self.max_faces]
            items = [(None, d.box, True, d.stage) for d in dets]

        faces = []
        if items:
            boxes = [it[1] for it in items]
            pts = self._landmarks(frame, boxes, ms)
            if self.refine:
                again = [i for i, it in enumerate(items) if it[2]]
                again = [i for i in again if _plausible(boxes[i], landmark_box(pts[i]))]
                if again:
                    boxes2 = [landmark_box(pts[i]) for i in again]
                    pts2 = self._landmarks(frame, boxes2, ms)
                    for j, i in enumerate(again):
                        boxes[i], pts[i] = boxes2[j], pts2[j]
            for (tr, _, fresh, stage), box, p in zip(items, boxes, pts):
                if tr is not None:
                    p = self.tracker.update(tr, p, (w, h), t_video)
                    if p is None:
                        continue
                faces.append({"box": tuple(float(v) for v in box), "points": p, "pose": None,
                              "source": "detect" if fresh else "track", "stage": stage,
                              "track": None if tr is None else tr.id})
            if self.tracker is not None and len(faces) > 1:
                gone = self.tracker.drop_duplicates()
                faces = [f for f in faces if f["track"] not in gone]
        if self.pose:
            t = self.clock()
            for f in faces:
                yaw, pitch, roll = head_pose(f["points"], self.scheme, (w, h))
                f["pose"] = {"yaw": float(yaw), "pitch": float(pitch), "roll": float(roll)}
            ms["pose"] += (self.clock() - t) * 1e3
        ms["total"] = (self.clock() - t_start) * 1e3
        for f in faces:
            f["ms"] = ms
        self.last_ms = ms
        self.frame_index += 1
        return faces
