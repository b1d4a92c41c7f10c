"""INT8 detector bundles (onnxruntime QDQ, OpenVINO via NNCF) under a recall budget.

    python quantize/detector.py --bundle-dir artifacts/yunet

Calibration images and the budget use only the choosing part of ../shared/photos
(evaluation.photos); the reporting part is scored and recorded, never used to decide. The
budget: the INT8 bundle's recall of faces of 64 px and up, at the bundles' default detection
size, is within `--budget` points (of 100) of its FP32 parent's. A bundle that misses it tries
the next step of the escalation (the detection heads kept in float), and the report says which
step each bundle took, what it cost in seconds, and the recall at each step.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from common import now  # noqa: E402
from evaluation.photos import detector_recall, load_photos, pct, read_images  # noqa: E402
from runtime.bundle import FileInfo, atomic_write_json, staging_dir  # noqa: E402
from runtime.detector_bundle import DetectorMeta  # noqa: E402
from runtime.errors import LandmarkError  # noqa: E402
from runtime.yunet import YuNetBundleDetector, prepare  # noqa: E402

BUDGET = 1.0          # recall points (of 100) of faces >= 64 px, INT8 vs its FP32 parent
KEY = ">=64"
# the escalation: plain PTQ; asymmetric activations (OpenVINO's "mixed" preset: onnxruntime's
# activations are asymmetric already, so that step is the same for it); the heads in float
STEPS = ("plain", "mixed", "heads-float")
BACKENDS = {"onnxruntime": ("onnx_sim_fp32", "onnx_int8"),
            "openvino": ("openvino_fp32", "openvino_int8")}


def _head_convs(onnx_path: Path) -> list[str]:
    """The Conv nodes whose output feeds a model output through Transpose/Reshape only: the
    detection heads (score, box and point regressions)."""
    import onnx
    m = onnx.load(str(onnx_path))
    producer = {o: n for n in m.graph.node for o in n.output}
    heads = []
    for out in m.graph.output:
        n = producer.get(out.name)
        while n is not None and n.op_type in ("Reshape", "Transpose", "Sigmoid", "Flatten"):
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "Conv" and n.name not in heads:
            heads.append(n.name)
    return heads


def _ort_int8(src: Path, dst: Path, blobs: list[np.ndarray], exclude: list[str],
              mixed: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(blobs)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude)
    return {"tool": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "QUInt8", "weights": "QInt8", "float_nodes": exclude}


def _ov_int8(src: Path, dst: Path, blobs: list[np.ndarray], exclude: list[str],
             mixed: bool = False) -> dict:
    import nncf
    import openvino as ov
    model = ov.Core().read_model(str(src))
    kw = {"ignored_scope": nncf.IgnoredScope(names=exclude, validate=False)} if exclude else {}
    if mixed:
        kw["preset"] = nncf.QuantizationPreset.MIXED
    q = nncf.quantize(model, nncf.Dataset(blobs), subset_size=len(blobs), **kw)
    ov.save_model(q, str(dst), compress_to_fp16=False)
    return {"tool": f"nncf {nncf.__version__} quantize (OpenVINO)", "float_nodes": exclude,
            "preset": "mixed (asymmetric activations)" if mixed else "performance"}


def quantize_detectors(bundle_dir: Path, budget: float = BUDGET, backends=tuple(BACKENDS),
                       echo=print) -> dict:
    choose, report = load_photos(part="choose"), load_photos(part="report")
    ims_c, ims_r = read_images(choose), read_images(report)
    out = {"created": now(), "budget": {"key": KEY, "points": budget,
                                        "judged_on": f"photos choose part ({len(choose)} photos)"},
           "bundles": {}}
    for backend in backends:
        parent_name, name = BACKENDS[backend]
        parent = bundle_dir / parent_name
        pmeta = DetectorMeta.load(parent)
        size = int(pmeta.defaults.get("size", 320))
        resize = pmeta.defaults.get("resize", "linear")
        blobs = [prepare(im, size, resize=resize)[0] for im in ims_c]
        # the FP32 parent at full precision (OpenVINO would run it in bf16 on CPUs with bf16)
        ref = YuNetBundleDetector(parent, precision="f32" if backend == "openvino" else None).raw
        fp32 = {"choose": detector_recall(ref, choose, ims_c),
                "report": detector_recall(ref, report, ims_r)}
        steps = []
        heads = None
        for step in STEPS:
            if step == "mixed" and backend == "onnxruntime":
                continue        # its activations are asymmetric (QUInt8) in the plain step
            if step == "heads-float":
                heads = _head_convs(bundle_dir / "onnx_sim_fp32" / "model.onnx")
            t = time.perf_counter()
            work = Path(tempfile.mkdtemp(dir=bundle_dir, prefix=f".{name}.{step}."))
            try:
                fname = "model.onnx" if backend == "onnxruntime" else "model.xml"
                build = _ort_int8 if backend == "onnxruntime" else _ov_int8
                conv = build(pmeta.model_file, work / fname, blobs, heads or [],
                             mixed=step == "mixed")
                files = {fname: FileInfo("", 0)}
                if fname.endswith(".xml"):
                    files["model.bin"] = FileInfo("", 0)
                meta = DetectorMeta(f"yunet_{name}", backend, "int8", files,
                                    dict(pmeta.input), pmeta.decoder, list(pmeta.outputs),
                                    dict(pmeta.defaults),
                                    {"stage": name, "created": now(),
                                     "source_model": pmeta.lineage.get("source_model"),
                                     "parent": {"target": parent_name, "sha256":
                                                next(iter(pmeta.files.values())).sha256}},
                                    conversion=conv,
                                    architectures=["x86_64"] if backend == "openvino" else None)
                meta.write(work)
                det = YuNetBundleDetector(work).raw
                got = {"choose": detector_recall(det, choose, ims_c),
                       "report": detector_recall(det, report, ims_r)}
                drift = pct(got["choose"][KEY]) - pct(fp32["choose"][KEY])
                ok = drift >= -budget
                rec = {"step": step, "seconds": round(time.perf_counter() - t, 1),
                       "recall_choose": got["choose"], "recall_report": got["report"],
                       "drift_choose_points": round(drift, 2), "within_budget": ok,
                       "float_nodes": len(heads or [])}
                steps.append(rec)
                echo(f"{name} [{step}]: recall >=64 px {pct(got['choose'][KEY]):.1f} % vs FP32 "
                     f"{pct(fp32['choose'][KEY]):.1f} % on the choosing photos "
                     f"({drift:+.2f} points, budget -{budget}) [{rec['seconds']} s]")
                if ok or step == STEPS[-1]:
                    meta.quantization = {"calibration": f"photos choose part, {len(blobs)} "
                                         f"photos at size {size}", "budget": out["budget"],
                                         "steps": steps, "path": step, "fp32_recall": fp32}
                    meta.validation = {"recall": got, "fp32_recall": fp32, "size": size}
                    with staging_dir(bundle_dir / name) as stage:
                        for f in files:
                            shutil.copyfile(work / f, stage / f)
                        meta.write(stage)
                    break
            finally:
                shutil.rmtree(work, ignore_errors=True)
        out["bundles"][name] = {"path": steps[-1]["step"], "steps": steps, "fp32": fp32,
                                "within_budget": steps[-1]["within_budget"]}
    atomic_write_json(bundle_dir / "quantize_report.json", out)
    return out


@click.command(context_settings={"show_default": True})
@click.option("--bundle-dir", default="artifacts/yunet", type=click.Path(file_okay=False),
              help="the detector bundles of export/detector.py")
@click.option("--budget", default=BUDGET, help="recall points (of 100, faces >= 64 px) an INT8 "
              "bundle may lose against its FP32 parent on the choosing photos")
@click.option("--backend", "backends", multiple=True, type=click.Choice(list(BACKENDS)),
              default=tuple(BACKENDS))
def main(bundle_dir, budget, backends):
    """INT8 detector bundles within a recall budget."""
    try:
        rep = quantize_detectors(Path(bundle_dir), budget, backends, echo=click.echo)
    except (LandmarkError, OSError) as e:
        raise click.ClickException(str(e)) from None
    missed = [k for k, v in rep["bundles"].items() if not v["within_budget"]]
    click.echo(json.dumps({k: v["path"] for k, v in rep["bundles"].items()}))
    if missed:
        raise click.ClickException(f"over the recall budget after every step: {', '.join(missed)}")


if __name__ == "__main__":
    main()
