"""Export: a training checkpoint or an outside landmark model -> verified, deployable bundles.

Every target is one entry of TARGETS (what it is converted from, which engine runs it, its
precision, its parity tolerance and the function that builds it). `export_all` (a checkpoint)
and `import_model` (an outside ONNX/TFLite file described by a spec JSON) build the requested
targets plus whatever they are converted from or checked against, in registry order. Each
bundle is assembled in a staging folder (runtime.bundle.staging_dir), then its model is run
through the runtime's engines and decoders next to its reference on the same real faces; a
difference over the tolerance, on any output, raises ExportError and the staging folder is
thrown away, so no unverified artifact is ever left in place.

    from export.stages import export_all, import_model
    export_all("models/pfld68_w05.pt", "artifacts/pfld68_w05")            # all six targets
    export_all(ckpt, out, targets=["tflite_fp16"])     # + tflite_fp32, onnx_sim_fp32, onnx_fp32
    import_model("ghost.onnx", "specs/pfld_ghostone.json", "artifacts/pfld_ghostone")

Lineage: onnx_fp32 <- the source (torch export of a checkpoint, or the imported file as is);
onnx_sim_fp32 <- onnx_fp32; openvino_* <- onnx_sim_fp32; tflite_fp32 <- the source
(litert-torch converts from torch; an imported .tflite is taken as is; an imported ONNX has no
converter in this environment and the target is skipped, saying so); tflite_fp16 <- tflite_fp32
(weights cast to float16 by ai-edge-quantizer). The simplified ONNX is the verified graph every
other backend is compared to; where it does not exist, the source itself is.

A multi-head network exports to one graph with one output per head; every output is checked.

The parts: export.base (errors, constants, Target / Source / Job), export.targets (the
conversions and TARGETS), export.sources (checkpoint and imported-model sources and their
checks), export.parity (the parity faces and check); this module plans and runs the export
and re-exports their public names.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from common import now, package_versions, quiet
from export.base import (HEATMAP_RAW_FACTOR, REPORT, SOURCE, ExportError, ExportInputError, Job,
                         Source, Target, TargetSkipped, _display)
from export.base import PARITY_SETS, REPO, TOL_FP16, TOL_FP32  # noqa: F401 - re-exported
from export.parity import _match_outputs, _ref_record, parity, parity_faces
from export.sources import checkpoint_source, import_source
from export.sources import load_model  # noqa: F401 - re-exported
from export.targets import TARGETS
from export.targets import build_onnx, build_onnx_sim  # noqa: F401 - re-exported
from export.targets import build_openvino_fp16, build_openvino_fp32  # noqa: F401 - re-exported
from export.targets import build_tflite_fp16, build_tflite_fp32  # noqa: F401 - re-exported
from runtime.bundle import (BundleError, BundleMeta, InputSpec, Lineage, atomic_write_json,
                            staging_dir)


# -- orchestration --------------------------------------------------------------------------
def plan(targets=None) -> list[str]:
    """Requested targets plus the ones they are converted from or checked against, in order."""
    wanted = list(TARGETS) if targets is None else list(targets)
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown or not wanted:
        raise ExportInputError(f"unknown export target(s) {', '.join(unknown) or '(none given)'}; "
                               f"known: {', '.join(TARGETS)}")
    need, todo = set(), list(wanted)
    while todo:
        t = todo.pop()
        if t not in need:
            need.add(t)
            todo += [d for d in (TARGETS[t].parent, TARGETS[t].checked_against) if d]
    return [t for t in TARGETS if t in need]


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and prove it writable with a real file (root ignores mode bits)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportInputError(f"output folder {out_dir} is not writable: "
                               f"{e.strerror or e}") from None


def _reusable(job: Job, name: str) -> BundleMeta | None:
    """An existing bundle made from this source with these settings, intact on disk."""
    folder = job.out_dir / name
    if not folder.is_dir():
        return None
    try:
        meta = BundleMeta.load(folder)
    except BundleError:
        return None
    root = meta.lineage.source_checkpoint or meta.lineage.source_model or {}
    if meta.stage != name or root.get("sha256") != job.source.sha \
            or meta.export != {"opset": job.opset, "batch": job.batch} \
            or not meta.validation.get("passed"):
        return None
    t = TARGETS[name]
    for dep, record in ((t.parent, meta.lineage.parent or {}),
                        (t.checked_against, meta.validation.get("checked_against", {}))):
        if dep and dep not in job.skipped and (
                dep not in job.bundles or _ref_record(job, dep)["sha256"] != record.get("sha256")):
            return None      # made from (or checked against) a bundle that has since changed
    return meta


def _build(job: Job, target: Target) -> tuple[BundleMeta, float, float]:
    """Convert, check and write one bundle: (meta, wall seconds, CPU seconds of this process)."""
    final = job.out_dir / target.name
    t0, c0 = time.perf_counter(), time.process_time()
    with staging_dir(final) as tmp:
        src = BundleMeta.load(job.bundles[target.parent]).model_file if target.parent else None
        try:
            with quiet():
                spec = target.build(job, tmp, src)
        except (ExportError, TargetSkipped):
            raise
        except Exception as e:  # noqa: BLE001 - converters raise anything; name the stage
            raise ExportError(f"{target.name}: conversion failed: {type(e).__name__}: {e}"
                              + "".join(f"\n{n}" for n in getattr(e, "__notes__", []))) from e
        spec["_folder"] = tmp
        parent = ({"target": SOURCE, "path": None, "sha256": job.source.sha}
                  if target.parent is None else _ref_record(job, target.parent))
        parent.pop("engine", None)
        layout = spec["input"].get("layout", job.source.input.layout)
        meta = BundleMeta(
            name=job.out_dir.name, engine=target.engine, precision=target.precision,
            files=BundleMeta.files_of(*spec["files"]), preprocess=job.source.preprocess,
            outputs=_match_outputs(job, target, spec),
            input=InputSpec(spec["input"]["name"], layout, spec["input"]["shape"],
                            spec["input"]["dtype"]),
            opset=spec["opset"],
            lineage=Lineage(stage=target.name, parent=parent, created=now(),
                            tool_versions=package_versions(target.tools), **job.source.lineage()),
            conversion=spec.get("conversion", {}),
            export={"opset": job.opset, "batch": job.batch})
        meta.write(tmp)
        meta.validation = parity(job, target, meta)
        meta.write(tmp)
    return BundleMeta.load(final), time.perf_counter() - t0, time.process_time() - c0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _check_packages(order: list[str]) -> None:
    missing = {pkg for t in order for mod, pkg in TARGETS[t].needs
               if importlib.util.find_spec(mod) is None}
    if missing:
        pkgs = sorted(missing)
        raise ExportInputError(f"targets {', '.join(order)} need the Python package(s) "
                               f"{', '.join(pkgs)} (pip install {' '.join(pkgs)})")


def export_all(checkpoint: str | Path, out_dir: str | Path, targets=None, opset: int = 18,
               dynamic_batch: bool = True, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Build, verify and write the requested targets (default: all) of a checkpoint and what
    they depend on. Returns {target: bundle folder}; writes <out_dir>/export_report.json (also
    when a target fails, with the error)."""
    order = plan(targets)
    _check_packages(order)
    return _export(checkpoint_source(checkpoint), Path(out_dir), order, targets, opset,
                   dynamic_batch, progress)


def import_model(model_file: str | Path, spec: str | Path, out_dir: str | Path, targets=None,
                 progress: Callable[[str], None] = print) -> dict[str, Path]:
    """An outside landmark model (ONNX or TFLite) and its spec -> the same verified bundles:
    the file itself as onnx_fp32 (or tflite_fp32), then every conversion that exists here."""
    order = plan(targets)
    src = import_source(model_file, spec)
    needs = [t for t in order if not (t == "tflite_fp32" and Path(model_file).suffix == ".onnx")]
    _check_packages(needs)
    return _export(src, Path(out_dir), order, targets, 18, True, progress)


def _export(source: Source, out_dir: Path, order: list[str], targets, opset: int,
            dynamic_batch: bool, progress) -> dict[str, Path]:
    t_start, c_start = time.perf_counter(), time.process_time()
    check_out_dir(out_dir)
    faces, face_sets = parity_faces(source.preprocess)
    job = Job(source, out_dir, int(opset), bool(dynamic_batch), faces, face_sets)
    report = {"model": out_dir.name, "source": {"kind": source.kind, **source.lineage()},
              "opset": job.opset, "batch": job.batch, "faces": face_sets, "targets": {},
              "status": "running"}
    progress(f"{'export' if source.kind == 'checkpoint' else 'import'} {_display(source.path)} -> "
             f"{_display(out_dir)}: {', '.join(order)} (parity on {len(faces)} real faces)")
    try:
        for i, name in enumerate(order, 1):
            _export_target(job, name, f"[{i}/{len(order)}] {name}", targets, report, progress)
        report["status"] = "ok"
    except ExportError as e:
        report["status"], report["error"] = "failed", str(e)
        raise
    finally:
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        report["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
        report["created"] = now()
        report["tool_versions"] = package_versions(sorted({v for t in order for v in TARGETS[t].tools}))
        if report["status"] != "running":
            atomic_write_json(out_dir / REPORT, report)
    progress(f"done in {report['total_seconds']:.1f} s (cpu {report['total_cpu_seconds']:.1f} s); "
             f"report {_display(out_dir / REPORT)}")
    return dict(job.bundles)


def _export_target(job: Job, name: str, step: str, targets, report: dict, progress) -> None:
    """Reuse, build or skip one target, and record it in the report."""
    target = TARGETS[name]
    blocked = [d for d in (target.parent,) if d and d in job.skipped]
    if blocked:
        job.skipped[name] = f"needs {blocked[0]}, which was skipped"
        report["targets"][name] = {"status": "skipped", "reason": job.skipped[name]}
        progress(f"{step} ... skipped: {job.skipped[name]}")
        return
    meta = None if name in (targets or TARGETS) else _reusable(job, name)
    reused = meta is not None
    if reused:
        seconds = cpu = 0.0
        progress(f"{step} ... reused existing bundle (same source and settings)")
    else:
        progress(f"{step} ...")
        try:
            meta, seconds, cpu = _build(job, target)
        except TargetSkipped as e:
            job.skipped[name] = str(e)
            report["targets"][name] = {"status": "skipped", "reason": str(e)}
            progress(f"      skipped: {e}")
            return
    job.bundles[name] = job.out_dir / name
    v = meta.validation
    report["targets"][name] = {
        "status": "ok", "path": _display(job.out_dir / name), "bytes": meta.bytes,
        "files": {k: f.bytes for k, f in meta.files.items()},
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
        "max_abs_diff": v["max_abs_diff"], "outputs": v["outputs"],
        "tolerance": v["tolerance"], "checked_against": v["checked_against"]["target"],
        "faces": v["faces"], "engine": meta.engine, "precision": meta.precision,
        "input_shape": meta.input.shape, "reused": reused}
    if not reused:
        hm = [o for o in v["outputs"].values() if "raw_max_abs_diff" in o]
        diff = (f"max |diff| {v['max_abs_diff']:.1e} <= {v['tolerance']:.0e}" if not hm else
                f"heatmaps max |diff| {max(o['raw_max_abs_diff'] for o in hm):.1e} <= "
                f"{v['tolerance'] * HEATMAP_RAW_FACTOR:.0e}, points mean "
                f"{max(o['mean_abs_diff'] for o in hm):.1e} <= {v['tolerance']:.0e}, max "
                f"{v['max_abs_diff']:.1e} <= {hm[0]['points_max_allowed']:.1e} (1 heatmap px)")
        progress(f"      {seconds:.1f} s (cpu {cpu:.1f} s), {_fmt_bytes(meta.bytes)}, {diff} vs "
                 f"{v['checked_against']['target']} on {v['faces']} faces")
