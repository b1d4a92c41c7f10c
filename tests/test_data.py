"""Annotation readers and landmark schemes on the real files in ../shared."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.schemes import SCHEMES, WFLW98_TO_68, get_scheme
from evaluation import data as D


def _wflw_copy(tmp_path, lines):
    d = tmp_path / "wflw" / D.WFLW_LIST_DIR
    d.mkdir(parents=True)
    (d / "list_98pt_rect_attr_test.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "wflw" / "WFLW_images").symlink_to(D.default_root("wflw") / "WFLW_images")
    return tmp_path / "wflw"


def test_wflw_official_layout(wflw_faces):
    assert len(wflw_faces) == 505
    f = wflw_faces[0]
    assert f.points.shape == (98, 2) and f.rect.shape == (4,) and f.attributes.shape == (6,)
    img = f.image()
    assert img.ndim == 3 and img.shape[2] == 3
    # the points sit inside the image and inside a loose version of the official rectangle
    h, w = img.shape[:2]
    assert (f.points >= -1).all() and (f.points[:, 0] <= w).all() and (f.points[:, 1] <= h).all()
    counts = np.stack([x.attributes for x in wflw_faces]).sum(0)
    assert counts.tolist() == [74, 103, 166, 64, 197, 184]   # README of ../shared/wflw


def test_wflw_errors_name_file_and_line(tmp_path, wflw_faces):
    src = D.wflw_list(D.default_root("wflw"), "test").read_text().splitlines()
    root = _wflw_copy(tmp_path, [src[0], " ".join(src[1].split()[:205])])
    with pytest.raises(D.DataError, match=r"list_98pt_rect_attr_test.txt:2: 205 fields, expected 207"):
        D.load_wflw(root)
    shutil.rmtree(tmp_path / "wflw")
    bad = src[0].split()
    bad[5] = "abc"
    root = _wflw_copy(tmp_path, [src[0], " ".join(bad)])
    with pytest.raises(D.DataError, match=r":2: non-numeric value"):
        D.load_wflw(root)
    shutil.rmtree(tmp_path / "wflw")
    bad = src[0].split()
    bad[-1] = "0--Parade/missing.jpg"
    root = _wflw_copy(tmp_path, [" ".join(bad)])
    with pytest.raises(D.DataError, match=r":1: image .*missing.jpg does not exist"):
        D.load_wflw(root)
    with pytest.raises(D.DataError, match="does not exist; pass --wflw"):
        D.load_wflw(tmp_path / "nowhere")


def test_unreadable_image_is_named(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"not a jpeg")
    with pytest.raises(D.DataError, match="broken.jpg could not be decoded"):
        D.read_image(p, "list.txt:3")


def test_300w_pts_with_and_without_header(tmp_path, helen_faces):
    assert len(helen_faces) == 330
    assert len(D.load_300w(split="train")) == 2012
    f = helen_faces[0]
    src = f.source
    rows = D.read_pts(src)
    (tmp_path / "a.pts").write_text("\n".join(f"{x} {y}" for x, y in rows))
    np.testing.assert_array_equal(D.read_pts(tmp_path / "a.pts"), rows)
    (tmp_path / "b.pts").write_text("version: 1\nn_points: 68\n{\n" +
                                    "\n".join(f"{x} {y}" for x, y in rows[:67]) + "\n}\n")
    with pytest.raises(D.DataError, match=r"b.pts: 67 points, expected 68"):
        D.read_pts(tmp_path / "b.pts")
    (tmp_path / "c.pts").write_text("1.0 2.0\n3.0 x\n")
    with pytest.raises(D.DataError, match=r"c.pts:2: non-numeric"):
        D.read_pts(tmp_path / "c.pts")
    with pytest.raises(D.DataError, match="no image beside it"):
        D.load_300w(split=str(tmp_path))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_mirror_tables_are_involutions(name):
    s = SCHEMES[name]
    assert sorted(s.mirror) == list(range(s.num_points))
    assert all(s.mirror[s.mirror[i]] == i for i in range(s.num_points))
    # left outer eye corner mirrors to the right outer eye corner
    assert s.mirror[s.eye_corners[0]] == s.eye_corners[1]


def test_98_to_68_map_commutes_with_flip():
    w, s68 = get_scheme(98), get_scheme(68)
    idx = np.arange(98)[:, None].repeat(2, 1)
    assert len(set(WFLW98_TO_68)) == 68
    np.testing.assert_array_equal(w.as_68(w.flip_index(idx)), s68.flip_index(w.as_68(idx)))
    assert WFLW98_TO_68[36] == 60 and WFLW98_TO_68[45] == 72


def test_98_to_68_on_real_faces(wflw_faces):
    """The mapped outer eye corners, mouth corners and nose tip are the anatomical ones."""
    w = get_scheme(98)
    p = w.as_68(np.stack([f.points for f in wflw_faces]))
    ok = ((p[:, 36, 0] < p[:, 39, 0]) & (p[:, 39, 0] < p[:, 42, 0]) & (p[:, 42, 0] < p[:, 45, 0])
          & (p[:, 48, 0] < p[:, 54, 0]) & (p[:, 8, 1] > p[:, 57, 1]) & (p[:, 57, 1] > p[:, 30, 1])
          & (p[:, 30, 1] > p[:, 27, 1]))
    assert ok.mean() > 0.95     # large-pose faces may break left/right order, most may not


def test_calibration_split_is_disjoint_and_stable(wflw_faces):
    c1, e1 = D.calibration_split(wflw_faces)
    c2, e2 = D.calibration_split(list(reversed(wflw_faces)))
    assert {f.source for f in c1} == {f.source for f in c2}
    assert not {f.image_path for f in c1} & {f.image_path for f in e1}
    assert len(c1) + len(e1) == 505 and 100 <= len(c1) <= 250
