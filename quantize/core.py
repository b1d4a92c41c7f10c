"""Post-training INT8 quantization of FP32 bundles, judged by NME drift on real faces.

    from quantize.core import Settings, run
    report, failed = run("artifacts/pfld68_w05", ["onnxruntime", "openvino", "tflite"], Settings())

For each backend of quantize.backends.BACKENDS:

1. Start from its FP32 bundle in the bundle folder (backend.parents, first that exists).
2. Calibration crops: the faces of the calibration set (default `wflw:calib`, see
   evaluation.sets: about 200 WFLW *train* faces, not the held-out ones, no test face), the
   first --calib-samples of them in annotation order, cut by evaluation.metrics.face_batch with
   the parent bundle's preprocessing and the set's crop protocol ("landmarks": the train
   list's rectangle is the landmark extent, not a detector box).
3. Quantize every layer; score the FP32 and the INT8 model through the runtime's engines and
   decoders (runtime.decode.Landmarker) with evaluation.metrics.evaluate on the gated sets
   (default: the ~195 held-out WFLW train faces, `wflw:heldout`, which calibration never sees
   and training only selects on: every choice here is made on training faces). A model with several outputs (one
   head per point scheme) is scored with each: its native head per set and the 68-point
   figure on WFLW ("@68", evaluation.sets.scorings); the budget applies to all of them.
4. If |drift| > budget, escalate (quantize.search.fit_budget), each step only when the one
   before misses: the backend's better PTQ (histogram ranges; on onnxruntime also the graph
   fixes), then the float fallback: rank the ops the quantizer quantized by sensitivity (each
   quantized alone, everything else float, scored on the calibration faces, which have ground
   truth: its NME drift against FP32 per crop protocol), then keep ops in float one at a time,
   each time the one whose own drift pushes hardest in the direction of the worst gated drift,
   until the budget holds or `max_float_layers` are float. Then, for a bundle exported from
   a checkpoint that is still here (same sha256), quantization-aware training (quantize.qat:
   a fake-quantized fine-tune, re-exported to the parent's stage, quantized with the best
   step's options); an imported model records why it has none. If the budget never holds
   the backend fails: no bundle is written (it is assembled in runtime.bundle.staging_dir)
   and run() reports it. The report and meta.json record the path taken, the seconds and the
   drift of every step ("escalation").
5. Write the INT8 bundle (meta.json: calibration set, method, settings, layers kept in float,
   drift figures) and score it again as shipped, reported only: the 505 WFLW test faces with
   both crop protocols (overall and per attribute), the 330 HELEN test faces ("landmarks" protocol),
   size ratio, and batch-1 latency ratio (median of interleaved FP32/INT8 runs, 1 thread).

Units: "nme" values are fractions of the outer-eye-corner distance (0.0450 = 4.50 %).
Drift and the budget are in NME points (percentage points): budget 0.10 means
|NME_int8 - NME_fp32| <= 0.0010, e.g. FP32 4.50 % -> INT8 must land in 4.40 .. 4.60 %.
By default (drift_faces "all", the issue's rule) the drift is NME_int8 - NME_fp32 of the set
means over every evaluation face; "ok" takes the mean per-face NME change over the faces the
FP32 model localises (FP32 NME <= 0.10, the FR threshold) only, which ignores the noise of
failed faces. Both are always reported (see quantize.scoring.drift()).
The budget applies to the held-out WFLW train faces (GATE_SETS); the test sets are reported,
never chosen on (the benchmark gate checks their drift again). Landmark crops, not rect: on rect
crops a model fails on many WFLW faces, and INT8 noise helps some of them and hurts others, so
a real loss on well-predicted faces can cancel out in the rect mean.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from common import host_info, now, package_versions
from evaluation.metrics import face_batch
from quantize.backends import BACKENDS, PRESETS, Backend, Layer, QuantizeError, get_backend
from quantize.data import (  # noqa: F401 - re-exported
    CALIB_SET,
    EVAL_SETS,
    GATE_SETS,
    MIN_CALIB_FACES,
    Data,
    EvalSet,
    Log,
    Settings,
    figures,
    load_data,
)
from quantize.scoring import (
    DRIFT_FACES,
    FAIL_NME,
    MIN_DRIFT_FACES,
    compare,
    drift,  # noqa: F401 - re-exported
    measure_latency,
    score,
    within,
)
from quantize.qat import qat_source
from quantize.search import STEPS, Candidate, fit_budget, rank_layers
from runtime.bundle import META, BundleError, BundleMeta, atomic_write_json, staging_dir
from runtime.engines import EngineUnavailable, get_engine

REPORT = "quantize_report.json"
UNITS = {"nme": "fraction of the outer-eye-corner distance (0.0450 = 4.50 %)",
         "drift_points": "mean per-face (NME_int8 - NME_fp32) in NME points (percentage "
                         "points), over the faces named by drift_faces",
         "budget_points": "allowed |drift| in NME points; 0.10 = 0.0010 as a fraction",
         "subsets_drift_points": "difference of the WFLW attribute-subset means (all faces)",
         "latency": "milliseconds, batch 1"}


# -- one backend ------------------------------------------------------------------------------
def find_parent(bundle_dir: Path, backend: type[Backend]) -> Path:
    for stage in backend.parents:
        if (bundle_dir / stage).is_dir():
            return bundle_dir / stage
    raise QuantizeError(f"{bundle_dir} has no FP32 bundle for {backend.name} (looked for "
                        f"{', '.join(s + '/' for s in backend.parents)}); run `make export` first")


def _tool_versions(backend: Backend) -> dict:
    return {**backend.tool_versions(), **package_versions(["numpy", "opencv-python-headless"])}


@dataclass
class Job:
    """One backend's quantization: its FP32 parent bundle, engines, faces and figures."""
    name: str
    cls: type[Backend]
    parent_dir: Path
    meta: BundleMeta                   # of the FP32 parent
    final: Path                        # the INT8 bundle folder
    calib_x: np.ndarray
    figures: list[EvalSet]             # every reported figure (native head per set, "@68")
    gates: list[EvalSet]               # the figures the budget applies to
    settings: Settings

    def engine(self, path, threads: int = 1):
        return get_engine(self.cls.engine)(path, threads=threads, precision=self.cls.precision)


def _start(name: str, bundle_dir: Path, data: Data, settings: Settings) -> Job:
    """Step 1: the FP32 parent bundle, checked, and what will be scored and gated."""
    cls = get_backend(name)
    parent_dir = find_parent(bundle_dir, cls)
    try:
        meta = BundleMeta.load(parent_dir)
    except BundleError as e:
        raise QuantizeError(str(e)) from None
    if meta.engine != cls.engine:
        raise QuantizeError(f"{parent_dir}/{META} says engine {meta.engine!r}; the "
                            f"{name} quantizer needs a {cls.engine} bundle")
    figs = figures(meta, data.sets)
    gate_keys = {k for k in settings.gate_sets}
    gates = [f for f in figs if f.key.split("@")[0] in gate_keys]
    return Job(name, cls, parent_dir, meta, bundle_dir / cls.stage,
               face_batch(data.calib, meta.preprocess, data.calib_protocol), figs, gates, settings)


def _score_fp32(job: Job, backend: Backend, log: Log) -> dict:
    """Step 2: the FP32 model's figures (the drift reference), with a sanity check."""
    fp32_engine = job.engine(backend.src)
    log(f"    FP32 {job.parent_dir.name}: scoring " + ", ".join(f.key for f in job.figures))
    fp32 = {f.key: score(fp32_engine, job.meta, f, job.cls.eval_batch) for f in job.figures}
    for g in job.gates:
        n_ok = int((fp32[g.key]["_nme"] <= FAIL_NME).sum())
        if job.settings.drift_faces == "ok" and n_ok < MIN_DRIFT_FACES:
            raise QuantizeError(
                f"the FP32 model {job.parent_dir} localises only {n_ok} of {fp32[g.key]['count']} "
                f"{g.key} faces (NME <= {FAIL_NME}); at least {MIN_DRIFT_FACES} are needed to "
                "measure drift on localised faces. Is the checkpoint trained? (--drift-faces "
                "all measures on every face)")
    return fp32


def _search(job: Job, backend: Backend, fp32: dict, data: Data, work: Path, log: Log) -> dict:
    """Step 3: quantize, and escalate while a gated figure is over the budget."""
    opts, settings = job.settings.options(), job.settings
    log(f"    quantize with {len(data.calib)} calibration faces ({opts.method}, "
        f"{'per-channel' if opts.per_channel else 'per-tensor'}, preset {opts.preset})")
    rank_n = settings.rank_faces or len(data.calib)
    first_out = job.gates[0].output if job.gates else 0
    rank_sets = [EvalSet(f"calibration_{p}", data.calib[:rank_n], p, job.gates[0].scheme,
                         "calibration faces (sensitivity ranking only)", first_out)
                 for p in dict.fromkeys(g.protocol for g in job.gates)]
    return fit_budget(backend, job.engine, job.calib_x, job.gates, rank_sets, opts, settings,
                      fp32, job.meta, work, log, qat=qat_source(job))


def _escalation(search: dict) -> dict:
    """Which steps of the escalation ran, which one the bundle comes from, their cost."""
    chosen: Candidate = search["chosen"]
    esc = search["escalation"]
    ran = [e["step"] for e in esc if "status" not in e]
    return {"path": " -> ".join(ran), "taken": chosen.step,
            "within_budget": bool(esc) and any(e.get("within_budget") for e in esc),
            "steps": esc, "seconds": sum(e.get("seconds", 0.0) for e in esc),
            "available": dict(STEPS)}


def _search_record(search: dict) -> dict:
    chosen: Candidate = search["chosen"]
    return {
        "calibration_s": search["calibration_s"],
        "escalation": _escalation(search),
        "method": chosen.opts.method, "options": chosen.opts.describe(),
        "search": {"steps": search["steps"], "ranking_s": search.get("ranking_s"),
                   "ranking_top": (search["ranking"] or [])[:10],
                   "layers_total": len(search["ranking"]) if search["ranking"] else None},
        "layers_kept_float": [{"layer": k["layer"], "kind": k["kind"], "label": k["label"]}
                              for k in chosen.kept],
        "settings": chosen.info["settings"],
    }


def _int8_meta(job: Job, chosen: Candidate, backend: Backend) -> BundleMeta:
    """The INT8 bundle's description: the parent's, with this stage's lineage and files."""
    m = job.meta
    inp = replace(m.input, tensor_dtype=chosen.info.get("input_dtype"))
    lineage = replace(m.lineage, stage=job.cls.stage, created=now(),
                      parent={"target": job.parent_dir.name,
                              "path": os.path.relpath(job.parent_dir, job.final),
                              "sha256": m.sha256},
                      tool_versions=_tool_versions(backend))
    archs = job.cls.architectures.get(job.settings.preset)
    return BundleMeta(m.name or job.final.parent.name, job.cls.engine, "int8",
                      BundleMeta.files_of(*chosen.info["files"]), m.preprocess,
                      [replace(o) for o in m.outputs], inp,
                      chosen.info.get("opset", m.opset), lineage, export=dict(m.export),
                      architectures=list(archs) if archs else None)


def _validation(job: Job, nme: dict, data: Data) -> dict:
    s = job.settings
    headline = job.gates[0].key if job.gates else job.figures[0].key
    return {
        "headline": headline, "gated": [g.key for g in job.gates],
        "drift_faces": s.drift_faces, "drift_faces_rule": DRIFT_FACES[s.drift_faces],
        "budget_points": s.budget, "within_budget": True, "units": UNITS,
        "drift_points": {k: v["drift_points"] for k, v in nme.items()},
        "nme_fp32": {k: v["fp32"]["nme"] for k, v in nme.items()},
        "nme_int8": {k: v["int8"]["nme"] for k, v in nme.items()},
        "subsets_drift_points": nme[headline].get("subsets_drift_points", {}),
        "evaluation_faces": {f.key: len(f.faces) for f in job.figures},
        "evaluation_sha256": data.extra.get("evaluation_sha256"),
        "engine_precision_hint": job.cls.precision,
    }


def _write_bundle(job: Job, chosen: Candidate, backend: Backend, fp32: dict, data: Data,
                  search: dict, log: Log) -> dict:
    """Step 4: assemble the INT8 bundle, score it as shipped, time it against FP32, then
    rename it into place. Returns the report fields of a successful backend."""
    settings, opts = job.settings, chosen.opts
    with staging_dir(job.final) as stage:
        for f in chosen.info["files"]:
            shutil.copy2(chosen.folder / f, stage / f)
        meta = _int8_meta(job, chosen, backend).write(stage)
        int8_engine = job.engine(meta.model_file)
        log(f"    INT8 bundle: scoring {', '.join(f.key for f in job.figures)}")
        int8 = {f.key: score(int8_engine, meta, f, job.cls.eval_batch) for f in job.figures}
        nme = {f.key: compare(fp32[f.key], int8[f.key], settings.drift_faces) for f in job.figures}
        if not all(within(nme[g.key]["drift_points"], settings.budget)
                   for g in job.gates):  # pragma: no cover - the same file scored twice
            raise RuntimeError(f"{job.name}: the written bundle scores differently from the "
                               "candidate it was copied from")
        log(f"    latency: {settings.latency_runs} interleaved batch-1 runs, "
            f"{settings.threads} thread(s)")
        lat = measure_latency(job.engine(backend.src, settings.threads),
                              job.engine(meta.model_file, settings.threads),
                              job.calib_x[:1], settings.latency_runs, settings.warmup)
        lat["threads"] = settings.threads
        size = {"fp32_bytes": job.meta.bytes, "int8_bytes": meta.bytes}
        size["ratio"] = size["int8_bytes"] / size["fp32_bytes"]
        meta.validation = _validation(job, nme, data)
        record = _search_record(search)
        meta.quantization = {
            "backend": job.name, "method": opts.method,
            "method_detail": job.cls.methods[opts.method],
            "per_channel": opts.per_channel, "preset": opts.preset,
            "preset_detail": PRESETS[opts.preset], "graph_fixes": opts.graph_fixes,
            "settings": chosen.info["settings"],
            "layers_kept_float": record["layers_kept_float"],
            "escalation": record["escalation"],
            "calibration": data.record, "calibration_s": search["calibration_s"],
        }
        if chosen.info.get("qat"):
            meta.quantization["qat"] = {
                **chosen.info["qat"],
                "note": "this INT8 model quantizes the QAT fine-tune's weights (its own FP32 "
                        "export, sha256 qat_parent_sha256); drift and latency are against the "
                        "parent bundle above"}
        if meta.architectures:
            meta.quantization["architectures_note"] = job.cls.architectures_note
        meta.write(stage)
    return {"status": "ok", "int8_bundle": str(job.final), "nme": nme, "size": size,
            "latency": lat, "within_budget": True}


def quantize_backend(name: str, bundle_dir: Path, data: Data, settings: Settings,
                     log: Log = print) -> dict:
    """Quantize one backend; returns its report entry ("status": "ok" | "failed")."""
    job = _start(name, bundle_dir, data, settings)
    opts = settings.options()
    entry: dict = {"status": "failed", "fp32_bundle": str(job.parent_dir), "int8_bundle": None,
                   "created": now(), "fp32_sha256": job.meta.sha256,
                   "method": opts.method, "method_detail": job.cls.methods[opts.method],
                   "engine_precision_hint": job.cls.precision,
                   "outputs": [o.scheme for o in job.meta.outputs]}
    with tempfile.TemporaryDirectory(prefix=f".quantize-{name}-", dir=bundle_dir) as tmp:
        work = Path(tmp)
        backend = job.cls(job.meta, work / "backend")
        fp32 = _score_fp32(job, backend, log)
        search = _search(job, backend, fp32, data, work, log)
        entry.update(_search_record(search))
        entry["method_detail"] = job.cls.methods[entry["method"]]
        chosen: Candidate = search["chosen"]
        if not chosen.ok(settings.budget):
            entry["nme"] = {k: compare(fp32[k], r, settings.drift_faces)
                            for k, r in chosen.results.items()}
            w = chosen.worst
            entry["reason"] = (f"INT8 drift {chosen.drift[w]:+.3f} NME points on {w} exceeds the "
                               f"budget of {settings.budget:.2f} even with {len(chosen.kept)} "
                               "op(s) kept in float; no bundle written")
            if job.final.exists():
                entry["reason"] += f" (the existing {job.final.name}/ from an earlier run is untouched)"
            return entry
        entry.update(_write_bundle(job, chosen, backend, fp32, data, search, log))
    return entry


# -- the command ------------------------------------------------------------------------------
def check_request(bundle_dir: Path, names: list[str], settings: Settings,
                  skip_missing: bool = False) -> tuple[list[str], dict[str, str]]:
    """Validate options before any heavy work; returns the backends to run and, with
    skip_missing, the ones whose FP32 bundle is not in the folder (name -> reason)."""
    if not bundle_dir.is_dir():
        raise QuantizeError(f"bundle folder {bundle_dir} does not exist; run `make export` first")
    if settings.preset not in PRESETS:
        raise QuantizeError(f"unknown preset {settings.preset!r}; expected {', '.join(PRESETS)}")
    if settings.drift_faces not in DRIFT_FACES:
        raise QuantizeError(f"drift faces {settings.drift_faces!r}: expected one of "
                            f"{', '.join(DRIFT_FACES)}")
    if not settings.budget >= 0:
        raise QuantizeError(f"--budget must be >= 0 NME points, got {settings.budget}")
    if settings.calib_samples is not None and settings.calib_samples < MIN_CALIB_FACES:
        raise QuantizeError(f"--calib-samples {settings.calib_samples} is too few: at least "
                            f"{MIN_CALIB_FACES} calibration faces are needed")
    run, skipped = [], {}
    for n in names:
        cls = get_backend(n)
        cls.check_method(settings.method)
        ok, why = cls.available()
        if not ok:
            raise QuantizeError(why)
        try:
            parent = find_parent(bundle_dir, cls)
        except QuantizeError as e:
            if not skip_missing:
                raise
            skipped[n] = str(e)
            continue
        if not (parent / META).is_file():
            raise QuantizeError(f"{parent} has no {META}; it is not a bundle written by "
                                "`make export` (re-run the export)")
        run.append(n)
    if not run:
        raise QuantizeError(f"{bundle_dir} has no FP32 bundle any backend starts from: "
                            + "; ".join(skipped.values()))
    return run, skipped


def run(bundle_dir: str | Path, backends: list[str], settings: Settings,
        log: Log = print, skip_missing: bool = False) -> tuple[dict, list[str]]:
    """Quantize the given backends; write the report; return (report, failed backend names).
    skip_missing: a backend whose FP32 bundle is not there (an imported ONNX has no TFLite
    bundle) is reported as skipped instead of failing the request."""
    bundle_dir = Path(bundle_dir)
    names, skipped = check_request(bundle_dir, list(backends), settings, skip_missing)
    for n, why in skipped.items():
        log(f"    {n}: skipped: {why}")
    total = len(names) + 2
    log(f"[1/{total}] calibration and evaluation faces")
    data = load_data(settings)
    log(f"      {data.record['count']} calibration faces (sha256 {data.record['sha256'][:12]}), "
        + ", ".join(f"{len(s.faces())} {s.key}" for s in data.sets))
    report_path = bundle_dir / REPORT
    old = {}
    if report_path.is_file():
        try:
            old = json.loads(report_path.read_text()).get("backends", {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    results, failed = {n: {"status": "skipped", "reason": why, "created": now()}
                       for n, why in skipped.items()}, []
    for i, name in enumerate(names, 2):
        log(f"[{i}/{total}] {name}")
        try:
            results[name] = quantize_backend(name, bundle_dir, data, settings, log)
        except EngineUnavailable as e:
            results[name] = {"status": "skipped", "reason": str(e), "created": now()}
        r = results[name]
        if r["status"] != "ok":
            failed.append(name)
            log(f"    {name}: {r['status'].upper()}: {r.get('reason', '')}")
        else:
            for k, h in r["nme"].items():
                log(f"    {name} {k}: drift {h['drift_points']:+.3f} points on "
                    f"{h['drift_faces_count']} {h['drift_faces']} faces; set NME "
                    f"{h['fp32']['nme'] * 100:.3f}% -> {h['int8']['nme'] * 100:.3f}% "
                    f"({h['drift_points_all_faces']:+.3f} on all {h['fp32']['count']})")
            lat = r["latency"]
            log(f"    {name}: size x{r['size']['ratio']:.2f}, latency x{lat['ratio']:.2f} "
                f"({lat['fp32']['median_ms']:.2f} -> {lat['int8']['median_ms']:.2f} ms), "
                f"{len(r['layers_kept_float'])} op(s) kept float")
        if "escalation" in r:
            e = r["escalation"]
            log(f"    {name}: escalation {e['path']} (bundle from {e['taken']}), "
                + ", ".join(f"{s['step']} {s['seconds']:.0f} s" for s in e["steps"]
                            if "seconds" in s))
    report = {
        "model": bundle_dir.name, "bundle_dir": str(bundle_dir), "created": now(),
        "host": host_info(), "units": UNITS, "headline": data.sets[0].key,
        "gated": list(settings.gate_sets),
        "drift_faces": settings.drift_faces, "drift_faces_rule": DRIFT_FACES[settings.drift_faces],
        "budget_points": settings.budget,
        "settings": {k: v for k, v in asdict(settings).items() if not k.endswith("_root")},
        "calibration": {k: v for k, v in data.record.items() if k != "faces"},
        "evaluation_sets": {s.key: {"description": s.info.description, "count": len(s.faces()),
                                    "protocol": s.protocol} for s in data.sets},
        "backends": {**old, **results},
    }
    log(f"[{total}/{total}] report {report_path}")
    atomic_write_json(report_path, report)
    return report, failed


__all__ = ["BACKENDS", "Data", "EvalSet", "Layer", "QuantizeError", "Settings", "compare",
           "fit_budget", "load_data", "quantize_backend", "rank_layers", "run", "score"]
