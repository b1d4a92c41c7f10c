"""Learning from a teacher: pseudo-labels of real pool faces by the real PFLD-GhostOne (cached,
flip-consistent), the fitted 98 -> 68 map, a multi-head training step that supervises only the
heads a face has labels for, and the export of both heads with parity."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.schemes import get_scheme

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GHOST = SHARED / "teachers" / "pfld_ghostone" / "PFLD_GhostOne_112_1_opt_sim.onnx"
SPEC = REPO / "specs" / "pfld_ghostone.json"
POOL = SHARED / "wider_unlabeled"
YUNET = SHARED / "detectors" / "yunet" / "face_detection_yunet_2023mar.onnx"


@pytest.fixture(scope="module")
def teacher():
    from train.pseudo_label import load_teacher
    return load_teacher(GHOST, SPEC)


@pytest.fixture(scope="module")
def pool_faces():
    from train.pseudo_label import load_pool
    faces = load_pool(POOL)
    assert len(faces) == 6797
    return faces[:24]


def test_pool_reader_names_the_line(tmp_path):
    from train.pseudo_label import LabelError, load_pool
    lines = (POOL / "faces.tsv").read_text().splitlines()[:3]
    bad = lines[2].split("\t")
    bad[4] = "left"
    (tmp_path / "faces.tsv").write_text("\n".join([lines[0], lines[1], "\t".join(bad)]) + "\n")
    with pytest.raises(LabelError, match=r"faces.tsv:3: non-numeric value"):
        load_pool(tmp_path)
    (tmp_path / "faces.tsv").write_text("crop\tscore\n")
    with pytest.raises(LabelError, match=r"faces.tsv:1: header lacks"):
        load_pool(tmp_path)


def test_labels_are_cached_keyed_and_flip_consistent(teacher, pool_faces, tmp_path):
    from train.pseudo_label import BoxRule, LabelSettings, label_faces
    settings = LabelSettings(BoxRule(1.0, 0.0, 0.1, "test"))
    paths = [f.image_path for f in pool_faces]
    boxes = np.array([settings.box_rule.apply(f.box) for f in pool_faces])
    first = label_faces(teacher, paths, boxes, settings, tmp_path / "lab")
    assert not first["reused"] and first["points"].shape == (24, 98, 2)
    again = label_faces(teacher, paths, boxes, settings, tmp_path / "lab")
    assert again["reused"] and np.array_equal(again["points"], first["points"])
    # another setting is another key: labelled again, not reused
    other = label_faces(teacher, paths, boxes, LabelSettings(settings.box_rule, flip=False),
                        tmp_path / "lab")
    assert not other["reused"]
    info = json.loads((tmp_path / "lab.json").read_text())
    assert info["teacher_sha256"] == teacher.sha256 and info["faces"] == 24
    # the flipped pass, un-mirrored, agrees with the plain one on most faces: median
    # disagreement a few % of the eye distance (a broken mirror table gives tens of %)
    assert np.median(first["dis_flip"]) < 0.06
    # the label is the mean of the two refined passes and lies inside the crop image
    assert np.allclose(first["points"], (first["p2"] + first["p3"]) / 2, atol=1e-4)
    for f, p in zip(pool_faces, first["points"]):
        x0, y0, x1, y1 = f.box
        c = p.mean(0)
        side = max(x1 - x0, y1 - y0)
        assert abs(c[0] - (x0 + x1) / 2) < side and abs(c[1] - (y0 + y1) / 2) < side


def test_teacher_labels_of_labelled_faces_are_close_to_the_truth(teacher, helen_faces, tmp_path):
    """On 300-W faces (not WFLW) the teacher's 98 points, mapped to 68, land near the truth:
    what makes its labels worth learning from."""
    from evaluation.metrics import nme_per_face
    from runtime.preprocess import landmark_box
    from train.pseudo_label import BoxRule, LabelSettings, label_faces
    faces = helen_faces[:20]
    rule = BoxRule(1.2)
    res = label_faces(teacher, [f.image_path for f in faces],
                      np.array([rule.apply(landmark_box(f.points)) for f in faces]),
                      LabelSettings(rule))
    gt = np.stack([f.points for f in faces])
    nme = nme_per_face(get_scheme("wflw98").as_68(res["points"]), gt, (36, 45))
    assert nme.mean() < 0.06


def test_box_rule_is_fitted_on_training_faces():
    from evaluation.data import load_300w
    from train.pseudo_label import fit_box_rule, yunet_boxes
    faces = load_300w(split="train")[:60]
    rule = fit_box_rule(faces, yunet_boxes(YUNET), 1.2, "300w:train[:60]")
    # YuNet's box is about the landmark extent, a bit higher: crop ~1.2 x box, moved down
    assert 0.9 < rule.scale < 1.5 and 0.0 < rule.dy < 0.3 and abs(rule.dx) < 0.1


def test_linear_point_map_beats_the_index_map_on_held_out_faces(teacher):
    """Fitted on some 300-W training faces, scored on others (never test faces)."""
    from evaluation.data import load_300w
    from evaluation.metrics import nme_per_face
    from runtime.preprocess import landmark_box
    from train.pointmap import PointMap
    from train.pseudo_label import BoxRule, LabelSettings, label_faces
    faces = load_300w(split="train")[::10][:200]
    rule = BoxRule(1.2)
    res = label_faces(teacher, [f.image_path for f in faces],
                      np.array([rule.apply(landmark_box(f.points)) for f in faces]),
                      LabelSettings(rule))
    gt = np.stack([f.points for f in faces])
    fit, held = slice(0, 150), slice(150, 200)
    m = PointMap.fit(res["points"][fit], gt[fit])
    linear = nme_per_face(m(res["points"][held]), gt[held], (36, 45)).mean()
    index = nme_per_face(PointMap.index()(res["points"][held]), gt[held], (36, 45)).mean()
    assert linear < index - 0.005
    # the map commutes with moving and scaling the face
    p = res["points"][:3]
    assert np.allclose(m(p * 2 + 7), m(p) * 2 + 7, atol=1e-3)


def _labels_file(path: Path, faces, scheme="wflw98", points=None):
    """A label file in pseudo_label's format for `faces` (points: the given ones)."""
    from runtime.bundle import atomic_write_json
    pts = np.stack([f.points for f in faces]) if points is None else points
    np.savez(f"{path}.npz", points=pts.astype(np.float32),
             dis_flip=np.full(pts.shape[:2], 0.01, np.float32))
    atomic_write_json(Path(f"{path}.json"), {"scheme": scheme, "paths": [str(f.image_path) for f in faces],
                                             "faces": len(faces)})


def test_multi_head_step_supervises_only_labelled_heads(tmp_path, helen_faces):
    """Pool faces with only 98-point labels give the 68 head no gradient (with --pool-68 none):
    its weights change only through faces that carry 68-point labels."""
    from train.engine import Item, TrainConfig, _batch_loss, make_batch
    from train.model import PFLD
    from runtime.preprocess import Preprocess
    torch.manual_seed(0)
    model = PFLD(0, 0.25, heads={"300w68": 68, "wflw98": 98})
    f98 = [f for f in helen_faces[:4]]
    pts98 = np.stack([np.concatenate([f.points, f.points[:30]]) for f in f98])   # any 98 points
    items = [Item(f, {"wflw98": p}, {"wflw98": np.ones(98, np.float32)}) for f, p in zip(f98, pts98)]
    x, targets, pose, attrs = make_batch(items, range(4), ["300w68", "wflw98"], Preprocess(),
                                         np.random.default_rng(0), TrainConfig().augment)
    assert not targets["300w68"][1].any() and targets["wflw98"][1].all()
    loss, _ = _batch_loss(TrainConfig(loss="wing"), model, ["300w68", "wflw98"], x, targets, pose, attrs)
    loss.backward()
    assert model.heads["300w68"].weight.grad is None or not model.heads["300w68"].weight.grad.any()
    assert model.heads["wflw98"].weight.grad.abs().sum() > 0
    # a 300-W face with its real 68 points reaches the 68 head
    model.zero_grad()
    items = [Item(f, {"300w68": f.points}, {"300w68": np.ones(68, np.float32)}) for f in f98]
    x, targets, pose, attrs = make_batch(items, range(4), ["300w68", "wflw98"], Preprocess(),
                                         np.random.default_rng(0), TrainConfig().augment)
    loss, _ = _batch_loss(TrainConfig(loss="wing"), model, ["300w68", "wflw98"], x, targets, pose, attrs)
    loss.backward()
    assert model.heads["300w68"].weight.grad.abs().sum() > 0
    assert model.heads["wflw98"].weight.grad is None or not model.heads["wflw98"].weight.grad.any()


@pytest.mark.slow
def test_two_head_training_run_and_export_of_both_heads(tmp_path):
    """A few steps of real two-head training on 300-W faces + teacher-labelled pool faces, then
    the export of both heads with per-output parity (ONNX and TFLite)."""
    from evaluation.data import load_300w
    from export.stages import export_all
    from runtime.bundle import BundleMeta
    from runtime.decode import Landmarker
    from train.engine import TrainConfig, train
    from train.pseudo_label import load_pool
    w300 = load_300w(split="train")[:40]
    _labels_file(tmp_path / "w300", w300, "wflw98",
                 np.stack([np.concatenate([f.points, f.points[:30]]) for f in w300]))
    pool = load_pool(POOL)[:40]
    pool_pts = np.stack([np.array([[f.box[0] + (f.box[2] - f.box[0]) * (i % 10) / 9,
                                    f.box[1] + (f.box[3] - f.box[1]) * (i // 10) / 9]
                                   for i in range(98)]) for f in pool])
    from runtime.bundle import atomic_write_json
    np.savez(f"{tmp_path / 'pool'}.npz", points=pool_pts.astype(np.float32),
             dis_flip=np.full((40, 98), 0.01, np.float32))
    atomic_write_json(tmp_path / "pool.json", {"scheme": "wflw98", "faces": 40,
                                               "paths": [str(f.image_path) for f in pool]})
    cfg = TrainConfig(dataset="300w", width=0.25, epochs=1, batch_size=8, max_steps=3,
                      limit_faces=40, val_fraction=0.25, heads=("300w68", "wflw98"),
                      labels=(str(tmp_path / "w300"), str(tmp_path / "pool")),
                      out=str(tmp_path / "run"), threads=1, progress=False,
                      disagreement_tau=0.05)
    entry = train(cfg)
    assert entry["step"] == 3 and "val_pool" in entry and entry["val_pool"]["head"] == "wflw98"
    # the held-out pool faces cropped from their detector boxes: logged, chosen on only when asked
    box = entry["val_pool_box"]
    assert (box["protocol"], box["count"]) == ("rect", entry["val_pool"]["count"])
    assert entry["selection_nme"] == pytest.approx(np.mean([entry["val"]["nme"],
                                                            entry["val_pool"]["nme"]]))
    on = train(replace(cfg, select_on_boxes=True, max_steps=1, out=str(tmp_path / "boxes")))
    assert on["selection_nme"] == pytest.approx(np.mean([on[k]["nme"] for k in
                                                         ("val", "val_pool", "val_pool_box")]))
    from train.refit import refit_head        # the refit scores on the same three sets
    _, rep = refit_head(tmp_path / "boxes" / "last.pt", "300w68", ridges=(1e-3,))
    assert set(rep["heldout_faces"]) == {"heldout", "val_pool", "val_pool_box"}
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["arch"]["heads"] == {"300w68": 68, "wflw98": 98}
    bundles = export_all(tmp_path / "run" / "last.pt", tmp_path / "art",
                         targets=["onnx_sim_fp32", "tflite_fp32"], progress=lambda s: None)
    for name in ("onnx_fp32", "onnx_sim_fp32", "tflite_fp32"):
        meta = BundleMeta.load(bundles[name])
        assert [o.scheme for o in meta.outputs] == ["300w68", "wflw98"]
        assert len(meta.validation["outputs"]) == 2
        assert meta.validation["max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).normal(size=(2, 3, 112, 112)).astype(np.float32)
    a = Landmarker.open(bundles["onnx_sim_fp32"], output=98)(x)
    b = Landmarker.open(bundles["tflite_fp32"], output="wflw98")(x)
    assert a.shape == (2, 196) and np.abs(a - b).max() < 1e-4


def test_folded_head_equals_the_map_of_the_heads_outputs(shipped_checkpoint, helen_faces):
    """fold() writes a linear map of several heads' outputs into one head's weights: the folded
    network's head gives exactly the map of the unfolded heads' points (real faces, real crops)."""
    from evaluation.metrics import predict_faces
    from runtime.preprocess import Preprocess
    from train.engine import load_checkpoint, model_from_checkpoint, torch_predictor
    from train.pointmap import PointMap
    from train.refit import fold
    ck = load_checkpoint(shipped_checkpoint)
    rng = np.random.default_rng(0)
    pmap = PointMap(rng.normal(0, 0.02, (68, 166)) + np.eye(68, 166))
    p = rng.normal(size=(3, 166, 2))
    np.testing.assert_allclose(pmap.matrix() @ p, pmap(p), atol=1e-5)
    pre, faces = Preprocess.from_dict(ck["preprocess"]), helen_faces[:6]
    model = model_from_checkpoint(ck)
    before = {h: predict_faces(torch_predictor(model, h), faces, pre) for h in ("300w68", "wflw98")}
    folded = model_from_checkpoint({**ck, "model": fold(ck["model"], "300w68",
                                                        ["300w68", "wflw98"], pmap)})
    after = {h: predict_faces(torch_predictor(folded, h), faces, pre) for h in ("300w68", "wflw98")}
    np.testing.assert_allclose(after["wflw98"], before["wflw98"], atol=1e-4)
    want = pmap(np.concatenate([before["300w68"], before["wflw98"]], 1))
    np.testing.assert_allclose(after["300w68"], want, atol=2e-3)     # pixels of the image
    assert np.abs(after["300w68"] - before["300w68"]).max() > 1.0


@pytest.mark.slow
def test_refit_head_is_chosen_on_held_out_faces_and_folded(shipped_checkpoint, tmp_path):
    """refit-head fits candidates on the training faces, chooses the lowest held-out NME
    (native included), and the written checkpoint scores exactly that on `300w:heldout`."""
    from click.testing import CliRunner
    from train.evaluate import evaluate_checkpoint
    from train.refit import RIDGES
    from train.run import cli
    out = tmp_path / "refit.pt"
    r = CliRunner().invoke(cli, ["refit-head", "--checkpoint", str(shipped_checkpoint), "--head",
                                 "300w68", "--out", str(out), "--report",
                                 str(tmp_path / "r.json"), "--no-pool"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    cands = rep["candidates"]
    assert rep["heldout_faces"] == {"heldout": 112} and rep["fitted_on"] == 1900
    assert cands[0]["ridge"] is None and len(cands) == 1 + 3 * len(RIDGES)
    assert rep["chosen"] == min(cands, key=lambda c: c["nme"])
    got = evaluate_checkpoint(out, sets=("300w:heldout/landmarks",))["300w:heldout/landmarks"]
    assert got["nme"] == pytest.approx(rep["chosen"]["nme"], abs=1e-6)
    bad = CliRunner().invoke(cli, ["refit-head", "--checkpoint", str(shipped_checkpoint),
                                   "--head", "wflw98", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 1 and "not the scheme of its labelled training faces" in bad.output


def test_fit_report_scores_training_and_held_out_faces(shipped_checkpoint, tmp_path):
    """fit-report rebuilds the run's faces from the checkpoint: its held-out figure is the one
    refit-head chose on (same faces, same weights); the training sample is drawn from the
    labelled training faces, scored against their real labels."""
    from click.testing import CliRunner
    from train.diagnose import fit_report
    from train.run import cli
    rep = fit_report(shipped_checkpoint, sample=60, pool=False)
    val = rep["fit"]["val"]
    chosen = json.loads((REPO / "docs" / "student_w05_refit.json").read_text())["chosen"]
    assert (val["head"], val["targets"], val["train_faces"], val["heldout_faces"]) == \
        ("300w68", "real labels", 60, 112)
    assert val["heldout_nme"] == pytest.approx(chosen["sets"]["heldout"], abs=1e-5)
    assert 0.01 < val["train_nme"] < 0.2
    bad = CliRunner().invoke(cli, ["fit-report", "--checkpoint", str(tmp_path / "none.pt")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.slow
def test_teacher_distance_is_bounded_by_the_two_errors(shipped_checkpoint, teacher):
    """On the 505 WFLW test faces: the student's NME is the evaluate figure, and the mean
    student-to-teacher distance obeys the triangle inequality with the two NMEs."""
    from runtime.preprocess import Preprocess
    from train.diagnose import teacher_distance
    from train.engine import load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(shipped_checkpoint)
    r = teacher_distance(model_from_checkpoint(ck), Preprocess.from_dict(ck["preprocess"]),
                         list(ck["arch"]["heads"]), teacher)
    assert r["faces"] == 505
    assert r["landmarks"]["student_nme"] == pytest.approx(0.0717, abs=5e-5)
    for prot in ("landmarks", "rect"):
        s, t, d = (r[prot][k] for k in ("student_nme", "teacher_nme", "student_to_teacher"))
        assert abs(s - t) <= d <= s + t and d > 0.01


def test_held_out_pool_faces_are_cropped_from_their_detector_boxes(pool_faces, helen_faces):
    """The detector-box held-out set (training's log, --select-on-boxes, fit-report) crops a pool face from its own faces.tsv box (what the runtime
    gets from a detector); faces that are not in a pool have no such figure."""
    from evaluation.data import Face
    from train.engine import pool_detector_boxes
    faces = [Face(f.image_path, np.zeros((98, 2), np.float32)) for f in pool_faces[:5]]
    boxed = pool_detector_boxes(faces)
    assert [b.image_path for b in boxed] == [f.image_path for f in faces]
    assert np.allclose(np.stack([b.rect for b in boxed]), np.stack([f.box for f in pool_faces[:5]]),
                       atol=1e-4)
    assert pool_detector_boxes(helen_faces[:3]) is None


def test_widened_neck_keeps_the_function_and_round_trips(tmp_path):
    """--neck: an --init with the default neck is widened Net2Net-style (same outputs before
    any step), and the neck travels in the checkpoint's arch (build() makes the same network)."""
    from train.engine import TrainConfig, build_model, load_checkpoint, model_from_checkpoint, \
        save_checkpoint
    from runtime.preprocess import Preprocess
    from train.model import PFLD, build
    torch.manual_seed(0)
    heads = {"300w68": 68, "wflw98": 98}
    narrow = PFLD(0, 0.25, heads=heads).eval()
    for m in narrow.modules():             # non-trivial BN statistics, so the copy is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    meta = {"scheme": "300w68", "preprocess": Preprocess().to_meta()}
    save_checkpoint(tmp_path / "narrow.pt", {"arch": narrow.arch, **meta,
                                             "model": narrow.state_dict()})
    cfg = TrainConfig(width=0.25, neck=64, heads=tuple(heads), init=str(tmp_path / "narrow.pt"))
    wide = build_model(cfg, list(heads)).eval()
    assert wide.arch["neck"] == 64 and wide.s3[0].out_channels == 64 != narrow.s3[0].out_channels
    x = torch.randn(3, 3, 112, 112)
    with torch.inference_mode():
        a, b = narrow.forward_heads(x), wide.forward_heads(x)
        fresh = PFLD(0, 0.25, heads=heads, neck=64).eval().forward_heads(x)
    for k in heads:         # equal up to float order (channels_last); a fresh neck is far off
        assert torch.allclose(a[k], b[k], atol=1e-5)
        assert (a[k] - fresh[k]).abs().max() > 1e-2
    save_checkpoint(tmp_path / "wide.pt", {"arch": wide.arch, **meta, "model": wide.state_dict()})
    again = model_from_checkpoint(load_checkpoint(tmp_path / "wide.pt"))
    assert again.arch == build(wide.arch).arch == wide.arch
    with pytest.raises(ValueError, match="neck wider than 32 channels"):
        build_model(replace(cfg, neck=32, init=str(tmp_path / "wide.pt")), list(heads))
    with pytest.raises(ValueError, match="neck 4: at least 8"):
        PFLD(0, 0.25, heads=heads, neck=4)


def test_widened_tail_keeps_the_function(tmp_path):
    """--tail: an --init with the default 14 x 14 output (8 channels at width 0.5) is widened
    with its 7 x 7 stage and neck, keeping its outputs (the heads read the three stages' features
    side by side, so each segment moves to its new place); the tail travels in the arch and a
    narrower tail is refused."""
    from train.engine import TrainConfig, build_model, load_checkpoint, model_from_checkpoint, \
        save_checkpoint
    from runtime.preprocess import Preprocess
    from train.model import PFLD, build
    torch.manual_seed(0)
    heads = {"300w68": 68, "wflw98": 98}
    narrow = PFLD(0, 0.5, heads=heads).eval()
    for m in narrow.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    meta = {"scheme": "300w68", "preprocess": Preprocess().to_meta()}
    save_checkpoint(tmp_path / "narrow.pt", {"arch": narrow.arch, **meta,
                                             "model": narrow.state_dict()})
    cfg = TrainConfig(width=0.5, neck=96, tail=32, heads=tuple(heads),
                      init=str(tmp_path / "narrow.pt"))
    wide = build_model(cfg, list(heads)).eval()
    assert narrow.s2[0].in_channels == 8
    assert (wide.s2[0].in_channels, wide.s2[0].out_channels, wide.s3[0].out_channels) == (32, 64, 96)
    assert wide.aux[2][0].out_channels == narrow.aux[2][0].out_channels   # the pose branch keeps
    x = torch.randn(3, 3, 112, 112)
    with torch.inference_mode():
        a, b = narrow.forward_heads(x), wide.forward_heads(x)
        fresh = PFLD(0, 0.5, heads=heads, neck=96, tail=32).eval().forward_heads(x)
    for k in heads:
        assert torch.allclose(a[k], b[k], atol=1e-5)
        assert (a[k] - fresh[k]).abs().max() > 1e-2
    save_checkpoint(tmp_path / "wide.pt", {"arch": wide.arch, **meta, "model": wide.state_dict()})
    again = model_from_checkpoint(load_checkpoint(tmp_path / "wide.pt"))
    assert again.arch == build(wide.arch).arch == wide.arch and again.arch["tail"] == 32
    with pytest.raises(ValueError, match="tail wider than 16 cannot be widened"):
        build_model(replace(cfg, tail=16, init=str(tmp_path / "wide.pt")), list(heads))
    with pytest.raises(ValueError, match="tail 4: at least 8"):
        PFLD(0, 0.5, heads=heads, tail=4)
