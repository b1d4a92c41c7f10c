"""Export a YuNet face detector to detector bundles: ONNX (any input size) -> simplified ONNX ->
OpenVINO IR (FP32, FP16); every bundle parity-checked against OpenCV's own FaceDetectorYN on
whole photos (the choosing part of ../shared/photos).

    python export/detector.py --model runtime/detectors/face_detection_yunet_2023mar.onnx \
        --out artifacts/yunet

YuNet's published ONNX has a fixed 640 x 640 input, but its graph is size-agnostic (Resize by
scales, Reshape with -1), so the first stage only renames the input's height and width to free
dimensions. TFLite is skipped with its reason: no ONNX -> TFLite converter runs in this
environment (onnx2tf needs a TensorFlow environment of its own), and the runtime falls back to
cv2.FaceDetectorYN where no other engine is installed. Bundles are written atomically.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from common import now  # noqa: E402
from evaluation.photos import iou_matrix, load_photos, read_images, rows_to_xyxy  # noqa: E402
from runtime.bundle import BundleError, FileInfo, sha256, staging_dir  # noqa: E402
from runtime.detector import YUNET_MODEL  # noqa: E402
from runtime.detector_bundle import DetectorMeta  # noqa: E402
from runtime.errors import LandmarkError  # noqa: E402
from runtime.yunet import DETECTION_SIZE, MIN_SIZE, OUTPUTS, SIZE_SCALE, YuNetBundleDetector  # noqa: E402

DEFAULTS = {"size": DETECTION_SIZE, "min_size": MIN_SIZE, "scale": SIZE_SCALE, "resize": "linear",
            "score_threshold": 0.6, "nms_threshold": 0.3}
TARGETS = ("onnx_fp32", "onnx_sim_fp32", "openvino_fp32", "openvino_fp16", "tflite_fp32")
# the largest difference of matched boxes and points: FP32 in image px, FP16 as a fraction of
# the face's box side (half-precision weights move a point by a share of the face, not pixels)
PARITY = {"fp32": ("max_px", 0.05), "fp16": ("max_rel", 0.1)}
PARITY_PHOTOS = 12
OPSET = 13


class DetectorExportError(LandmarkError):
    pass


def _versions(*mods) -> dict:
    out = {}
    for m in mods:
        try:
            out[m] = __import__(m).__version__
        except Exception:  # noqa: BLE001
            out[m] = None
    return out


def dynamic_onnx(src: Path, dst: Path) -> dict:
    """Copy of a YuNet ONNX with a free input height/width (and free output cell counts)."""
    import onnx
    import onnx.version_converter
    try:
        m = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError & co
        raise DetectorExportError(f"{src} is not an ONNX model: {e}") from None
    names = tuple(o.name for o in m.graph.output)
    if names != OUTPUTS or len(m.graph.input) != 1:
        raise DetectorExportError(f"{src} is not a YuNet 2023mar model: outputs {names}, "
                                  f"expected {OUTPUTS}")
    dims = m.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise DetectorExportError(f"{src}: input must be (1, 3, H, W), got "
                                  f"{[d.dim_value or d.dim_param for d in dims]}")
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[1].dim_param = "cells"
    del m.graph.value_info[:]
    old = m.opset_import[0].version
    if old < OPSET:     # per-channel QDQ (DequantizeLinear axis) needs opset 13
        m = onnx.version_converter.convert_version(m, OPSET)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return {"tool": "onnx: input height/width made free", "opset": OPSET,
            "opset_converted_from": old}


def simplify(src: Path, dst: Path) -> dict:
    import onnx
    import onnxsim
    m, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise DetectorExportError(f"onnxsim could not check the simplified {src}")
    onnx.save(m, str(dst))
    return {"tool": f"onnxsim {onnxsim.__version__}", "nodes": len(m.graph.node)}


def to_openvino(src: Path, dst: Path, fp16: bool) -> dict:
    import openvino as ov
    model = ov.convert_model(str(src))
    ov.save_model(model, str(dst), compress_to_fp16=fp16)
    return {"tool": f"openvino {ov.__version__} convert_model", "compress_to_fp16": fp16}


def reference_rows(image: np.ndarray, size: int, model: Path) -> np.ndarray:
    """OpenCV's FaceDetectorYN on the same shrunk image (the runtime's fallback path, at a
    fixed size): the parity reference."""
    from runtime.detector import YuNetDetector
    return YuNetDetector(model, DEFAULTS["score_threshold"], DEFAULTS["nms_threshold"],
                         size=size).rows(image)


def parity(folder: Path, reference: list[np.ndarray], images: list[np.ndarray], size: int,
           engine: str | None = None) -> dict:
    """Detections of a bundle vs the reference: each reference face matched (IoU >= 0.5) and
    the largest difference of box corners and points among the matched, in image px."""
    det = YuNetBundleDetector(folder, size=size, engine=engine,
                              **({"precision": "f32"} if engine == "openvino" else {}))
    worst, rel, missed, extra, n = 0.0, 0.0, 0, 0, 0
    for img, ref in zip(images, reference):
        got = det.raw(img)
        n += len(ref)
        if not len(ref) or not len(got):
            missed += len(ref)
            extra += len(got)
            continue
        m = iou_matrix(rows_to_xyxy(ref), rows_to_xyxy(got))
        j = m.argmax(1)
        ok = m[np.arange(len(ref)), j] >= 0.5
        missed += int((~ok).sum())
        extra += max(0, len(got) - int(ok.sum()))
        if ok.any():
            d = np.abs(ref[ok, :14] - got[j[ok], :14]).max(1)
            worst = max(worst, float(d.max()))
            rel = max(rel, float((d / ref[ok, 2:4].max(1)).max()))
    return {"faces": n, "missed": missed, "extra": extra, "max_px": round(worst, 4),
            "max_rel": round(rel, 5),
            "photos": len(images), "size": size}


@click.command(context_settings={"show_default": True})
@click.option("--model", default=str(YUNET_MODEL), type=click.Path(dir_okay=False),
              help="a YuNet 2023mar ONNX file")
@click.option("--out", default="artifacts/yunet", type=click.Path(file_okay=False),
              help="folder for the detector bundles (one sub-folder each)")
@click.option("--size", default=DEFAULTS["size"], help="detection size written as the bundles' "
              "default (longer image side; benchmark/photos.py measures the choice)")
@click.option("--parity-photos", default=PARITY_PHOTOS, help="photos of the choosing part "
              "used for the parity check")
def main(model, out, size, parity_photos):
    """YuNet -> detector bundles, each parity-checked against cv2.FaceDetectorYN."""
    try:        # a bundle that fails its parity check raises (and is not written)
        export_detector(Path(model), Path(out), size, parity_photos, echo=click.echo)
    except (LandmarkError, OSError) as e:
        raise click.ClickException(str(e)) from None


def export_detector(model: Path, out: Path, size: int = DEFAULTS["size"],
                    parity_photos: int = PARITY_PHOTOS, echo=print) -> dict:
    if not model.is_file():
        raise DetectorExportError(f"detector model {model} does not exist")
    photos = load_photos(part="choose")[:parity_photos]
    images = read_images(photos)
    reference = [reference_rows(im, size, model) for im in images]
    src = {"path": str(model), "sha256": sha256(model)}
    plans = {  # name: (parent, file, engine, precision, build)
        "onnx_fp32": (None, "model.onnx", "onnxruntime", "fp32",
                      lambda parent, dst: dynamic_onnx(model, dst)),
        "onnx_sim_fp32": ("onnx_fp32", "model.onnx", "onnxruntime", "fp32", simplify),
        "openvino_fp32": ("onnx_sim_fp32", "model.xml", "openvino", "fp32",
                          lambda parent, dst: to_openvino(parent, dst, False)),
        "openvino_fp16": ("onnx_sim_fp32", "model.xml", "openvino", "fp16",
                          lambda parent, dst: to_openvino(parent, dst, True)),
    }
    report = {}
    for name, (parent, fname, engine, precision, build) in plans.items():
        t = time.perf_counter()
        final = out / name
        parent_file = out / parent / plans[parent][1] if parent else None
        with staging_dir(final) as tmp:
            conv = build(parent_file, tmp / fname)
            files = {fname: FileInfo("", 0)}
            if fname.endswith(".xml"):
                files["model.bin"] = FileInfo("", 0)
            meta = DetectorMeta(f"yunet_{name}", engine, precision, files, outputs=list(OUTPUTS),
                                defaults=dict(DEFAULTS, size=size),
                                lineage={"stage": name, "created": now(), "source_model": src,
                                         "parent": None if parent is None else {
                                             "target": parent, "sha256": sha256(parent_file)},
                                         "tool_versions": _versions("onnx", "onnxruntime",
                                                                    "openvino", "cv2")},
                                conversion=conv)
            meta.write(tmp)
            par = parity(tmp, reference, images, size, engine)
            key, tol = PARITY[precision]
            ok = par["missed"] == 0 and par["extra"] == 0 and par[key] <= tol
            meta.validation = {"parity": dict(par, reference="cv2.FaceDetectorYN, same "
                                              "shrunk image", tolerance={key: tol},
                                              status="passed" if ok else "failed")}
            meta.write(tmp)
            if not ok:
                raise BundleError(f"{name}: parity with cv2.FaceDetectorYN failed: {par} "
                                  f"(tolerance {key} <= {tol})")
        report[name] = {"status": "passed", "seconds": round(time.perf_counter() - t, 2),
                        "bytes": meta.bytes, **par}
        echo(f"{name}: {meta.bytes / 1024:.0f} KiB, parity {par['faces']} faces on "
             f"{par['photos']} photos, max {par['max_px']} px / {par['max_rel']} of the face "
             f"(tolerance {key} <= {tol}) "
             f"[{report[name]['seconds']} s]")
    report["tflite_fp32"] = {"status": "skipped", "reason": (
        "no ONNX -> TFLite converter runs in this environment (onnx2tf needs a TensorFlow "
        "environment of its own); on a TFLite-only device the runtime falls back to "
        "cv2.FaceDetectorYN with the same decoding and default size")}
    echo(f"tflite_fp32: skipped: {report['tflite_fp32']['reason']}")
    return report


if __name__ == "__main__":
    main()
