"""The sensitivity search that keeps a quantized model within its drift budget:
`fit_budget` quantizes every op, and while a gated figure is over the budget ranks the
quantized ops by sensitivity (`rank_layers`: each quantized alone, scored on calibration
faces) and keeps them in float one at a time, returning the steps, the ranking and the chosen
Candidate. quantize.core calls fit_budget once per backend.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.metrics import nme_per_face
from quantize.backends import Backend, Layer, Options
from quantize.data import EvalSet, Log, Settings
from quantize.scoring import FAIL_NME, MIN_DRIFT_FACES, drift, score, within
from runtime.schemes import get_scheme


def rank_layers(backend: Backend, layers: list[Layer], make_engine, x: np.ndarray, opts: Options,
                rank_sets: list[EvalSet], meta: dict, work: Path, log: Log,
                faces: str = "ok") -> list[dict]:
    """Quantize each candidate alone (everything else float) and score it on `rank_sets`
    (calibration faces with ground truth, one set per crop protocol; never evaluation faces).

    drift_points[protocol]: its NME change against the FP32 model; shift_points: NME of its
    points against the FP32 model's points (first set). Sorted by the largest |drift|.
    """
    ref = {s.protocol: score(make_engine(backend.src), meta, s, backend.eval_batch)
           for s in rank_sets}
    # too few localised calibration faces for an "ok" mean: rank on all of them instead
    mode = {p: faces if faces == "all" or (r["_nme"] <= FAIL_NME).sum() >= MIN_DRIFT_FACES
            else "all" for p, r in ref.items()}
    eye = get_scheme(meta.outputs[rank_sets[0].output].scheme).eye_corners
    ranking = []
    for i, ly in enumerate(layers, 1):
        d = work / f"rank_{i}"
        info = backend.quantize(x, opts, d, only=[ly.name])
        eng = make_engine(d / info["files"][0])
        res = {s.protocol: score(eng, meta, s, backend.eval_batch) for s in rank_sets}
        first = rank_sets[0].protocol
        shift = nme_per_face(res[first]["_points"], ref[first]["_points"], eye)
        ranking.append({"layer": ly.name, "kind": ly.kind, "label": ly.label,
                        "drift_points": {p: drift(ref[p], r, mode[p]) for p, r in res.items()},
                        "shift_points": float(shift.mean()) * 100})
        shutil.rmtree(d, ignore_errors=True)
        if i % 10 == 0 or i == len(layers):
            log(f"      ranked {i}/{len(layers)}")
    ranking.sort(key=lambda r: -max(abs(v) for v in r["drift_points"].values()))
    return ranking


@dataclass
class Candidate:
    folder: Path
    info: dict
    kept: list[dict]
    results: dict         # gate key -> evaluate() result of this INT8 model
    drift: dict           # gate key -> drift in NME points
    seconds: float

    @property
    def worst(self) -> str:
        return max(self.drift, key=lambda k: abs(self.drift[k]))

    def ok(self, budget: float) -> bool:
        return all(within(d, budget) for d in self.drift.values())


def fit_budget(backend: Backend, make_engine, calib_x, gates: list[EvalSet],
               rank_sets: list[EvalSet], opts: Options, settings: Settings, fp32: dict,
               meta: dict, work: Path, log: Log) -> dict:
    """Quantize everything; while a gate set's |drift| > budget, keep one more op in float:
    the one whose own drift (ranked on calibration faces, same crop protocol) pushes hardest
    in the direction of the worst gate's drift, so an overshoot is corrected next step.
    Returns the steps, the ranking and the chosen candidate (the first within budget, else
    the one with the smallest worst |drift|)."""
    steps: list[dict] = []

    def attempt(kept: list[dict]) -> Candidate:
        d = work / f"try_{len(steps)}"
        t = time.perf_counter()
        info = backend.quantize(calib_x, opts, d, exclude=[k["layer"] for k in kept])
        dt = time.perf_counter() - t
        eng = make_engine(d / info["files"][0])
        res = {g.key: score(eng, meta, g, backend.eval_batch) for g in gates}
        dr = {k: drift(fp32[k], r, settings.drift_faces) for k, r in res.items()}
        steps.append({"kept_float": [k["label"] or k["layer"] for k in kept],
                      "nme_int8": {k: r["nme"] for k, r in res.items()},
                      "drift_points": dr, "seconds": dt})
        log(f"      {len(kept)} op(s) float: drift " + ", ".join(
            f"{k} {v:+.3f}" for k, v in dr.items()) + " points")
        return Candidate(d, info, kept, res, dr, dt)

    first = attempt([])
    out = {"steps": steps, "calibration_s": first.seconds, "ranking": None, "chosen": first}
    if first.ok(settings.budget) or settings.max_float_layers <= 0:
        return out
    layers = backend.layers(first.folder)
    log(f"      over the {settings.budget:.2f}-point budget: ranking {len(layers)} quantized ops "
        f"by sensitivity on {len(rank_sets[0].faces)} calibration faces")
    t = time.perf_counter()
    ranking = rank_layers(backend, layers, make_engine, calib_x, opts, rank_sets, meta, work, log,
                          settings.drift_faces)
    out["ranking"] = ranking
    out["ranking_s"] = time.perf_counter() - t
    protocol = {g.key: g.protocol for g in gates}
    best = current = first
    kept: list[dict] = []
    while len(kept) < settings.max_float_layers:
        worst = current.worst
        sign, p = np.sign(current.drift[worst]), protocol[worst]
        left = [r for r in ranking if r not in kept and sign * r["drift_points"][p] > 0]
        if not left:
            break
        kept = kept + [max(left, key=lambda r: sign * r["drift_points"][p])]
        current = attempt(kept)
        if abs(current.drift[current.worst]) < abs(best.drift[best.worst]):
            best = current
        if current.ok(settings.budget):
            out["chosen"] = current
            return out
    out["chosen"] = best
    return out
