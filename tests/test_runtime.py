"""The device runtime: runs from a copied runtime/ folder without torch, gives the same points
as the evaluation path, tracks a video of real faces, and fails cleanly on bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import export_onnx

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "train", "export", "benchmark", "quantize", "evaluation", "common")


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dev_bundle(shipped_checkpoint, tmp_path_factory):
    return export_onnx(shipped_checkpoint, tmp_path_factory.mktemp("dev_bundle") / "dev")


@pytest.fixture(scope="session")
def device(tmp_path_factory, tiny_bundle, dev_bundle):
    """A 'device' folder: a copy of runtime/ and two bundles, and a PYTHONPATH on which
    importing torch (or any other stage of this repo) fails and leaves a marker file."""
    root = tmp_path_factory.mktemp("device")
    shutil.copytree(REPO / "runtime", root / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(tiny_bundle, root / "tiny")
    shutil.copytree(dev_bundle, root / "dev")
    stubs = root.parent / f"{root.name}_stubs"
    for name in FORBIDDEN:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            "import os\n"
            f"open(os.path.join(os.environ['IMPORT_MARKERS'], '{name}'), 'w').close()\n"
            f"raise ImportError('the device runtime must not import {name}')\n")
    markers = root.parent / f"{root.name}_markers"
    markers.mkdir()
    return {"root": root, "stubs": stubs, "markers": markers}


def run_device(device, *args, cwd=None):
    """`python runtime/run.py ARGS` inside the device folder; asserts no forbidden import."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(device["stubs"]), IMPORT_MARKERS=str(device["markers"]),
               PYTHONNOUSERSITE="1")
    p = subprocess.run([sys.executable, "runtime/run.py", *map(str, args)],
                       cwd=cwd or device["root"], env=env, capture_output=True, text=True,
                       timeout=120)
    imported = sorted(os.listdir(device["markers"]))
    assert not imported, f"the runtime imported {imported}:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def lines(p) -> list[dict]:
    return [json.loads(s) for s in p.stdout.splitlines() if s.strip()]


@pytest.fixture(scope="session")
def helen_faces_found(helen_faces):
    """HELEN test faces (not used for the detector calibration, which read 300-W train)."""
    return helen_faces[::30][:8]


# -- runs from a copy, without torch ------------------------------------------------------------
def test_every_runtime_module_imports_without_torch_or_other_stages(device):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(device["stubs"]), IMPORT_MARKERS=str(device["markers"]))
    mods = sorted(p.stem for p in (device["root"] / "runtime").glob("*.py") if p.stem != "__init__")
    code = "import sys; sys.path.insert(0, '.')\n" + "".join(f"import runtime.{m}\n" for m in mods)
    p = subprocess.run([sys.executable, "-c", code], cwd=device["root"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not os.listdir(device["markers"])
    assert {"pipeline", "detector", "tracker", "run", "decode", "bundle"} <= set(mods)


def test_runtime_imports_nothing_outside_itself():
    """Static check of every import in runtime/: the standard library, numpy, OpenCV, click,
    the engines' packages, and runtime itself; no development tools live there."""
    import ast
    allowed = {"numpy", "cv2", "click", "onnxruntime", "openvino", "ai_edge_litert",
               "tflite_runtime", "runtime", "__future__"} | set(sys.stdlib_module_names)
    files = sorted((REPO / "runtime").glob("*.py"))
    assert {f.stem for f in files}.isdisjoint({"measure", "calibrate_detector"})
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module]
            else:
                continue
            for n in names:
                assert n.split(".")[0] in allowed, f"{f.name} imports {n}"
    # calibration is data the runtime reads, shipped with the detector it calibrates
    cal = json.loads((REPO / "runtime" / "detectors" / "calibration.json").read_text())
    assert {"haar", "yunet", "yunet_max_side"} <= set(cal)
    assert (REPO / "runtime" / "detectors" / "LICENSE-yunet").read_text().startswith("MIT License")


def test_image_from_copied_folder_matches_evaluation_path(device, dev_bundle, wflw_faces,
                                                          helen_faces_found, tmp_path):
    """The pipeline's points are exactly what evaluation.metrics.predict_faces (the evaluation and
    benchmark path, same engine) gives for the crop box the pipeline reports, with and without
    the second (refine) pass; and run.py from the copied folder prints the same (to the 0.01 px
    of its JSON)."""
    from evaluation.data import Face
    from evaluation.metrics import predict_faces
    from runtime.decode import Landmarker
    from runtime.pipeline import Pipeline
    engine = Landmarker.open(dev_bundle)
    pre = engine.pre
    checked = 0
    for i, face in enumerate(list(helen_faces_found[:3]) + wflw_faces[:3]):
        img = tmp_path / f"face{i}.jpg"        # run from an unrelated working folder
        shutil.copy(face.image_path, img)
        for refine in (True, False, "auto"):
            ours = Pipeline(dev_bundle, track=False, refine=refine).process(cv2.imread(str(img)))
            p = run_device(device, "--model", device["root"] / "dev", "--input", img,
                           "--refine", {True: "on", False: "off"}.get(refine, refine))
            assert p.returncode == 0, p.stderr
            (line,) = lines(p)
            assert line["frame"] == 0 and set(line["ms"]) >= {"detect", "crop", "landmarks", "pose"}
            assert len(line["faces"]) == len(ours)
            for f, g in zip(ours, line["faces"]):
                if not f["angle"]:
                    ref = predict_faces(engine, [Face(img, np.zeros((68, 2)), np.array(f["box"]))],
                                        pre, protocol="rect")[0]
                else:     # a levelled crop: the same preprocessing, rotated by the face's roll
                    m = pre.crop_matrix(f["box"], angle=f["angle"])
                    x = pre.normalize(pre.crop(cv2.imread(str(img)), m))
                    ref = pre.decode(engine(x), [m])[0]
                assert f["points"].shape == (68, 2)
                assert np.abs(f["points"] - ref).max() < 1e-6, (face.source, refine)
                assert np.abs(np.array(g["points"]) - f["points"]).max() <= 0.006
                assert np.abs(np.array(g["box"]) - f["box"]).max() <= 0.006
                assert set(g["pose"]) == {"yaw", "pitch", "roll"}
                checked += 1
    assert checked >= 8       # the detector found most of these real faces


def test_dev_model_points_land_on_the_face(dev_bundle, helen_faces_found):
    from runtime.pipeline import Pipeline
    from runtime.preprocess import landmark_box
    pipe = Pipeline(dev_bundle, track=False)
    found = 0
    for face in helen_faces_found:
        faces = pipe.process(face.image())
        if not faces:
            continue
        found += 1
        x0, y0, x1, y1 = landmark_box(face.points)
        m = 0.25 * max(x1 - x0, y1 - y0)
        c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])      # every face is reported: take this one
        p = min((f["points"] for f in faces), key=lambda q: np.linalg.norm(q.mean(0) - c))
        inside = ((p[:, 0] > x0 - m) & (p[:, 0] < x1 + m) & (p[:, 1] > y0 - m) & (p[:, 1] < y1 + m))
        assert inside.mean() > 0.9, face.source
        assert np.all(np.isfinite(list(faces[0]["pose"].values())))
    assert found >= len(helen_faces_found) - 2


@pytest.mark.parametrize("name", ["yunet", "haar"])
def test_detector_calibration_brings_boxes_to_the_landmark_extent(helen_faces_found, name):
    """On faces the constants were not measured on, calibrated boxes overlap the landmark
    extent better than the detector's own boxes."""
    from runtime.detector import iou, make_detector
    from runtime.preprocess import landmark_box
    det = make_detector(name)
    raw, cal = [], []
    for face in helen_faces_found:
        d = det.detect(face.image())
        if d:
            gt = landmark_box(face.points)
            raw.append(iou(d[0].raw, gt))
            cal.append(iou(d[0].box, gt))
    assert len(cal) >= 5
    assert np.median(cal) > np.median(raw)
    assert np.median(cal) > 0.6


def test_levelled_crop_of_a_tilted_face(dev_bundle, helen_faces_found):
    """A face rolled by 35 degrees: YuNet's eye points give the roll, the crop is cut upright
    and the points come back onto the tilted face; better than the axis-aligned crop."""
    from runtime.pipeline import Pipeline
    errs = {True: [], False: []}
    for face in helen_faces_found[:6]:
        img = face.image()
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 35, 1.0)
        rolled = cv2.warpAffine(img, m, (w, h), borderValue=(90, 90, 90))
        gt = face.points @ m[:, :2].T + m[:, 2]
        eye = np.linalg.norm(gt[36] - gt[45])
        for level in (True, False):
            faces = Pipeline(dev_bundle, track=False, level=level).process(rolled)
            assert faces, (face.source, level)
            if level:     # the crop was turned towards the face's roll (y down: negative)
                from runtime.preprocess import roll
                assert faces[0]["angle"] < -20
                assert abs(roll(faces[0]["points"], (36, 45)) - roll(gt, (36, 45))) < 12
            errs[level].append(np.linalg.norm(faces[0]["points"] - gt, axis=-1).mean() / eye)
    assert np.mean(errs[True]) < 0.08 and np.mean(errs[True]) < np.mean(errs[False])


def test_yaw_coefficient_and_pose_solver():
    from runtime.pose import yaw_coefficient
    assert yaw_coefficient(0) < 0.001 and abs(yaw_coefficient(45) - 0.5) < 1e-9
    assert yaw_coefficient(-90) > 0.999 and yaw_coefficient(120) == yaw_coefficient(90)
    assert yaw_coefficient(30) < yaw_coefficient(-40) < yaw_coefficient(60)


# -- video ------------------------------------------------------------------------------------
def make_clip(face, path: Path, n: int = 20, size: int = 320):
    """n frames of one real face crop, shifted and scaled a little each frame; MJPG .avi."""
    img = face.image()
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (size, size))
    truth = []
    for i in range(n):
        s = 200 / img.shape[1] * (1 + 0.01 * i)
        m = np.array([[s, 0, 40 + 2.0 * i], [0, s, 30 + 1.0 * i]])
        w.write(cv2.warpAffine(img, m, (size, size), borderValue=(90, 90, 90)))
        truth.append(face.points @ m[:, :2].T + m[:, 2])
    w.release()
    return truth


def _trained(checkpoint: Path, nme: float = 0.10) -> bool:
    """Has the checkpoint's own validation NME reached `nme`?"""
    import torch
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hist = ck.get("history") or [{}]
    return hist[-1].get("val", {}).get("nme", 1.0) <= nme


def test_video_is_tracked_end_to_end(device, helen_faces_found, tmp_path):
    clip = tmp_path / "clip.avi"
    truth = make_clip(helen_faces_found[0], clip)
    out = tmp_path / "drawn.avi"
    p = run_device(device, "--model", device["root"] / "dev", "--input", clip, "--draw", out)
    assert p.returncode == 0, p.stderr
    res = lines(p)
    assert [r["frame"] for r in res] == list(range(len(truth)))
    assert all(len(r["faces"]) == 1 for r in res)
    sources = [r["faces"][0]["source"] for r in res]
    assert sources[0] == "detect" and sources.count("detect") < len(res)
    runs = sum(r["ms"]["detect"] > 0 for r in res)
    assert runs < len(res) and f"detector ran on {runs}" in p.stderr
    assert len({r["faces"][0]["track"] for r in res}) <= runs
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(truth)
    cap.release()
    f = res[0]["faces"][0]
    assert 0.0 <= f["yaw_coefficient"] <= 1.0 and isinstance(f["angle"], float)
    assert set(f["pose"]) == {"yaw", "pitch", "roll"}


def test_a_stream_that_fails_midway_ends_with_a_message(device, helen_faces_found, tmp_path):
    clip = tmp_path / "clip.avi"
    make_clip(helen_faces_found[0], clip, n=20)
    data = clip.read_bytes()
    clip.write_bytes(data[:len(data) // 2])              # the file stops mid-stream
    p = run_device(device, "--model", device["root"] / "dev", "--input", clip)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    n = len(lines(p))
    assert 0 < n < 20 and f"the stream ended after {n} frames of 20" in p.stderr


def test_tracked_points_follow_the_face(dev_bundle, shipped_checkpoint, helen_faces_found,
                                        tmp_path):
    """With tracking, the points stay on a moving, growing face (centroid error small against
    the face size) while the detector runs on few frames."""
    if not _trained(shipped_checkpoint):
        pytest.skip(f"{shipped_checkpoint.name} is not trained far enough to track a face")
    from runtime.media import open_video
    from runtime.pipeline import Pipeline
    pipe = Pipeline(dev_bundle)
    for face in helen_faces_found[:2]:
        clip = tmp_path / "clip.avi"
        truth = make_clip(face, clip)
        cap, _, _ = open_video(str(clip))
        pipe.reset()
        for gt in truth:
            ok, frame = cap.read()
            (f,) = pipe.process(frame)
            side = np.ptp(gt, 0).max()
            assert np.linalg.norm(f["points"].mean(0) - gt.mean(0)) < 0.1 * side, face.source
        assert pipe.detector_runs <= 3
        cap.release()


def test_tracking_rules(dev_bundle, helen_faces_found):
    """Tracking needs fewer detector runs than frames; a face that is gone is dropped within
    check_every x max_unconfirmed frames and the detector runs on every frame again; points
    that leave the frame lose the track at once; --no-track detects every frame."""
    from runtime.pipeline import Pipeline
    from runtime.tracker import Track, Tracker, TrackerConfig
    img = helen_faces_found[1].image()
    frame = cv2.copyMakeBorder(img, 60, 60, 60, 60, cv2.BORDER_CONSTANT, value=(90, 90, 90))
    pipe = Pipeline(dev_bundle, tracker=TrackerConfig(check_every=4, max_unconfirmed=2))
    for _ in range(6):
        assert len(pipe.process(frame)) == 1
    assert pipe.detector_runs == 2                      # frame 0 and the check at frame 4
    blank = np.full_like(frame, 90)
    runs = []
    for _ in range(12):
        faces = pipe.process(blank)
        runs.append(pipe.detector_runs)
    assert not faces and runs[-1] - runs[-3] == 2       # back to detecting on every frame
    pipe = Pipeline(dev_bundle, track=False)
    for _ in range(3):
        pipe.process(frame)
    assert pipe.detector_runs == 3
    tr = Tracker()
    t = Track(0, (10, 10, 60, 60))
    tr.tracks.append(t)
    pts = np.random.default_rng(0).uniform(10, 60, (68, 2))
    assert tr.update(t, pts, (100, 100), 0.0) is not None
    t.fresh = False
    assert tr.update(t, pts + 200, (100, 100), 0.1) is None and not tr.tracks


def test_two_faces_are_tracked_separately(dev_bundle, helen_faces_found):
    from runtime.pipeline import Pipeline
    a, b = (cv2.resize(f.image(), (200, 200)) for f in helen_faces_found[:2])
    frame = cv2.copyMakeBorder(np.hstack([a, b]), 40, 40, 40, 40, cv2.BORDER_CONSTANT,
                               value=(90, 90, 90))
    both = Pipeline(dev_bundle, track=False).process(frame)
    assert len(both) == 2                                  # every face by default
    assert len(Pipeline(dev_bundle, track=False, max_faces=1).process(frame)) == 1
    pipe = Pipeline(dev_bundle)
    for _ in range(4):
        faces = pipe.process(frame)
        assert len(faces) == 2 and len({f["track"] for f in faces}) == 2
        xs = sorted(f["points"][:, 0].mean() for f in faces)
        assert xs[0] < 40 + 200 < xs[1]                    # one on each face
    assert pipe.detector_runs == 1


def test_one_euro_filter_smooths_a_still_face_and_follows_a_moving_one():
    from runtime.tracker import OneEuroFilter
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 200, (68, 2))
    f = OneEuroFilter()
    noisy = [base + rng.normal(0, 1.0, base.shape) for _ in range(60)]
    out = [f(x, i / 30, scale=100) for i, x in enumerate(noisy)]
    assert np.std(np.array(out[30:]) - base) < 0.5 * np.std(np.array(noisy[30:]) - base)
    f = OneEuroFilter()
    for i in range(60):          # 2 face sides per second
        x = base + [200 / 30 * i, 0]
        y = f(x, i / 30, scale=100)
    assert np.abs(y - x).max() < 0.1 * 100


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_jpg(helen_faces_found):
    return helen_faces_found[0].image_path


def _fails(p, *needles):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_missing_and_corrupt_bundles_fail_cleanly(device, face_jpg, tmp_path):
    tiny = device["root"] / "tiny"
    _fails(run_device(device, "--model", tmp_path / "nope", "--input", face_jpg), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(run_device(device, "--model", empty, "--input", face_jpg), "meta.json")
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    _fails(run_device(device, "--model", bad, "--input", face_jpg), "sha256")
    _fails(run_device(device, "--model", tiny, "--input", face_jpg, "--engine", "openvino"),
           ".onnx")


def test_unreadable_inputs_fail_cleanly(device, tmp_path):
    tiny = device["root"] / "tiny"
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image" * 50)
    _fails(run_device(device, "--model", tiny, "--input", junk), str(junk))
    _fails(run_device(device, "--model", tiny, "--input", tmp_path / "missing.jpg"),
           "does not exist")
    _fails(run_device(device, "--model", tiny, "--input", "97"), "camera 97 cannot be opened")


def test_gray_and_alpha_images_are_converted_and_said_so(device, face_jpg, tmp_path):
    img = cv2.imread(str(face_jpg))
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    cv2.imwrite(str(gray), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(rgba), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    for path, word in ((gray, "grayscale"), (rgba, "alpha")):
        p = run_device(device, "--model", device["root"] / "tiny", "--input", path)
        assert p.returncode == 0, p.stderr
        assert word in p.stderr
        assert len(lines(p)[0]["faces"]) == 1


def test_no_face_is_an_empty_answer_not_an_error(device, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    drawn = tmp_path / "wall_drawn.jpg"
    p = run_device(device, "--model", device["root"] / "tiny", "--input", blank, "--draw", drawn)
    assert p.returncode == 0, p.stderr
    assert lines(p) == [{"frame": 0, "faces": [], "ms": lines(p)[0]["ms"]}]
    assert "no face found" in p.stderr
    assert cv2.imread(str(drawn)).shape == (240, 320, 3)


def test_bad_detector_and_output_options_fail_cleanly(device, face_jpg, tmp_path):
    tiny = device["root"] / "tiny"
    _fails(run_device(device, "--model", tiny, "--input", face_jpg, "--detector-model",
                      tmp_path / "none.onnx"), "none.onnx does not exist")
    _fails(run_device(device, "--model", tiny, "--input", face_jpg, "--detector", "yunet",
                      "--detector-model", tiny / "model.onnx"), "YuNet")
    _fails(run_device(device, "--model", tiny, "--input", face_jpg, "--draw", tmp_path / "x.xyz"),
           "x.xyz")


def test_missing_haar_cascades_give_a_clear_error(monkeypatch, tmp_path):
    from runtime import detector as D
    monkeypatch.setattr(D.cv2.data, "haarcascades", str(tmp_path) + "/")
    with pytest.raises(D.DetectorError, match="opencv-python-headless 4.x"):
        D.HaarDetector()
    monkeypatch.delattr(D.cv2.data, "haarcascades")
    with pytest.raises(D.DetectorError, match="OpenCV 5.x"):
        D.HaarDetector()


# -- measuring ----------------------------------------------------------------------------------
def test_measure_video_reports_stage_split(device, helen_faces_found, tmp_path):
    clip = tmp_path / "m.avi"
    make_clip(helen_faces_found[0], clip, n=12)
    out = tmp_path / "rec.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(device["stubs"]), IMPORT_MARKERS=str(device["markers"]))
    p = subprocess.run([sys.executable, str(REPO / "benchmark" / "runtime_measure.py"), "video",
                        "--model", str(device["root"] / "dev"), "--video", str(clip),
                        "--warmup", "2", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())["records"]
    assert [r["track"] for r in recs] == [True, False]
    on, off = recs
    assert on["frames"] == off["frames"] == 10
    assert on["detector_runs"] < off["detector_runs"] == 12
    assert all(on["ms"][k]["median"] is not None for k in ("detect", "crop", "landmarks", "pose"))
    assert "| onnxruntime fp32 | on |" in p.stdout


# -- device requirements --------------------------------------------------------------------------
def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            out[name.strip().lower()] = ver.strip()
    return out


def test_device_requirements_pin_what_the_project_pins_and_cover_every_engine():
    from runtime.engines import ENGINES
    root = _pins(REPO / "requirements.txt")
    files = sorted((REPO / "runtime").glob("requirements*.txt"))
    assert len(files) >= 2
    engines = set()
    for f in files:
        pins = _pins(f)
        assert {"numpy", "opencv-python-headless", "click"} <= set(pins), f.name
        assert pins["opencv-python-headless"].startswith("4."), "5.x has no Haar cascades"
        for name, ver in pins.items():
            assert root.get(name, ver) == ver, \
                f"{f.name}: {name}=={ver}, requirements.txt {root[name]}"
            assert name not in FORBIDDEN, f"{f.name} installs {name}"
        engines |= set(pins)
    device = [e for e in ENGINES.values() if e.name != "torch"]
    assert all(e.package in engines for e in device), [e.package for e in device]
    assert "ai-edge-litert" in _pins(REPO / "runtime" / "requirements.txt")   # the default


def test_measure_images_reports_found_share(device, helen_faces_found, tmp_path):
    for i, f in enumerate(helen_faces_found[:4]):
        shutil.copy(f.image_path, tmp_path / f"face{i}.jpg")
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((200, 200, 3), 128, np.uint8))
    out = tmp_path / "rec.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmark" / "runtime_measure.py"), "images",
                        "--model", str(device["root"] / "tiny"), "--images", str(tmp_path),
                        "--warmup", "1", "--clock", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["images"] == 5 and rec["found"] == 4 and rec["found_share"] == 0.8
    assert rec["clock"] == "cpu" and rec["ms_per_image"]["median"] > 0
    assert sum(rec["found_by_stage"].values()) == 4
