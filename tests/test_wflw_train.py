"""The WFLW train faces with real labels: the registered sets (wflw:train, wflw:heldout,
wflw:calib), mixing them into training (--real), the real label winning over the pool's teacher
label for the same face, and the guard that keeps recipes from replacing a shipped model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wflw_train_sets_are_disjoint_stable_and_hold_no_test_face(wflw_faces):
    from evaluation import data as D
    from evaluation.sets import load_set
    train = load_set("wflw:train")
    kept, held = D.wflw_train_split()
    assert len(train) == len(kept) + len(held) and 0.07 < len(held) / len(train) < 0.13
    assert [f.source for f in held] == [f.source for f in load_set("wflw:heldout")]
    # the split hangs on the path relative to WFLW_images/, not on order or location
    again_kept, again_held = D.holdout_split(list(reversed(train)), D.WFLW_HELDOUT_FRACTION)
    assert {f.source for f in again_held} == {f.source for f in held}
    assert all(f.key.startswith("wflw/WFLW_images/") and "_train" in f.key for f in train)
    calib = load_set("wflw:calib")
    assert calib and {f.source for f in calib} <= {f.source for f in kept}
    test_images = {f.image_path for f in wflw_faces}
    assert not test_images & {f.image_path for f in train}


def test_real_faces_train_the_98_head_and_are_held_out_apart():
    from train.engine import TrainConfig, prepare_data
    cfg = TrainConfig(dataset="300w", heads=("300w68", "wflw98"), real=("wflw:train",),
                      limit_faces=40, real_repeat=2, pool_68="none")
    data = prepare_data(cfg)
    wflw = [it for it in data.items if "_train" in Path(it.face.image_path).name]
    own = [it for it in data.items if it not in wflw]
    assert len(wflw) == 2 * 40 and len(own) > 0          # each real face twice an epoch
    assert all(set(it.targets) == {"wflw98"} and it.targets["wflw98"].shape == (98, 2) for it in wflw)
    assert all(set(it.targets) == {"300w68"} for it in own)
    held, head = data.val["val_wflw"]
    assert head == "wflw98" and held
    assert not {f.source for f in held} & {it.face.source for it in wflw}
    with pytest.raises(ValueError, match="not a known labelled set"):
        prepare_data(TrainConfig(dataset="300w", heads=("300w68", "wflw98"), real=("wflw:test",)))
    with pytest.raises(ValueError, match="add --heads"):
        prepare_data(TrainConfig(dataset="300w", real=("wflw:train",), limit_faces=10))


def test_the_real_label_wins_over_the_pool_for_the_same_face():
    from evaluation.data import load_wflw
    from train.pseudo_label import load_pool
    from train.samefaces import MIN_NCC, match_score, same_faces, source_stem
    pool_root = REPO.parent / "shared" / "wider_unlabeled"
    pool = load_pool(pool_root)
    listed = set((pool_root / "wflw_train_images.txt").read_text().split())
    real = [f for f in load_wflw(None, "train") if source_stem(f.image_path, "_train") + ".jpg" in listed][:120]
    assert len(real) == 120
    by_stem = {}
    for p in pool:
        by_stem.setdefault(source_stem(p.image_path, "_face"), []).append(p)
    same = same_faces(real, pool)
    matched = set(same.values())
    assert len(matched) >= 0.5 * len(real)               # most real faces are in the pool too
    assert len(same) <= 1.3 * len(matched)               # about one pool face each
    pool_by_path = {str(p.image_path): p for p in pool}
    real_by_source = {f.source: f for f in real}
    from train.samefaces import WFLW_FIVE, fit_scale_shift
    for path, src in same.items():
        p, r = pool_by_path[path], real_by_source[src]
        assert source_stem(p.image_path, "_face") == source_stem(r.image_path, "_train")
        # the real face's centre lands inside the pool face's detector box
        s, t, _ = fit_scale_shift(r.points[list(WFLW_FIVE)].astype(float), p.five.astype(float))
        c = s * r.points.mean(0) + t
        assert p.box[0] <= c[0] <= p.box[2] and p.box[1] <= c[1] <= p.box[3]
    # another photo's face is never the same face
    other = [p for p in pool if source_stem(p.image_path, "_face") + ".jpg" not in listed][:40]
    scores = [match_score(real[i % len(real)], p)[0] for i, p in enumerate(other)]
    assert sum(s >= MIN_NCC for s in scores) <= 2


def test_shipped_models_are_not_replaced_without_the_flag(tmp_path):
    from train.ship import ShippedModelError, is_shipped, refuse_shipped
    shipped = REPO / "models" / "student_w05.pt"
    before = shipped.read_bytes()
    assert is_shipped(shipped) and not is_shipped(tmp_path / "x.pt")
    with pytest.raises(ShippedModelError, match="--replace-shipped"):
        refuse_shipped(shipped, False)
    refuse_shipped(shipped, True)                        # the explicit flag allows it
    p = subprocess.run([sys.executable, "train/ship.py", str(shipped), str(shipped)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "shipped model" in p.stderr and "Traceback" not in p.stderr
    assert shipped.read_bytes() == before
    out = tmp_path / "copy.pt"
    p = subprocess.run([sys.executable, "train/ship.py", str(shipped), str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.is_file() and out.stat().st_size > 0
    # make train's recipes write under runs/ only
    mk = (REPO / "Makefile").read_text()
    ship_lines = [ln for ln in mk.splitlines() if ln.startswith("\t")
                  and ("train/ship.py" in ln or "refit-head" in ln or "--out runs/student_w05.pt" in ln)]
    assert ship_lines and not any("--replace-shipped" in ln for ln in ship_lines)
    assert np.all([" models/" not in ln.split("ship.py", 1)[-1] for ln in ship_lines if "ship.py" in ln])
