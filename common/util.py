"""The helpers behind common/__init__.py (see there)."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

# packages whose versions describe a measurement's host (benchmark records, quantize report)
PACKAGES = ("numpy", "opencv-python-headless", "onnxruntime", "openvino", "ai-edge-litert",
            "tflite-runtime", "torch", "onnx")


def now() -> str:
    """UTC time stamp, seconds resolution, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(names) -> dict:
    """{distribution: version} of the installed ones among `names`."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def quiet(label: str = "converter"):
    """Keep converters' chatter (Python and C++ logs alike) off the console: fds 1 and 2 go
    to a temporary file for the duration, whose tail is attached to the error if one is raised.
    Used by export/ and quantize/."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except Exception as e:
            sys.stdout.flush()
            sys.stderr.flush()
            log.seek(0)
            text = log.read().decode(errors="replace").strip()
            if text:
                e.add_note(f"{label} output (last lines):\n" + text[-2000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict:
    versions = package_versions(PACKAGES)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(),
            "packages": versions, "load_avg": load, "hostname": platform.node()}


def host_string(h: dict) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in h["packages"].items())
    load = f"; load avg {h['load_avg'][0]}" if h.get("load_avg") else ""
    flags = f" [{' '.join(h['cpu_flags'])}]" if h.get("cpu_flags") else ""
    return (f"{h['cpu']}{flags}, {h['cores']} cores ({h['machine']}); {h['os']}; "
            f"Python {h['python']}; {pk}{load}")


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




def time_interleaved(fns: dict, x, warmup: int, runs: int) -> dict:
    """Median/p90 ms of each of several callables on the same input, interleaved call by call
    so that load changes on the machine hit all of them alike (e.g. FP32 vs INT8)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    ts = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            ts[k].append(time.perf_counter() - t)
    return {k: {"median_ms": float(np.median(v) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3)}
            for k, v in ts.items()}


def time_rounds(fns: dict, x, rounds: int, calls: int, warmup: int = 10) -> dict:
    """Per-round median ms of several callables on the same input, timed in alternating blocks:
    each round runs `calls` timed calls of every callable in turn, the order reversed every
    other round (A B, B A, ...), so that a change of the machine's load or clock hits both alike.
    Returns {name: [median ms of round 1, round 2, ...]}."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k](x)
    out = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            fn, ts = fns[k], []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                fn(x)
                ts.append(time.perf_counter_ns() - t0)
            out[k].append(float(np.median(ts)) / 1e6)
    return out


# CPU features an INT8 or bf16 speed-up depends on (x86: VNNI dot products, bf16/AMX units;
# Arm: dot-product and i8mm), recorded with every speed measurement
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
               "amx_bf16", "asimddp", "i8mm", "sve")


def cpu_flags(names=SPEED_FLAGS) -> list[str]:
    """Those of `names` this CPU reports in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have = set()
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            have.update(line.split(":", 1)[1].split())
    return [n for n in names if n in have]

