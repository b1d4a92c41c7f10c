"""The escalation that keeps a quantized model within its drift budget, one step only when the
one before it misses (`fit_budget`, called once per backend by quantize.core):

1. plain PTQ: the requested settings (default min/max ranges);
2. better PTQ: the backend's `better` options (quantize.backends: histogram ranges, and on
   onnxruntime the graph fixes), from scratch;
3. float fallback: from whichever of 1 and 2 drifted less, rank the quantized ops by
   sensitivity (`rank_layers`: each quantized alone, scored on calibration faces) and keep
   them in float one at a time;
4. quantization-aware training (quantize.qat), for a bundle exported from a checkpoint that
   is here: a short fake-quantized fine-tune, the staged export of its weights into the
   backend's FP32 parent, then the PTQ options of the best step so far, scored against the
   original FP32 bundle; if it misses too, the float fallback again, from the QAT model.
   Settings.qat "off" never runs it, "force" runs it even when an earlier step is within
   budget (the bundle is then the smaller worst |drift| of the two); an imported model
   records why it has no QAT step.

Every step is recorded (`escalation`: options, seconds, drift per gated figure, within budget
or not) next to every quantize-and-score attempt (`steps`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from evaluation.metrics import nme_per_face
from quantize.backends import Backend, Layer, Options
from quantize.data import EvalSet, Log, Settings
from quantize.scoring import FAIL_NME, MIN_DRIFT_FACES, drift, score, within
from runtime.bundle import BundleMeta
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


PLAIN, BETTER, FALLBACK, QAT = "plain-ptq", "better-ptq", "float-fallback", "qat"
STEPS = {PLAIN: "post-training quantization with the requested settings",
         BETTER: "the backend's better post-training quantization (quantize.backends: `better`)",
         FALLBACK: "the most sensitive quantized ops kept in float, one at a time",
         QAT: "quantization-aware training (a checkpoint's short fine-tune with fake quantization)"}
QatSource = Callable[[Path, Log], tuple[BundleMeta, dict]]


@dataclass
class Candidate:
    folder: Path
    info: dict
    kept: list[dict]
    results: dict         # gate key -> evaluate() result of this INT8 model
    drift: dict           # gate key -> drift in NME points
    seconds: float        # quantization (calibration included)
    opts: Options = field(default_factory=Options)
    step: str = PLAIN

    @property
    def worst(self) -> str:
        return max(self.drift, key=lambda k: abs(self.drift[k]))

    def ok(self, budget: float) -> bool:
        return all(within(d, budget) for d in self.drift.values())


def _step_record(step: str, c: Candidate, seconds: float, budget: float, **extra) -> dict:
    return {"step": step, "what": STEPS[step], "options": c.opts.describe(),
            "seconds": seconds, "drift_points": dict(c.drift),
            "worst": c.worst, "within_budget": c.ok(budget), **extra}


def fit_budget(backend: Backend, make_engine, calib_x, gates: list[EvalSet],
               rank_sets: list[EvalSet], opts: Options, settings: Settings, fp32: dict,
               meta: dict, work: Path, log: Log,
               qat: tuple[QatSource | None, str] = (None, "no checkpoint given")) -> dict:
    """Plain PTQ; if a gate set's |drift| > budget, the backend's better PTQ; if that misses
    too, keep one more op in float at a time: the one whose own drift (ranked on calibration
    faces, same crop protocol) pushes hardest in the direction of the worst gate's drift, so
    an overshoot is corrected next step. Returns the attempts (`steps`), the `escalation`
    record, the ranking and the chosen candidate (the first within budget, else the one with
    the smallest worst |drift|). qat: (a function that fine-tunes the bundle's checkpoint and
    exports its FP32 parent, or None; why not), see quantize.core."""
    steps: list[dict] = []
    escalation: list[dict] = []

    def attempt(kept: list[dict], o: Options, step: str, b: Backend = backend) -> Candidate:
        d = work / f"try_{len(steps)}"
        t = time.perf_counter()
        info = b.quantize(calib_x, o, d, exclude=[k["layer"] for k in kept])
        dt = time.perf_counter() - t
        eng = make_engine(d / info["files"][0])
        res = {g.key: score(eng, meta, g, backend.eval_batch) for g in gates}
        dr = {k: drift(fp32[k], r, settings.drift_faces) for k, r in res.items()}
        steps.append({"step": step, "method": o.method, "graph_fixes": o.graph_fixes,
                      "kept_float": [k["label"] or k["layer"] for k in kept],
                      "nme_int8": {k: r["nme"] for k, r in res.items()},
                      "drift_points": dr, "seconds": dt})
        log(f"      [{step}] {len(kept)} op(s) float: drift " + ", ".join(
            f"{k} {v:+.3f}" for k, v in dr.items()) + " points")
        return Candidate(d, info, kept, res, dr, dt, o, step)

    def timed(fn):
        t = time.perf_counter()
        c = fn()
        return c, time.perf_counter() - t

    out = _ptq(attempt, timed, backend, make_engine, calib_x, gates, rank_sets, opts, settings,
               meta, work, log, steps, escalation)
    chosen: Candidate = out["chosen"]
    if (chosen.ok(settings.budget) or not settings.escalate) and settings.qat != "force":
        return out
    fn, why = qat
    if settings.qat == "off" or fn is None:
        escalation.append({"step": QAT, "what": STEPS[QAT], "status": "skipped",
                           "reason": "--qat off" if settings.qat == "off" else why})
        return out
    log(f"      {'over the budget' if not chosen.ok(settings.budget) else '--qat force'}: "
        "quantization-aware fine-tune of the checkpoint")
    t = time.perf_counter()
    qmeta, record = fn(work / "qat", log)
    qb = type(backend)(qmeta, work / "backend_qat")
    c = attempt([], chosen.opts, QAT, qb)
    c.info["qat"] = record
    escalation.append(_step_record(QAT, c, time.perf_counter() - t, settings.budget,
                                   from_step=chosen.step, qat=record))
    if not c.ok(settings.budget) and settings.max_float_layers > 0:
        # QAT, then ops kept in float (ranked again: the fine-tuned model's own sensitivities)
        ptq_ranking = {k: out.get(k) for k in ("ranking", "ranking_s")}
        fb = _fallback(attempt, qb, c, make_engine, calib_x, gates, rank_sets, settings, meta,
                       work / "qat_fallback", log, out)
        out.update(ptq_ranking)
        fb.info["qat"] = record
        c = fb if abs(fb.drift[fb.worst]) < abs(c.drift[c.worst]) else c
    if abs(c.drift[c.worst]) < abs(chosen.drift[chosen.worst]):
        out["chosen"] = c
    return out


def _ptq(attempt, timed, backend, make_engine, calib_x, gates, rank_sets, opts, settings, meta,
         work, log, steps, escalation) -> dict:
    """Steps 1-3 of the escalation (fit_budget)."""
    first, dt = timed(lambda: attempt([], opts, PLAIN))
    escalation.append(_step_record(PLAIN, first, dt, settings.budget))
    out = {"steps": steps, "escalation": escalation, "calibration_s": first.seconds,
           "ranking": None, "chosen": first}
    if first.ok(settings.budget):
        return out
    base = first
    if settings.escalate:
        better_opts = backend.better_options(opts)
        if better_opts is None:
            escalation.append({"step": BETTER, "what": STEPS[BETTER], "status": "skipped",
                               "reason": f"{backend.name} has no better PTQ than these options"})
        else:
            log(f"      over the {settings.budget:.2f}-point budget: {backend.better_note}")
            better, dt = timed(lambda: attempt([], better_opts, BETTER))
            escalation.append(_step_record(BETTER, better, dt, settings.budget,
                                           note=backend.better_note))
            if better.ok(settings.budget):
                out["chosen"] = better
                return out
            if abs(better.drift[better.worst]) < abs(first.drift[first.worst]):
                base = better
    if settings.max_float_layers <= 0:
        out["chosen"] = base
        return out
    out["chosen"] = _fallback(attempt, backend, base, make_engine, calib_x, gates, rank_sets,
                              settings, meta, work, log, out)
    return out


def _fallback(attempt, backend, base, make_engine, calib_x, gates, rank_sets, settings, meta,
              work, log, out) -> Candidate:
    """Step 3 from `base` (a candidate of `backend`): rank its quantized ops, keep them in float
    one at a time; records the step in out["escalation"] and returns the chosen candidate."""
    escalation = out["escalation"]
    t_fallback = time.perf_counter()
    layers = backend.layers(base.folder)
    log(f"      over the {settings.budget:.2f}-point budget: ranking {len(layers)} quantized ops "
        f"by sensitivity on {len(rank_sets[0].faces)} calibration faces ({base.step} options)")
    t = time.perf_counter()
    ranking = rank_layers(backend, layers, make_engine, calib_x, base.opts, rank_sets, meta, work,
                          log, settings.drift_faces)
    out["ranking"] = ranking
    out["ranking_s"] = time.perf_counter() - t
    protocol = {g.key: g.protocol for g in gates}
    best = current = base
    kept: list[dict] = []
    while len(kept) < settings.max_float_layers:
        worst = current.worst
        sign, p = np.sign(current.drift[worst]), protocol[worst]
        left = [r for r in ranking if r not in kept and sign * r["drift_points"][p] > 0]
        if not left:
            break
        kept = kept + [max(left, key=lambda r: sign * r["drift_points"][p])]
        current = attempt(kept, base.opts, FALLBACK, backend)
        if abs(current.drift[current.worst]) < abs(best.drift[best.worst]):
            best = current
        if current.ok(settings.budget):
            break
    chosen = current if current.ok(settings.budget) else best
    escalation.append(_step_record(FALLBACK, chosen, time.perf_counter() - t_fallback,
                                   settings.budget, from_step=base.step,
                                   ranking_s=out["ranking_s"], layers_ranked=len(layers),
                                   kept_float=[k["label"] or k["layer"] for k in chosen.kept]))
    return chosen
