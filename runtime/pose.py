"""Head pose (yaw, pitch, roll in degrees) from 2D landmarks, and DREAM's yaw coefficient.

The pose is solved as DREAM does it: an EPnP initial solution (cv2.SOLVEPNP_EPNP) refined by
Levenberg-Marquardt (cv2.solvePnPRefineLM) against a mean 3D face. The same code makes training
labels (train/) and runs on the device (runtime/), so a pose reported on a device means what it
meant in training. Points of any scheme are first brought to the 68-point layout
(runtime.schemes).

yaw_coefficient(yaw) = sigmoid(10 * (4 / pi * |yaw| - 1)), yaw in radians within [-pi/2, pi/2]
(Cao et al., "Pose-Robust Face Recognition via Deep Residual Equivariant Mapping", CVPR 2018):
about 0 for a frontal face, 0.5 at 45 degrees, about 1 in profile; face recognition uses it as
a soft gate for how much frontalisation a face needs.
"""
from __future__ import annotations

import cv2
import numpy as np

from .schemes import Scheme

# 14 points of a mean 3D face (arbitrary units, x to the subject's left, y up, z towards
# the viewer), widely used for PFLD pose labels; indices are in the 68-point layout.
POSE_INDICES_68 = (17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8)
MEAN_FACE_3D = np.array([
    [6.825897, 6.760612, 4.402142],    # 17 brow, outer end (image left)
    [1.330353, 7.122144, 6.903745],    # 21 brow, inner end
    [-1.330353, 7.122144, 6.903745],   # 22
    [-6.825897, 6.760612, 4.402142],   # 26
    [5.311432, 5.485328, 3.987654],    # 36 eye, outer corner
    [1.789930, 5.393625, 4.413414],    # 39 eye, inner corner
    [-1.789930, 5.393625, 4.413414],   # 42
    [-5.311432, 5.485328, 3.987654],   # 45
    [2.005628, 1.409845, 6.165652],    # 31 nostril
    [-2.005628, 1.409845, 6.165652],   # 35
    [2.774015, -2.080775, 5.048531],   # 48 mouth corner
    [-2.774015, -2.080775, 5.048531],  # 54
    [0.000000, -3.116408, 6.097667],   # 57 lower lip
    [0.000000, -7.415691, 4.070434],   # 8 chin
], np.float64)
# The table puts image-left points at +x with +y up and +z towards the viewer, which is a
# mirror image of the camera frame (x right, y down, z away); mirror x so that a frontal
# face is the proper rotation Rx(180 deg) of the model, not a reflection.
_MODEL = MEAN_FACE_3D * np.array([-1.0, 1.0, 1.0])


def head_pose(points: np.ndarray, scheme: Scheme, image_size: tuple[int, int] | None = None
              ) -> np.ndarray:
    """(K, 2) image points -> [yaw, pitch, roll] in degrees.

    image_size (w, h) sets a pinhole camera with focal length = max(w, h), centred; without
    it the camera is centred on the points with focal length = 2 x their extent, which is
    what a face crop gives.
    """
    p = scheme.as_68(np.asarray(points, np.float64))
    img = p[list(POSE_INDICES_68)]
    if image_size is None:
        lo, hi = p.min(0), p.max(0)
        c, f = (lo + hi) / 2, 2.0 * float((hi - lo).max())
    else:
        c, f = np.array(image_size, np.float64) / 2, float(max(image_size))
    cam = np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1]], np.float64)
    ok, rvec, tvec = cv2.solvePnP(_MODEL, img, cam, np.zeros(4), flags=cv2.SOLVEPNP_EPNP)
    if not ok or not np.isfinite(rvec).all():
        return np.full(3, np.nan)
    rvec, tvec = cv2.solvePnPRefineLM(_MODEL, img, cam, np.zeros(4), rvec, tvec)
    rot, _ = cv2.Rodrigues(rvec)
    # Relative to the frontal pose Rx(180 deg), so a frontal face reads (0, 0, 0).
    return _euler(rot @ np.diag([1.0, -1.0, -1.0]))


def _euler(rot: np.ndarray) -> np.ndarray:
    """Rotation matrix -> (yaw, pitch, roll) degrees; x = pitch, y = yaw, z = roll."""
    sy = np.hypot(rot[0, 0], rot[1, 0])
    if sy > 1e-6:
        pitch = np.arctan2(rot[2, 1], rot[2, 2])
        yaw = np.arctan2(-rot[2, 0], sy)
        roll = np.arctan2(rot[1, 0], rot[0, 0])
    else:
        pitch, yaw, roll = np.arctan2(-rot[1, 2], rot[1, 1]), np.arctan2(-rot[2, 0], sy), 0.0
    return np.degrees([yaw, pitch, roll])


def yaw_coefficient(yaw_deg: float) -> float:
    """DREAM's soft yaw gate: sigmoid(10 * (4 / pi * |yaw| - 1)), yaw clipped to +-90 degrees."""
    if not np.isfinite(yaw_deg):
        return float("nan")
    yaw = min(abs(np.radians(yaw_deg)), np.pi / 2)
    return float(1.0 / (1.0 + np.exp(-10.0 * (4.0 / np.pi * yaw - 1.0))))
