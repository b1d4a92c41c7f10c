"""Benchmark records: one JSON file per row, the run manifest, the host description and the
drift of a row against the torch FP32 reference.

Layout under --out (default artifacts/pfld68_w05/benchmark):
    run.json                 manifest: run id, command, host, config, record files, finished
    records/<id>.json        one record per row (written atomically as each row finishes)
    records/<id>.npz         per-face NME of each evaluation set (CED curves are drawn from it)
    logs/<id>.log            the worker's stderr
    results.md, *.png        rendered from the records (benchmark/report.py)
The gate (benchmark/gate.py) reads records only through `load_run`, which refuses stale or
unfinished runs.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import cpu_model, host_info, host_string  # noqa: F401  (re-exported for records)
from runtime.bundle import atomic_write_json
from runtime.errors import LandmarkError

SCHEMA = 1


class RecordError(LandmarkError):
    """Benchmark records are missing, unfinished, from another run, or malformed."""


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def record_id(model: str, name: str, device: str, threads, hint: str) -> str:
    raw = f"{model}__{name}__{device}__t{threads if threads is not None else '-'}__{hint}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def accuracy_entry(r: dict) -> dict:
    """evaluation.metrics.evaluate's dict -> the record's accuracy entry (threshold 0.10)."""
    out = {"nme": r["nme"], "fr": r["fr_0.10"], "auc": r["auc_0.10"], "threshold": 0.10,
           "count": r["count"], "protocol": r.get("protocol"), "output": r.get("output"),
           "through_98_to_68": r.get("through_98_to_68")}
    if r.get("subsets"):
        out["subsets"] = r["subsets"]
    if r.get("confidence"):
        out["confidence"] = r["confidence"]
    return out


def drift(arrays: dict, ref_arrays: dict, accuracy: dict, ref_accuracy: dict) -> dict:
    """NME difference and point shift (px, image space) of a row against the reference,
    on the same faces with the same crops, per evaluation set."""
    sets = {}
    for key, acc in accuracy.items():
        pk = f"{key}|points"
        if key not in ref_accuracy or pk not in arrays or pk not in ref_arrays:
            continue
        p, q = arrays[pk], ref_arrays[pk]
        if p.shape != q.shape:
            sets[key] = {"error": f"points of shape {p.shape} vs reference {q.shape}"}
            continue
        per_face = np.linalg.norm(p.astype(np.float64) - q, axis=-1).mean(-1)
        sets[key] = {"nme_delta": acc["nme"] - ref_accuracy[key]["nme"],
                     "shift_px": float(per_face.mean()), "shift_px_max": float(per_face.max()),
                     "faces": int(len(per_face))}
        iod = arrays.get(f"{key}|iod")
        if iod is not None and iod.shape == per_face.shape:
            # the shift in NME units (outer-eye distance): comparable across face sizes
            sets[key]["shift_iod"] = float((per_face / iod).mean())
    good = [v for v in sets.values() if "error" not in v]
    return {"sets": sets,
            "max_abs_nme_delta": max((abs(v["nme_delta"]) for v in good), default=None),
            "max_shift_px": max((v["shift_px"] for v in good), default=None),
            "max_shift_iod": max((v["shift_iod"] for v in good if "shift_iod" in v), default=None)}


def load_arrays(path) -> dict:
    if not path or not Path(path).is_file():
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_record(records_dir: Path, rec: dict) -> Path:
    path = Path(records_dir) / f"{rec['id']}.json"
    atomic_write_json(path, rec)
    return path


def load_run(out: str | Path, require_finished: bool = True) -> tuple[dict, list[dict]]:
    """(manifest, records) of the benchmark run in `out`; refuses partial or stale runs."""
    out = Path(out)
    man_path = out / "run.json"
    if not man_path.is_file():
        raise RecordError(f"{man_path} does not exist: no benchmark run in {out} "
                          "(run `python benchmark/run.py --out {out}` first)")
    try:
        man = json.loads(man_path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{man_path} is not valid JSON: {e}") from None
    if require_finished and not man.get("finished"):
        raise RecordError(f"{man_path}: the benchmark run {man.get('run_id')} did not finish; "
                          "its records are incomplete")
    recs = []
    for name in man.get("records", []):
        p = out / "records" / name
        if not p.is_file():
            raise RecordError(f"{man_path} lists {name} but {p} does not exist")
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{p} is not valid JSON: {e}") from None
        if rec.get("run_id") != man.get("run_id"):
            raise RecordError(f"{p} belongs to run {rec.get('run_id')}, not to {man.get('run_id')} "
                              f"named in {man_path}")
        recs.append(rec)
    return man, recs


def label(rec: dict) -> str:
    """Short human label of a row: 'openvino_int8 x1 bf16'."""
    ex = rec.get("exec_precision") or {}
    hint = ex.get("actual") or (ex.get("hint") if ex.get("hint") != "default" else "")
    t = f" x{rec['threads']}" if rec.get("threads") is not None else ""
    dev = f" {rec['device']}" if rec.get("device") not in (None, "CPU") else ""
    return f"{rec['bundle']}{dev}{t}{' ' + hint if hint else ''}"
