"""The runtime on whole photos: YuNet as a detector bundle (export, INT8 under a recall budget,
decoding in numpy through the runtime's engines), the photos split, recall matching, the
detection size that follows the image, and the CLI's folder / pattern / tiny-image inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.photos import load_photos, match, part_of, pct, read_images, recall_by_size, rows_to_xyxy
from runtime.bundle import BundleError
from runtime.detector import YUNET_BUNDLE, YUNET_MODEL, YuNetDetector, make_detector
from runtime.detector_bundle import DetectorMeta
from runtime.embedded import description, read_embedded
from runtime.yunet import DETECTION_SIZE, MIN_SIZE, YuNetBundleDetector, target_size

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "runtime" / "run.py")]


@pytest.fixture(scope="module")
def choose():
    photos = load_photos(part="choose")
    return photos, read_images(photos)


def test_photos_split_is_fixed_and_disjoint():
    c, r, a = (load_photos(part=p) for p in ("choose", "report", "all"))
    assert len(a) == 100 and len(c) + len(r) == 100 and len(c) >= 30 and len(r) >= 30
    assert not {p.name for p in c} & {p.name for p in r}
    assert all(part_of(p.name) == "choose" for p in c)
    assert sum(len(p.boxes) for p in a) == 613


def test_match_is_one_to_one_at_the_iou_threshold():
    truth = np.array([[0, 0, 10, 10], [100, 100, 140, 140]], float)
    assert match(np.array([[0, 0, 10, 10], [1, 1, 11, 11]]), truth).tolist() == [True, False]
    assert match(np.array([[5, 5, 15, 15]]), truth).tolist() == [False, False]     # IoU 0.14
    assert match(np.zeros((0, 4)), truth).tolist() == [False, False]


def test_detection_size_follows_the_image():
    assert target_size(1024, 768, DETECTION_SIZE) == 384
    assert target_size(8000, 6000, DETECTION_SIZE) == DETECTION_SIZE
    assert target_size(256, 256, DETECTION_SIZE) == MIN_SIZE
    assert target_size(640, 480, DETECTION_SIZE) == 240
    assert target_size(1024, 768, 0) == 0


def test_numpy_decoding_matches_opencv(choose):
    """The shipped bundle through onnxruntime + numpy decoding gives OpenCV's own detections."""
    from export.detector import reference_rows
    det = YuNetBundleDetector(YUNET_BUNDLE, size=320)
    n = 0
    for img in choose[1][:8]:
        ref, got = reference_rows(img, 320, YUNET_MODEL), det.raw(img)
        assert len(ref) == len(got)
        if len(ref):
            order = lambda r: r[np.lexsort((r[:, 1], r[:, 0]))]  # noqa: E731
            assert np.abs(order(ref)[:, :14] - order(got)[:, :14]).max() < 0.05
        n += len(ref)
    assert n >= 10


def test_default_detector_runs_the_bundle_and_falls_back_to_opencv():
    det = make_detector("yunet")
    assert det.bundle is not None and "onnxruntime" in det.runs_on
    fb = YuNetDetector(YUNET_MODEL)
    assert fb.bundle is None and "fallback" in fb.runs_on
    img = cv2.imread(str(load_photos(part="choose")[0].path))
    a, b = det.rows(img), fb.rows(img)
    assert len(a) == len(b) and (not len(a) or np.abs(a[:, :4] - b[:, :4]).max() < 0.05)


def test_shipped_detector_bundle_carries_its_description():
    meta = DetectorMeta.load(YUNET_BUNDLE)
    assert meta.defaults["size"] == DETECTION_SIZE and meta.defaults["min_size"] == MIN_SIZE
    raw = json.loads((YUNET_BUNDLE / "meta.json").read_text())
    assert read_embedded(meta.model_file) == description(raw)
    assert YuNetBundleDetector(meta.model_file).size == DETECTION_SIZE     # the bare file


def test_a_landmark_bundle_is_not_a_detector(tiny_bundle):
    with pytest.raises(BundleError, match="--detector-model"):
        DetectorMeta.load(tiny_bundle)


@pytest.mark.slow
def test_detector_export_and_int8_within_the_recall_budget(tmp_path):
    """export/detector.py then quantize/detector.py: every bundle parity-checked against
    cv2.FaceDetectorYN; each INT8 bundle within 1 point of its FP32 parent on the choosing
    photos (the budget) and, as reported, on the reporting photos too."""
    from export.detector import export_detector
    from quantize.detector import KEY, quantize_detectors
    rep = export_detector(YUNET_MODEL, tmp_path, echo=lambda s: None)
    assert {k for k, v in rep.items() if v["status"] == "passed"} == {
        "onnx_fp32", "onnx_sim_fp32", "openvino_fp32", "openvino_fp16"}
    assert rep["tflite_fp32"]["status"] == "skipped" and "converter" in rep["tflite_fp32"]["reason"]
    q = quantize_detectors(tmp_path, echo=lambda s: None)
    for name, b in q["bundles"].items():
        assert b["within_budget"], (name, b)
        last = b["steps"][-1]
        assert last["drift_choose_points"] >= -1.0
        assert pct(last["recall_report"][KEY]) >= pct(b["fp32"]["report"][KEY]) - 1.0, name
        meta = DetectorMeta.load(tmp_path / name)
        assert meta.precision == "int8" and meta.quantization["path"] == b["path"]
        raw = json.loads((tmp_path / name / "meta.json").read_text())
        assert read_embedded(meta.model_file) == description(raw)


@pytest.mark.slow
def test_default_pipeline_finds_most_faces_of_64_px_on_the_reporting_photos(tiny_bundle):
    """The README's claim: the default runtime finds >= 80 % of the faces of 64 px and up on
    the reporting part (found: a detection box with IoU >= 0.4). Which faces the pipeline
    reports is the detector's doing (every face up to max_faces), so any landmark bundle
    serves; the tiny one needs no `make quantize` before the tests."""
    from runtime.pipeline import Pipeline
    photos = load_photos(part="report")
    pipe = Pipeline(tiny_bundle, track=False, pose=False, max_faces=50, refine=False)
    found = [np.array([f["detector_box"] for f in pipe.process(im)]).reshape(-1, 4)
             for im in read_images(photos)]
    rec = recall_by_size(photos, found)
    assert pct(rec[">=64"]) >= 80.0, rec


def _run(*args, **kw):
    return subprocess.run(RUN + list(args), check=False, capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_folder_pattern_and_tiny_images(tiny_bundle, tmp_path):
    photos = load_photos(part="choose")[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.path.read_bytes())
    cv2.imwrite(str(folder / "tiny.png"), np.full((8, 8, 3), 128, np.uint8))
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image by suffix")
    res = _run("--model", str(tiny_bundle), "--input", str(folder))
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.returncode == 1                                  # broken.jpg could not be read
    assert [Path(x["file"]).name for x in lines] == sorted(
        [p.name for p in photos] + ["tiny.png", "broken.jpg"])
    by = {Path(x["file"]).name: x for x in lines}
    assert "error" in by["broken.jpg"] and "broken.jpg" in by["broken.jpg"]["error"]
    assert by["tiny.png"]["faces"] == []
    pat = _run("--model", str(tiny_bundle), "--input", str(folder / "*.png"))
    assert pat.returncode == 0 and [Path(json.loads(x)["file"]).name
                                    for x in pat.stdout.splitlines()] == ["tiny.png"]
    tiny = _run("--model", str(tiny_bundle), "--input", str(folder / "tiny.png"))   # one file
    assert tiny.returncode == 0 and json.loads(tiny.stdout)["faces"] == []
    none = _run("--model", str(tiny_bundle), "--input", str(folder / "*.gif"))
    assert none.returncode == 1 and "no file matches" in none.stderr


def test_a_huge_photo_finds_the_same_face(tiny_bundle, tmp_path):
    """The same photo upscaled to 8000 x 6000: the face is found where it is."""
    ph = next(p for p in load_photos(part="choose") if len(p.boxes) == 1 and p.sizes()[0] >= 64)
    img = cv2.imread(str(ph.path))
    big = cv2.resize(img, (8000, 6000), interpolation=cv2.INTER_LINEAR)
    sx, sy = 8000 / img.shape[1], 6000 / img.shape[0]
    det = make_detector("yunet")
    boxes = rows_to_xyxy(det.rows(big))
    truth = ph.boxes * [sx, sy, sx, sy]
    assert match(boxes, truth).all(), (boxes, truth)


def test_the_smallest_detection_size_is_the_one_measured_on_training_crops():
    """MIN_SIZE is the size tools/calibrate_detector.py chose on the 300-W training crops."""
    from runtime.detector import load_calibration
    assert MIN_SIZE == load_calibration()["yunet_max_side"]
