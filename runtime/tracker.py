"""Face tracking for video: crop each frame from the previous frame's landmarks, re-detect
only when a face is lost, and smooth the points against jitter.

The rules, in one place:

- A detection starts a track. On the next frame the crop is cut from the extent of that
  track's last *unsmoothed* points, which is exactly the crop convention the network was
  trained on (runtime.preprocess.landmark_box), so no detector box error carries over.
- A track is lost, and the detector runs again on the next frame, when
    * the centre of its points leaves the frame,
    * its points collapse or explode: extent side below `min_side` px, or a change of side by
      more than `max_scale_step` between two frames (a real face does not do that in 1/30 s),
    * a periodic check (the detector runs every `check_every` frames, default 15, i.e. twice a
      second at 30 fps) finds no detection overlapping it `max_unconfirmed` times in a row
      (default 2: Haar misses strong profiles that the tracker follows well, so one missed
      check is not enough to drop a face). This is the only rule that notices a face that
      stays in view but is replaced by something else (turned away, covered): the points
      keep a plausible shape, so such a track lives at most check_every x max_unconfirmed
      frames (1 s at 30 fps). A check also corrects drift: when the detection overlaps the
      track (IoU >= match_iou) but not closely (IoU < reseed_iou), the track restarts from the
      detector's box, so a model that slowly shrinks or lags the face cannot pull the crop
      away for longer than check_every frames.
- The detector also runs whenever there is no track. Detections that overlap no track start
  new tracks (largest first, up to max_faces), so a face entering the view is picked up at the
  next periodic check.
- Reported points are smoothed with a One Euro filter (Casiez et al., CHI 2012) whose speed
  term is measured in face sides per second, so the same settings work for near and far faces:
  strong smoothing while the face is still, little lag when it moves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .detector import Detection, iou
from .preprocess import landmark_box


class OneEuroFilter:
    """One Euro filter over an array of 2D points (K, 2); the cutoff adapts per point."""

    def __init__(self, min_cutoff: float = 0.5, beta: float = 10.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x = self.dx = self.t = None

    @staticmethod
    def _alpha(cutoff, dt):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        """Filtered points at time t (seconds); scale = face side in px (speed units)."""
        x = np.asarray(x, np.float64)
        if self.x is None:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self.t if t > self.t else 1.0 / 30
        dx = (x - self.x) / dt
        a_d = self._alpha(self.d_cutoff, dt)
        self.dx = a_d * dx + (1 - a_d) * self.dx
        speed = np.linalg.norm(self.dx, axis=-1, keepdims=True) / max(scale, 1e-6)
        a = self._alpha(self.min_cutoff + self.beta * speed, dt)
        self.x = a * x + (1 - a) * self.x
        self.t = t
        return self.x.copy()


@dataclass
class Track:
    id: int
    box: tuple[float, float, float, float]     # where to crop on the current frame
    fresh: bool = True                         # box came from the detector on this frame
    angle: float = 0.0                         # roll the crop is rotated by (degrees)
    stage: str = ""                            # detector stage that found it
    raw: tuple | None = None                   # the detector's own box when fresh
    side: float | None = None                  # landmark-extent side on the previous frame
    unconfirmed: int = 0
    filter: OneEuroFilter = field(default_factory=OneEuroFilter)


@dataclass
class TrackerConfig:
    max_faces: int = 1
    check_every: int = 15         # frames between periodic detector checks (0: never)
    max_unconfirmed: int = 2      # failed checks in a row before a track is dropped
    min_side: float = 12.0        # px: smaller point extents mean the points collapsed
    max_scale_step: float = 1.5   # max change of extent side between consecutive frames
    match_iou: float = 0.3        # detection <-> track overlap that confirms a track
    reseed_iou: float = 0.5       # ... below this the track restarts from the detection box
    # One Euro settings from `python benchmark/runtime_measure.py smoothing --model
    # artifacts/pfld68_w05/onnx_fp32` (6 HELEN faces held still with sensor noise, then swinging
    # sideways; the shipped model): frame-to-frame jitter of the still face 0.0058 -> 0.0006 of
    # the outer-eye distance, NME on the moving face 0.0448 -> 0.0543 (lag); (1.0, 4) lagged
    # more (0.0661), (1.0, 10) lagged about as much (0.0536) and smoothed less (0.0009).
    min_cutoff: float = 0.5       # One Euro: Hz, smoothing of a still face
    beta: float = 10.0            # One Euro: cutoff increase per face side / second of speed
    smooth: bool = True


class Tracker:
    def __init__(self, config: TrackerConfig | None = None):
        self.cfg = config or TrackerConfig()
        self.tracks: list[Track] = []
        self._next_id = 0
        self._since_check = 0

    def reset(self) -> None:
        self.tracks.clear()
        self._since_check = 0

    def needs_detection(self) -> bool:
        if not self.tracks:
            return True
        return self.cfg.check_every > 0 and self._since_check >= self.cfg.check_every

    def start_frame(self, detections: list[Detection] | None) -> list[Track]:
        """Tracks to run on this frame; `detections` is None when the detector did not run."""
        for t in self.tracks:
            t.fresh = False
        if detections is None:
            self._since_check += 1
            return list(self.tracks)
        self._since_check = 1
        free = list(detections)
        kept = []
        for t in self.tracks:
            best = max(free, key=lambda d: iou(t.box, d.box), default=None)
            overlap = iou(t.box, best.box) if best is not None else 0.0
            if overlap >= self.cfg.match_iou:
                free.remove(best)
                t.unconfirmed = 0
                if overlap < self.cfg.reseed_iou:     # drifted: restart from the detection
                    t.box, t.fresh, t.stage, t.side = best.box, True, best.stage, None
                    t.raw = best.raw
                    t.angle = best.angle
                    t.filter = OneEuroFilter(self.cfg.min_cutoff, self.cfg.beta)
            else:
                t.unconfirmed += 1
                if t.unconfirmed >= self.cfg.max_unconfirmed:
                    continue
            kept.append(t)
        self.tracks = kept
        for d in free:
            if len(self.tracks) >= self.cfg.max_faces:
                break
            self.tracks.append(Track(self._next_id, d.box, True, angle=d.angle, stage=d.stage, raw=d.raw,
                                     filter=OneEuroFilter(self.cfg.min_cutoff, self.cfg.beta)))
            self._next_id += 1
        return list(self.tracks)

    def drop_duplicates(self, overlap: float = 0.5) -> set[int]:
        """Drop tracks that converged on the same face as an older track; their ids."""
        gone = set()
        for i, a in enumerate(self.tracks):
            for b in self.tracks[i + 1:]:
                if a.id not in gone and b.id not in gone and iou(a.box, b.box) > overlap:
                    gone.add(max(a.id, b.id))
        self.tracks = [t for t in self.tracks if t.id not in gone]
        return gone

    def update(self, track: Track, points: np.ndarray, image_size: tuple[int, int],
               t: float, angle: float = 0.0) -> np.ndarray | None:
        """Feed a track's new points (and their roll, degrees, for a levelled next crop);
        (smoothed points) or None if the track is lost."""
        x0, y0, x1, y1 = landmark_box(points, angle)
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        w, h = image_size
        lost = not (0 <= cx < w and 0 <= cy < h) or side < self.cfg.min_side
        if track.side is not None and not track.fresh:
            step = side / track.side
            lost = lost or not (1 / self.cfg.max_scale_step <= step <= self.cfg.max_scale_step)
        if lost:
            self.tracks = [x for x in self.tracks if x is not track]
            return None
        track.side = side
        track.box, track.angle = (x0, y0, x1, y1), angle
        if not self.cfg.smooth:
            return np.asarray(points, np.float64)
        return track.filter(points, t, side)
