"""Measure one benchmark row in a fresh process: load time, peak memory, latency, throughput,
and accuracy on the real evaluation faces through the runtime's own preprocessing.

    python -m benchmark.measure JOB.json RESULT.json      (started by benchmark.core)

Why a fresh process per row: native engines (OpenVINO, ONNX Runtime, LiteRT, torch) allocate
outside Python's heap, keep thread pools and caches alive, and never hand memory back, so
measuring several engines in one process lets earlier rows inflate later ones. tracemalloc
sees none of it. Memory is read from the kernel instead:

  rss_base_mb   resident set before the engine's package is imported (by available() or
                the constructor): python, numpy, opencv and the faces used as timing input
  rss_peak_mb   peak resident set (VmHWM, reset via /proc/self/clear_refs right before the
                engine is built) over: building the engine twice (cold, then warm), warm-up,
                the batch-1 latency runs, the batch-N throughput runs and the pipeline runs
  peak_rss_mb   rss_peak_mb - rss_base_mb: what loading and running this model costs,
                including the engine library itself

Accuracy runs after the memory figures are taken (it holds many images in memory).
Torch-free unless the row is the torch reference.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmark.torch_engine import bench_engines
from common import time_calls
from evaluation.metrics import evaluate, face_batch, face_box
from evaluation.sets import ScoredSet, scored_sets, scorings
from runtime.bundle import BundleMeta, atomic_write_json
from runtime.decode import Landmarker
from runtime.engines import ENGINES, EngineUnavailable, register
from runtime.schemes import get_scheme

# The default evaluation sets (evaluation.sets keys): the test faces (WFLW 505, HELEN 330; INT8
# calibration uses WFLW train faces, so no test face is calibration data) and, beside them, the
# held-out training faces every selection is made on.
EVAL_SETS = ("wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks",
             "wflw:heldout/landmarks", "300w:heldout/landmarks")
EVAL_BATCH = 32
BATCH_CHECK_TOL = 0.02   # crop units (~2 px at 112): batch-N output must match batch-1 output


def load_sets(keys=EVAL_SETS, wflw=None, w300=None, max_faces: int = 0) -> list[ScoredSet]:
    """Every scored set (annotations read; images are read lazily)."""
    sets = scored_sets(keys, {"wflw": wflw, "300w": w300})
    if max_faces:
        for s in sets:
            s._faces = s.faces()[:max_faces]
    return sets


# -- memory ------------------------------------------------------------------------------------
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    import resource
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 2**20 if platform.system() == "Darwin" else v / 1024   # bytes on macOS, KiB on Linux


def reset_peak() -> str:
    """Reset the kernel's peak-RSS counter; returns the method the peak figure will use."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        return "ru_maxrss of the whole process (peak could not be reset)"


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    v = _status_mb("VmHWM")
    return v if v is not None else _maxrss_mb()


# -- timing ------------------------------------------------------------------------------------
def short_precision(text: str) -> str:
    """OpenVINO's "<Type: 'bfloat16'>" -> "bf16"."""
    m = re.search(r"'(\w+)'", str(text))
    name = m.group(1) if m else str(text)
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)


# -- engines -------------------------------------------------------------------------------------
def resolve_engine(job: dict):
    """The engine class of a job; engines registered outside runtime/ (plugins, tests) are
    imported from the module that defined them, so they run in the worker too."""
    name, ref = job["engine"], job.get("engine_ref") or {}
    if name not in ENGINES and ref:
        try:
            mod = importlib.import_module(ref["module"])
        except ImportError:
            spec = importlib.util.spec_from_file_location(ref["module"], ref["file"])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[ref["module"]] = mod
            spec.loader.exec_module(mod)
        obj = mod
        for part in ref["qualname"].split("."):
            obj = getattr(obj, part)
        if name not in ENGINES:
            register(obj)
    engines = bench_engines()
    if name not in engines:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(engines)}")
    return engines[name]


# -- one row -------------------------------------------------------------------------------------
def run_job(job: dict) -> dict:
    """Measure one (target, device, threads, execution precision) row; never raises."""
    res = {"status": "ok", "reason": "", "pid": os.getpid()}
    t_start = time.perf_counter()
    try:
        cls = resolve_engine(job)
        meta = BundleMeta.from_dict(job["meta"], f"job {job['id']}")
        meta.folder = Path(job["path"]).parent
        pre = meta.preprocess
        sets = load_sets(job.get("eval_sets") or EVAL_SETS, job["wflw"], job["w300"],
                         job.get("max_faces", 0))
        timing_faces = next(s.faces() for s in sets if s.faces())[:max(1, job["batch"])]
        x_n = face_batch(timing_faces, pre, "rect" if timing_faces[0].rect is not None else "landmarks")
        x_1 = x_n[:1]
        img = timing_faces[0].image()
        box = face_box(timing_faces[0], "rect" if timing_faces[0].rect is not None else "landmarks")
        kwargs = {"threads": job["threads"], "device": job["device"], "precision": job["hint"]}
        gc.collect()

        # memory and load time: build the engine cold (first import of its library), drop
        # it, build it again warm; load_s is the warm build (what re-loading a model costs)
        res["memory"] = {"rss_base_mb": rss_mb(), "method": reset_peak()}
        ok, why = cls.available()   # may import the engine's package: counted from here on
        if not ok:
            return {**res, "status": "skipped", "reason": why, "memory": None}
        t0 = time.perf_counter()
        engine = cls(job["path"], **kwargs)
        res["load_cold_s"] = time.perf_counter() - t0
        del engine
        gc.collect()
        t0 = time.perf_counter()
        engine = cls(job["path"], **kwargs)
        res["load_s"] = time.perf_counter() - t0
        res["engine"] = engine.describe()
        if cls.reports_precision:
            res["exec_precision"] = short_precision(engine.execution_precision())
        heads = [Landmarker(meta, engine, i) for i in range(len(meta.outputs))]
        predict = heads[0]

        y1 = predict(x_1)
        cap = job.get("max_seconds")
        res["latency"] = {**time_calls(predict, x_1, job["warmup"], job["runs"], cap), "batch": 1}

        n = len(x_n)
        eval_batch = 1
        if n > 1:
            try:
                yn = predict(x_n)
                diff = float(np.abs(yn[:1] - y1).max())
                if diff > BATCH_CHECK_TOL:
                    raise ValueError(f"batch-{n} output differs from batch-1 output by {diff:.3g}")
                t = time_calls(predict, x_n, max(2, job["warmup"] // 4), max(5, job["runs"] // 8), cap)
                res["throughput"] = {"batch": n, "faces_per_s": n / (t["median_ms"] / 1e3),
                                     "median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                                     "runs": t["runs"]}
                eval_batch = EVAL_BATCH
            except EngineUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - a static-batch model is a result, not a failure
                res["throughput"] = {"batch": n, "faces_per_s": None,
                                     "reason": f"batch {n} not supported: {str(e).splitlines()[0][:200]}"}
        else:
            res["throughput"] = {"batch": n, "faces_per_s": None, "reason": "only one timing face"}

        def pipeline(_):
            batch, mats = pre(img, [box])
            return pre.decode(predict(batch), mats)
        res["pipeline"] = {**time_calls(pipeline, None, max(1, job["warmup"] // 4),
                                        max(5, job["runs"] // 4), cap),
                           "what": "crop + normalise + inference + decode, one face"}
        peak = peak_mb()
        res["memory"].update({"rss_peak_mb": peak, "peak_rss_mb": peak - res["memory"]["rss_base_mb"]
                              if res["memory"]["rss_base_mb"] is not None else None})

        if not job.get("accuracy", True):   # scored by a sibling row (same model, other threads)
            res["wall_s"] = time.perf_counter() - t_start
            return res
        # accuracy on every evaluation set, through evaluation.metrics.evaluate (runtime code)
        t0 = time.perf_counter()
        acc, arrays = {}, {}
        for s in sets:
            faces = s.faces()
            if not faces:
                continue
            data_scheme = get_scheme(s.scheme)
            ec = data_scheme.eye_corners                  # outer eye corners of the faces
            iod = np.array([np.linalg.norm(f.points[ec[0]] - f.points[ec[1]]) for f in faces],
                           np.float32)
            for sc in scorings([o.scheme for o in meta.outputs], s.scheme):
                head = heads[sc.output]
                r = evaluate(head, faces, pre, head.scheme, data_scheme, s.protocol,
                             batch=eval_batch, as68=sc.as68)
                key = s.key + sc.suffix
                arrays[f"{key}|nme"] = r.pop("_nme").astype(np.float32)
                arrays[f"{key}|points"] = r.pop("_points").astype(np.float32)
                arrays[f"{key}|iod"] = iod
                r["output"] = meta.outputs[sc.output].scheme
                r["through_98_to_68"] = sc.as68 or head.scheme.num_points != data_scheme.num_points
                acc[key] = r
        res["accuracy"] = acc
        res["eval_batch"] = eval_batch
        res["accuracy_s"] = time.perf_counter() - t0
        if job.get("arrays_out"):
            Path(job["arrays_out"]).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(job["arrays_out"]).with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, job["arrays_out"])
    except EngineUnavailable as e:
        res.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - every failure becomes an error row with its message
        res.update(status="error", reason=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=6))
    res["wall_s"] = time.perf_counter() - t_start
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmark.measure JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    atomic_write_json(argv[1], run_job(job))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
