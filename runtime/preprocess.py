"""Face box -> square crop -> resize -> normalise, and network output -> image points.

The single implementation used by training-time evaluation, export checks, calibration,
the benchmark and the device runtime. Constants come from a bundle's meta.json
(`BundleMeta.preprocess`) or a checkpoint (`Preprocess.from_dict`), never from memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from runtime.errors import ConfigError


@dataclass(frozen=True)
class Preprocess:
    input_size: int = 112
    color: str = "RGB"                 # channel order the network expects ("RGB" or "BGR")
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    crop_scale: float = 1.2            # crop side = crop_scale * max(box width, box height)
    box_shift_y: float = 0.0           # crop centre moved by this x box side (+ is down)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def _lut(self) -> np.ndarray:
        lut = self.__dict__.get("_lut_cache")
        if lut is None:
            v = np.arange(256, dtype=np.float32)
            lut = np.stack([(v - np.float32(m)) / np.float32(s) for m, s in zip(self.mean, self.std)])
            object.__setattr__(self, "_lut_cache", lut)
        return lut

    @classmethod
    def from_dict(cls, p: dict) -> "Preprocess":
        """From the "preprocess" entry of a meta.json or checkpoint (KeyError/ValueError if bad)."""
        pre = cls(int(p["input_size"]), str(p["color"]), tuple(map(float, p["mean"])),
                  tuple(map(float, p["std"])), float(p["crop_scale"]),
                  float(p.get("box_shift_y", 0.0)))
        if pre.color not in ("RGB", "BGR") or len(pre.mean) != 3 or len(pre.std) != 3 \
                or min(pre.std) <= 0 or pre.input_size <= 0 or pre.crop_scale <= 0:
            raise ConfigError(f"not a valid preprocessing description: {p}")
        return pre

    def to_meta(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    # -- geometry ---------------------------------------------------------------------
    def crop_matrix(self, box, scale: float | None = None, angle: float = 0.0) -> np.ndarray:
        """2x3 affine taking image pixels to crop pixels for a face box (x0, y0, x1, y1).

        angle (degrees): the face's roll; the crop is rotated by it about the box centre, so a
        tilted face comes out upright ("levelled"); the box is then the face's square in its
        own levelled frame (centre and side)."""
        x0, y0, x1, y1 = map(float, box)
        side = max(x1 - x0, y1 - y0)
        if not side > 0:
            raise ConfigError(f"face box {tuple(box)} has no area")
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if angle:
            t = np.radians(angle)     # "down" in the levelled frame, in image coordinates
            cx, cy = cx - np.sin(t) * self.box_shift_y * side, cy + np.cos(t) * self.box_shift_y * side
        else:
            cy += self.box_shift_y * side
        side *= self.crop_scale if scale is None else scale
        s = self.input_size / side
        if not angle:
            return np.array([[s, 0, -(cx - side / 2) * s], [0, s, -(cy - side / 2) * s]], np.float64)
        m = cv2.getRotationMatrix2D((cx, cy), float(angle), s)
        m[:, 2] += np.array([self.input_size / 2 - cx, self.input_size / 2 - cy])
        return m

    def crop(self, image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        n = self.input_size
        return cv2.warpAffine(image, matrix, (n, n), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))

    # -- pixels -> tensor ---------------------------------------------------------------
    def normalize(self, crops_bgr: np.ndarray) -> np.ndarray:
        """uint8 BGR crops (N, H, W, 3) or (H, W, 3) -> float32 NCHW network input."""
        x = np.asarray(crops_bgr)
        if x.ndim == 3:
            x = x[None]
        if x.dtype == np.uint8:
            # a 256-entry table per channel, computed with the same float32 arithmetic as the
            # general path below (so the values are bit-identical), is about twice as fast
            order = (2, 1, 0) if self.color == "RGB" else (0, 1, 2)
            out = np.empty((x.shape[0], 3, x.shape[1], x.shape[2]), np.float32)
            lut = self._lut
            for c, src in enumerate(order):
                np.take(lut[c], x[..., src], out=out[:, c])
            return out
        if self.color == "RGB":
            x = x[..., ::-1]
        x = (x.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, image_bgr: np.ndarray, boxes, angles=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Crop and normalise every box of one image (rotated by its angle, degrees, if given):
        (NCHW batch, crop matrices)."""
        angles = angles if angles is not None else [0.0] * len(boxes)
        mats = [self.crop_matrix(b, angle=a) for b, a in zip(boxes, angles)]
        crops = np.stack([self.crop(image_bgr, m) for m in mats]) if mats else \
            np.zeros((0, self.input_size, self.input_size, 3), np.uint8)
        return self.normalize(crops), mats

    # -- tensor -> points ---------------------------------------------------------------
    def decode(self, output: np.ndarray, matrices) -> np.ndarray:
        """Network output (N, 2K) in crop-normalised [0, 1] units -> (N, K, 2) image pixels."""
        out = np.asarray(output, np.float64)
        pts = out.reshape(out.shape[0], -1, 2) * self.input_size
        res = np.empty_like(pts)
        for i, m in enumerate(matrices):
            inv = cv2.invertAffineTransform(np.asarray(m, np.float64))
            res[i] = pts[i] @ inv[:, :2].T + inv[:, 2]
        return res


def landmark_box(points: np.ndarray, angle: float = 0.0) -> tuple[float, float, float, float]:
    """Extent of a point set: the 'ground-truth landmark' crop protocol's box. With `angle`
    (degrees), the extent in the frame rotated by it, as a box about the same centre (for
    Preprocess.crop_matrix(box, angle=angle))."""
    p = np.asarray(points, np.float64)
    if not angle:
        return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())
    t = np.radians(angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])   # image -> levelled
    q = p @ rot.T
    lo, hi = q.min(0), q.max(0)
    cx, cy = ((lo + hi) / 2) @ rot                                        # back to the image
    w, h = hi - lo
    return float(cx - w / 2), float(cy - h / 2), float(cx + w / 2), float(cy + h / 2)


def roll(points: np.ndarray, eye_corners: tuple[int, int]) -> float:
    """Roll of a face in degrees from its outer eye corners (the scheme's NME corners: the
    person's right eye first, on the image left): 0 upright, positive when tilted clockwise."""
    d = np.asarray(points[eye_corners[1]], np.float64) - np.asarray(points[eye_corners[0]], np.float64)
    return float(np.degrees(np.arctan2(d[1], d[0])))
