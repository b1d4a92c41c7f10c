"""The device inference loop as importable code: detect (or track) -> crop -> landmarks -> pose.

    from runtime.pipeline import Pipeline
    pipe = Pipeline("artifacts/pfld68_w05/tflite_fp32")          # engine from meta.json
    for frame in frames:                                        # BGR uint8 images
        for face in pipe.process(frame):
            face["points"], face["pose"], face["ms"]

run.py is a thin CLI over this class; benchmark/runtime_measure.py times it. Depends on numpy, opencv and
one engine only (never torch). Set cv2.setNumThreads yourself if OpenCV's own threads matter
(run.py sets it to --threads).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .decode import Landmarker
from .detector import DetectorError, make_detector
from .pose import head_pose, yaw_coefficient
from .preprocess import landmark_box, roll
from .tracker import Tracker, TrackerConfig
from runtime.errors import ConfigError

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
    detector: a runtime.detector.DETECTORS name ("yunet", the default; "haar") or an object with
        detect(image) -> list[Detection].
    level: cut every crop upright: a new face at the roll of the detector's eye points, a
        refined or tracked face at the roll of its own outer eye corners (points rotated back).
    max_faces: the most faces per frame (all the detector finds, up to this many).
    track: reuse the previous frame's points to place the next crop (runtime.tracker); call
        reset() between unrelated images or videos.
    refine: for a face just found by the detector, run the network a second time on the crop
        cut from the first pass's points (what tracking does on the next frame anyway).
        "auto" (the default): only for a face whose first-pass points are rolled by more than
        `refine_roll` degrees from the crop's own angle, so a tilted face gets an upright crop
        (YuNet's eye points underestimate roll: about -4 degrees for faces rolled -22 to -42
        at its 128-px input) while an upright face costs one network run. True: every new
        face (on the 300-W training faces it lowered the mean NME of found faces only from
        0.0488 to 0.0482 for +65 % time, `python benchmark/runtime_measure.py images --model
        artifacts/pfld68_w05/onnx_fp32 --ground-truth 300w-train --no-pose --refine`).
    """
    clock = staticmethod(time.perf_counter)     # stage timer; measure.py --clock cpu swaps it

    def __init__(self, bundle: str | Path, engine: str | None = None, threads: int = 1,
                 device: str | None = None, precision: str | None = None, detector="yunet",
                 detector_model: str | Path | None = None, track: bool = True,
                 pose: bool = True, refine: bool | str = "auto", max_faces: int = 10, fps: float = 30.0,
                 tracker: TrackerConfig | None = None, verify: bool = True,
                 points: str | int | None = None, level: bool = True, refine_roll: float = 10.0):
        if max_faces < 1:
            raise ConfigError(f"max_faces must be >= 1, got {max_faces}")
        self.model = Landmarker.open(bundle, engine, threads, device, precision, verify, points)
        self.meta, self.engine = self.model.meta, self.model.engine
        self.pre, self.scheme = self.model.pre, self.model.scheme
        self.detector = make_detector(detector, detector_model) if isinstance(detector, str) \
            else detector
        if not hasattr(self.detector, "detect"):
            raise DetectorError(f"detector {detector!r} has no detect(image) method")
        self.pose, self.refine, self.max_faces, self.fps = pose, refine, max_faces, fps
        self.level, self.refine_roll, self.max_refine = level, float(refine_roll), 3
        if refine not in (True, False, "auto"):
            raise ConfigError(f"refine must be True, False or 'auto', got {refine!r}")
        cfg = tracker or TrackerConfig()
        cfg.max_faces = max_faces
        self.tracker = Tracker(cfg) if track else None
        self.frame_index = 0
        self.detector_runs = 0
        self.last_ms = dict.fromkeys(STAGES, 0.0)
        self._confidence = None

    def reset(self) -> None:
        """Forget tracks and counters (start of a new video)."""
        if self.tracker:
            self.tracker.reset()
        self.frame_index = 0
        self.detector_runs = 0

    # -- stages --------------------------------------------------------------------------------
    def _roll(self, points) -> float:
        return roll(points, self.scheme.eye_corners) if self.level else 0.0

    def _landmarks(self, image, boxes, angles, ms) -> np.ndarray:
        t = self.clock()
        batch, mats = self.pre(image, boxes, angles)
        t1 = self.clock()
        pts = self.pre.decode(self.model(batch), mats)
        self._confidence = self.model.confidence
        t2 = self.clock()
        ms["crop"] += (t1 - t) * 1e3
        ms["landmarks"] += (t2 - t1) * 1e3
        return pts

    def _refine(self, frame, items, boxes, angles, pts, conf, ms):
        """Second pass(es) for new faces, in place: every new face once (refine=True), or
        (refine="auto") the faces whose points are rolled by more than refine_roll degrees
        from their crop, again while that holds, at most max_refine passes (a network trained
        with rotations up to about 30 degrees under-reads a larger roll by half in one pass)."""
        todo = [i for i, it in enumerate(items) if it[2]]
        for _ in range(1 if self.refine is True else self.max_refine):
            todo = [i for i in todo if _plausible(boxes[i], landmark_box(pts[i]))]
            if self.refine == "auto":
                todo = [i for i in todo if self.level
                        and abs(self._roll(pts[i]) - angles[i]) > self.refine_roll]
            if not todo:
                break
            angles2 = [self._roll(pts[i]) for i in todo]
            boxes2 = [landmark_box(pts[i], a) for i, a in zip(todo, angles2)]
            pts2 = self._landmarks(frame, boxes2, angles2, ms)
            for j, i in enumerate(todo):
                boxes[i], angles[i], pts[i] = boxes2[j], angles2[j], pts2[j]
                if conf is not None:
                    conf[i] = self._confidence[j]
        return conf

    def _detect(self, image, ms):
        t = self.clock()
        dets = self.detector.detect(image)
        ms["detect"] += (self.clock() - t) * 1e3
        self.detector_runs += 1
        return dets

    def process(self, frame: np.ndarray, timestamp: float | None = None) -> list[dict]:
        """One BGR uint8 frame -> a dict per face (largest first for new detections):

        box      (x0, y0, x1, y1) crop box the points were predicted from (landmark-extent
                 convention: a calibrated detector box, its refinement, or the tracked box;
                 its centre and side in the face's levelled frame)
        angle    roll the crop was rotated by (degrees; 0 with level=False)
        points   (K, 2) float64 image pixels (smoothed when tracking)
        pose     {"yaw", "pitch", "roll"} degrees, or None with pose=False
        yaw_coefficient  DREAM's sigmoid(10 * (4 / pi * |yaw| - 1)): ~0 frontal, 0.5 at 45
                 degrees, ~1 in profile (None with pose=False)
        source   "detect" (found by the detector on this frame) or "track"
        stage    detector stage that found the face (e.g. "frontal", "profile"), "" if tracked
        track    track id (None without tracking)
        ms       this frame's milliseconds per stage (detect, crop, landmarks, pose; shared by
                 all faces of the frame, also in self.last_ms)
        """
        if frame is None or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ConfigError("process() takes a BGR uint8 image of shape (H, W, 3), got "
                             f"{None if frame is None else (frame.shape, frame.dtype)}")
        ms = dict.fromkeys(STAGES, 0.0)
        t_start = self.clock()
        h, w = frame.shape[:2]
        t_video = self.frame_index / self.fps if timestamp is None else timestamp

        if self.tracker is not None:
            dets = self._detect(frame, ms) if self.tracker.needs_detection() else None
            tracks = self.tracker.start_frame(dets)
            items = [(tr, tr.box, tr.fresh, tr.stage if tr.fresh else "",
                      tr.angle if self.level else 0.0, tr.raw)
                     for tr in tracks]
        else:
            dets = self._detect(frame, ms)[:self.max_faces]
            items = [(None, d.box, True, d.stage, d.angle if self.level else 0.0, d.raw)
                     for d in dets]

        faces = []
        if items:
            boxes, angles = [it[1] for it in items], [it[4] for it in items]
            pts = self._landmarks(frame, boxes, angles, ms)
            conf = self._confidence
            if self.refine:
                conf = self._refine(frame, items, boxes, angles, pts, conf, ms)
            for j, ((tr, _, fresh, stage, _, raw), box, angle, p) in enumerate(
                    zip(items, boxes, angles, pts)):
                if tr is not None:
                    p = self.tracker.update(tr, p, (w, h), t_video, self._roll(p))
                    if p is None:
                        continue
                faces.append({"box": tuple(float(v) for v in box), "angle": float(angle),
                              "points": p, "confidence": None if conf is None else conf[j],
                              "pose": None, "yaw_coefficient": None,
                              "source": "detect" if fresh else "track", "stage": stage,
                              "detector_box": None if raw is None or not fresh
                              else tuple(float(v) for v in raw),
                              "track": None if tr is None else tr.id})
            if self.tracker is not None and len(faces) > 1:
                gone = self.tracker.drop_duplicates()
                faces = [f for f in faces if f["track"] not in gone]
        if self.pose:
            t = self.clock()
            for f in faces:
                yaw, pitch, rl = head_pose(f["points"], self.scheme, (w, h))
                f["pose"] = {"yaw": float(yaw), "pitch": float(pitch), "roll": float(rl)}
                f["yaw_coefficient"] = yaw_coefficient(yaw)
            ms["pose"] += (self.clock() - t) * 1e3
        ms["total"] = (self.clock() - t_start) * 1e3
        for f in faces:
            f["ms"] = ms
        self.last_ms = ms
        self.frame_index += 1
        return faces
