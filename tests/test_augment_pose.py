"""Augmentation moves points with pixels; head pose behaves under flips and rotations."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.pose import head_pose
from runtime.preprocess import landmark_box
from runtime.schemes import get_scheme
from train.augment import AugmentConfig, apply_affine, augment, crop_affine, warp

N = 112


def _crop_params(face):
    x0, y0, x1, y1 = landmark_box(face.points)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), 1.3 * max(x1 - x0, y1 - y0)


@pytest.fixture(scope="module", params=["300w", "wflw"])
def face_and_scheme(request, helen_faces, wflw_faces):
    return (helen_faces[3], get_scheme(68)) if request.param == "300w" else (wflw_faces[7], get_scheme(98))


def test_flip_twice_is_identity(face_and_scheme):
    face, scheme = face_and_scheme
    c, side = _crop_params(face)
    crop, pts = warp(face.image(), face.points, crop_affine(c, side, N), N, scheme, False)
    flip = np.array([[-1, 0, N - 1], [0, 1, 0]], np.float64)
    c1, p1 = warp(crop, pts, flip, N, scheme, True)
    c2, p2 = warp(c1, p1, flip, N, scheme, True)
    np.testing.assert_allclose(p2, pts, atol=1e-9)
    np.testing.assert_array_equal(c2, crop)


def test_flipped_left_eye_is_mirrored_right_eye(face_and_scheme):
    face, scheme = face_and_scheme
    c, side = _crop_params(face)
    plain, p = warp(face.image(), face.points, crop_affine(c, side, N), N, scheme, False)
    flipped, q = warp(face.image(), face.points, crop_affine(c, side, N, flip=True), N, scheme, True)
    left, right = scheme.eye_corners
    np.testing.assert_allclose(q[left], [N - 1 - p[right, 0], p[right, 1]], atol=1e-6)
    # the image-left outer eye corner is image-left again after the flip
    assert q[left, 0] < q[right, 0]
    # and the pixels moved with the point: the patch at the new point is the mirrored patch
    x, y = np.round(q[left]).astype(int)
    a = flipped[y - 4:y + 5, x - 4:x + 5].astype(float)
    xr, yr = np.round(p[right]).astype(int)
    b = plain[yr - 4:yr + 5, xr - 4:xr + 5][:, ::-1].astype(float)
    assert np.abs(a - b).mean() < 3.0


def test_points_follow_pixels_under_random_augmentation(face_and_scheme):
    """Paint a marker at one landmark; after any augmentation it is found at that point."""
    face, scheme = face_and_scheme
    img = cv2.GaussianBlur(face.image(), (0, 0), 3) // 2            # dark, smooth background
    k = scheme.eye_corners[0]
    x, y = face.points[k]
    cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1, cv2.LINE_AA)
    pts = face.points.copy()
    pts[k] = np.round(face.points[k])
    cfg = AugmentConfig(occlude_p=0, color_p=0, gray_p=0, blur_p=0, flip=0.5, rotate_p=1.0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        crop, q = augment(img, pts, scheme, N, rng, cfg)
        # after a flip the marked point has the mirrored index
        idx = k if np.abs(q[k] - q[scheme.mirror[k]]).sum() < 1e-9 else None
        cand = [k, scheme.mirror[k]]
        gray = crop.astype(float).sum(-1)
        yy, xx = np.unravel_index(np.argmax(cv2.GaussianBlur(gray, (5, 5), 0)), gray.shape)
        d = min(np.hypot(*(q[i] - (xx, yy))) for i in cand)
        assert d < 2.0, (d, idx)


def test_rotation_keeps_points_consistent(face_and_scheme):
    face, scheme = face_and_scheme
    c, side = _crop_params(face)
    _, p0 = warp(face.image(), face.points, crop_affine(c, side, N), N, scheme, False)
    _, p1 = warp(face.image(), face.points, crop_affine(c, side, N, angle_deg=25), N, scheme, False)
    th = np.radians(25)                  # cv2: positive angle turns the image counter-clockwise
    rot = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]])
    centre = np.array([N / 2, N / 2])
    np.testing.assert_allclose(p1, (p0 - centre) @ rot.T + centre, atol=1e-4)
    # distances between points are kept (rigid motion at equal scale)
    d0 = np.linalg.norm(p0[:, None] - p0[None], axis=-1)
    d1 = np.linalg.norm(p1[:, None] - p1[None], axis=-1)
    np.testing.assert_allclose(d0, d1, atol=1e-4)


def test_apply_affine_matches_warp_of_a_dot():
    img = np.zeros((200, 200, 3), np.uint8)
    img[120, 80] = 255
    m = crop_affine(np.array([100.0, 100.0]), 150.0, N, angle_deg=-15)
    crop = cv2.warpAffine(img, m, (N, N), flags=cv2.INTER_LINEAR)
    q = apply_affine(np.array([[80.0, 120.0]]), m)[0]
    yy, xx = np.unravel_index(np.argmax(crop.sum(-1)), crop.shape[:2])
    assert np.hypot(xx - q[0], yy - q[1]) < 1.0


def test_head_pose_under_flip_and_rotation(helen_faces):
    s = get_scheme(68)
    yaws = []
    for f in helen_faces[:20]:
        h, w = f.image().shape[:2]
        a = head_pose(f.points, s, (w, h))
        flipped = s.flip_index(np.c_[w - 1 - f.points[:, 0], f.points[:, 1]])
        b = head_pose(flipped, s, (w, h))
        np.testing.assert_allclose([b[0], b[2]], [-a[0], -a[2]], atol=1.0)   # yaw, roll negate
        assert abs(b[1] - a[1]) < 1.0                                         # pitch stays
        th = np.radians(10)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        c = np.array([w / 2, h / 2])
        r = head_pose((f.points - c) @ rot.T + c, s, (w, h))
        assert abs(((r[2] - a[2]) - 10 + 180) % 360 - 180) < 1.5               # roll follows
        yaws.append(a[0])
    assert abs(np.median(yaws)) < 15      # HELEN faces are mostly frontal


def test_head_pose_98_matches_68(wflw_faces):
    w, s = get_scheme(98), get_scheme(68)
    for f in wflw_faces[:10]:
        np.testing.assert_allclose(head_pose(f.points, w), head_pose(w.as_68(f.points), s))
