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

from runtime.bundle import atomic_write_json
from runtime.engines import ENGINES, EngineUnavailable, get_engine, register
from runtime.preprocess import Preprocess
from runtime.schemes import get_scheme
from train import data as D
from train.metrics import evaluate, face_batch, face_box

# The evaluation sets: (set, crop protocol). The WFLW faces are the evaluation part of
# train.data.calibration_split, disjoint from the faces INT8 calibration sees.
EVAL_SETS = (("wflw:eval", "rect"), ("wflw:eval", "landmarks"), ("300w:helen_test", "landmarks"))
SET_SCHEMES = {"wflw:eval": "wflw98", "300w:helen_test": "300w68"}
EVAL_BATCH = 32
BATCH_CHECK_TOL = 0.02   # crop units (~2 px at 112): batch-N output must match batch-1 output


def load_sets(wflw=None, w300=None, max_faces: int = 0) -> dict[str, list[D.Face]]:
    """Faces of every evaluation set (annotations only; images are read lazily)."""
    sets = {"wflw:eval": D.calibration_split(D.load_wflw(wflw, "test"))[1],
            "300w:helen_test": D.load_300w(w300, "helen_test")}
    if max_faces:
        sets = {k: v[:max_faces] for k, v in sets.items()}
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
MIN_RUNS = 10   # a time cap never cuts a measurement below this many runs


def time_calls(fn, x, warmup: int, runs: int, max_s: float | None = None) -> dict:
    """Median/p90/mean/min of `runs` timed calls after `warmup` untimed ones (milliseconds).

    With `max_s`, timing stops once that many seconds are spent (after at least MIN_RUNS
    runs), so a pathologically slow row (e.g. an oversubscribed machine) cannot stall a run;
    the record then says how many runs were actually timed.
    """
    for _ in range(warmup):
        fn(x)
    ts, start = [], time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn(x)
        ts.append((time.perf_counter_ns() - t0) / 1e6)
        if max_s is not None and i + 1 >= MIN_RUNS and time.perf_counter() - start > max_s:
            break
    ts = np.array(ts)
    return {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)),
            "mean_ms": float(ts.mean()), "min_ms": float(ts.min()), "warmup": warmup,
            "runs": len(ts), "runs_requested": runs, "capped_by_time": len(ts) < runs}


def short_precision(text: str) -> str:
    """OpenVINO's "<Type: 'bfloat16'>" -> "bf16"."""
    m = re.search(r"'(\w+)'", str(text))
    name = m.group(1) if m else str(text)
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)


# -- engines -------------------------------------------------------------------------------------
def resolve_engine(job: dict):
    """The engine class of a job; engines registered outside runtime/ (plugins, tests) are
    imported from the module that defined them, so they run in the worker too."""
    import benchmark  # noqa: F401  registers the torch reference
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
    return get_engine(name)


def adapt(engine, adapter: dict, num_points: int):
    """Wrap an engine so it takes NCHW float32 and returns crop-normalised [0, 1] x,y pairs.

    Our bundles need nothing; external models may want NHWC input or give pixels, [-1, 1]
    or all-x-then-all-y outputs (their spec says which).
    """
    nhwc = adapter.get("layout") == "NHWC" and not hasattr(engine, "nhwc")  # LiteRT transposes itself
    scale = float(adapter.get("output_scale", 1.0))
    offset = float(adapter.get("output_offset", 0.0))
    xxyy = adapter.get("output_order") == "xxyy"
    identity = not nhwc and scale == 1.0 and offset == 0.0 and not xxyy

    def predict(x):
        y = engine(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x)
        y = np.asarray(y, np.float32).reshape(len(x), -1)
        if y.shape[1] != 2 * num_points:
            raise ValueError(f"model output has {y.shape[1]} values per face, expected "
                             f"{2 * num_points} ({num_points} points); check the spec/meta")
        if identity:
            return y
        if xxyy:
            y = y.reshape(len(y), 2, num_points).transpose(0, 2, 1).reshape(len(y), -1)
        return y * scale + offset
    return predict


# -- one row -------------------------------------------------------------------------------------
def run_job(job: dict) -> dict:
    """Measure one (target, device, threads, execution precision) row; never raises."""
    res = {"status": "ok", "reason": "", "pid": os.getpid()}
    t_start = time.perf_counter()
    try:
        cls = resolve_engine(job)
        meta = job["meta"]
        pre = Preprocess.from_meta(meta)
        model_scheme = get_scheme(meta["scheme"])
        sets = load_sets(job["wflw"], job["w300"], job.get("max_faces", 0))
        timing_faces = (sets["wflw:eval"] or sets["300w:helen_test"])[:max(1, job["batch"])]
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
        if hasattr(engine, "execution_precision"):
            res["exec_precision"] = short_precision(engine.execution_precision())
        predict = adapt(engine, job.get("adapter") or {}, model_scheme.num_points)

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
        # accuracy on every evaluation set, through train.metrics.evaluate (runtime code)
        t0 = time.perf_counter()
        acc, arrays = {}, {}
        for set_name, protocol in EVAL_SETS:
            faces = sets[set_name]
            if not faces:
                continue
            r = evaluate(predict, faces, pre, model_scheme, get_scheme(SET_SCHEMES[set_name]),
                         protocol, batch=eval_batch)
            key = f"{set_name}/{protocol}"
            arrays[f"{key}|nme"] = r.pop("_nme").astype(np.float32)
            arrays[f"{key}|points"] = r.pop("_points").astype(np.float32)
            ec = get_scheme(SET_SCHEMES[set_name]).eye_corners   # outer eye corners of the faces
            arrays[f"{key}|iod"] = np.array([np.linalg.norm(f.points[ec[0]] - f.points[ec[1]])
                                             for f in faces], np.float32)
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
