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
4. If |drift| > budget: rank the ops the quantizer quantized by sensitivity (each quantized
   alone, everything else float, scored on the calibration faces, which have ground truth:
   its NME drift against FP32 per crop protocol), then keep ops in float one at a time, each
   time the one whose own drift pushes hardest in the direction of the worst gated drift,
   until the budget holds or `max_float_layers` are float. If it never holds the backend fails: no
   bundle is written (it is assembled in runtime.bundle.staging_dir) and run() reports it.
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
failed faces. Both are always reported (see drift()).
The budget applies to the held-out WFLW train faces (GATE_SETS); the test sets are reported,
never chosen on (the benchmark gate checks their drift again). Landmark crops, not rect: on rect
crops a model fails on many WFLW faces, and INT8 noise helps some of them and hurts others, so
a real loss on well-predicted faces can cancel out in the rect mean.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from common import host_info, now, package_versions, time_interleaved
from evaluation.data import DataError, Face
from evaluation.metrics import evaluate, face_batch, nme_per_face
from evaluation.sets import ScoredSet, SetError, scored_set, scorings
from quantize.backends import BACKENDS, PRESETS, Backend, Layer, Options, QuantizeError, get_backend
from runtime.bundle import META, BundleError, BundleMeta, atomic_write_json, staging_dir
from runtime.decode import Landmarker
from runtime.engines import EngineUnavailable, get_engine
from runtime.schemes import get_scheme

MIN_CALIB_FACES = 16
REPORT = "quantize_report.json"
CALIB_SET = "wflw:calib"
EVAL_SETS = ("wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks")   # reported
GATE_SETS = ("wflw:heldout/landmarks",)   # the budget applies to (and the search chooses on)
UNITS = {"nme": "fraction of the outer-eye-corner distance (0.0450 = 4.50 %)",
         "drift_points": "mean per-face (NME_int8 - NME_fp32) in NME points (percentage "
                         "points), over the faces named by drift_faces",
         "budget_points": "allowed |drift| in NME points; 0.10 = 0.0010 as a fraction",
         "subsets_drift_points": "difference of the WFLW attribute-subset means (all faces)",
         "latency": "milliseconds, batch 1"}


@dataclass(frozen=True)
class Settings:
    method: str = "minmax"
    per_channel: bool = True
    preset: str = "x86"
    bias_correction: str = "none"        # OpenVINO/NNCF only (measured: fast BC hurt)
    calib_samples: int | None = None     # None: every calibration face (~162)
    budget: float = 0.10                 # NME points
    drift_faces: str = "all"             # DRIFT_FACES: which faces the drift is averaged over
    max_float_layers: int = 8            # how many layers the search may keep in float
    rank_faces: int | None = None        # calibration faces scoring the ranking (None: all)
    latency_runs: int = 200
    warmup: int = 20
    threads: int = 1
    calib_set: str = CALIB_SET           # evaluation.sets name of the calibration faces
    eval_sets: tuple[str, ...] = EVAL_SETS   # scored sets reported (SET/PROTOCOL)
    gate_sets: tuple[str, ...] = GATE_SETS   # scored sets the budget applies to
    wflw_root: str | None = None
    w300_root: str | None = None

    def options(self) -> Options:
        return Options(self.method, self.per_channel, self.preset, self.bias_correction)


@dataclass
class EvalSet:
    """One scored figure: a scored set, and (for a multi-output model) which output scores it."""
    key: str
    faces: list[Face]
    protocol: str
    scheme: str          # annotation scheme of the faces
    description: str
    output: int = 0      # index into the model's outputs
    as68: bool = False   # scored through the 98 -> 68 map on both sides


@dataclass
class Data:
    calib: list[Face]
    record: dict          # what goes into meta.json / the report about the calibration set
    sets: list[ScoredSet]  # reported sets, the gated ones first (the first is the headline)
    extra: dict = field(default_factory=dict)
    calib_protocol: str = "rect"   # crop protocol of the calibration crops


Log = Callable[[str], None]


# -- data -------------------------------------------------------------------------------------
def _ident(face: Face) -> tuple[str, str]:
    """(image path relative to the data root, annotation 'file:line' relative to it)."""
    parts = Path(face.image_path).parts
    image = "/".join(parts[parts.index("WFLW_images") + 1:]) if "WFLW_images" in parts \
        else Path(face.image_path).name
    src, _, line = face.source.rpartition(":")
    return image, f"{Path(src).name}:{line}" if src else face.source


def _list_sha(items: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def _load_images(faces: list[Face], what: str) -> None:
    for f in faces:
        try:
            f.image()
        except DataError as e:
            raise QuantizeError(f"{what}: {e}") from None


def _roots(settings: Settings) -> dict:
    return {"wflw": settings.wflw_root, "300w": settings.w300_root}


def load_data(settings: Settings) -> Data:
    """Calibration faces and the scored sets, every image read once."""
    roots = _roots(settings)
    try:
        calib_scored = scored_set(settings.calib_set, roots.get(settings.calib_set.split(":")[0]))
        calib_all, calib_protocol = calib_scored.faces(), calib_scored.protocol
        keys = list(dict.fromkeys([*settings.gate_sets, *settings.eval_sets]))
        sets, cache = [], {}
        for k in keys:
            s = scored_set(k, roots.get(k.split(":")[0]))
            s._faces = cache.setdefault(s.info.key, s.faces())
            sets.append(s)
    except (DataError, SetError) as e:
        raise QuantizeError(str(e)) from None
    n = len(calib_all) if settings.calib_samples is None else int(settings.calib_samples)
    if n < MIN_CALIB_FACES:
        raise QuantizeError(f"{n} calibration faces is too few: at least {MIN_CALIB_FACES} are "
                            "needed for stable activation ranges (--calib-samples)")
    if n > len(calib_all):
        raise QuantizeError(f"--calib-samples {n}: the calibration split ({settings.calib_set}) has "
                            f"only {len(calib_all)} faces")
    calib = calib_all[:n]
    _load_images(calib, "calibration image")
    for s in sets:
        _load_images(s.faces(), f"{s.key} image")
    ids = [_ident(f) for f in calib]
    record = {
        "set": settings.calib_set,
        "dataset": scored_set(settings.calib_set).info.description,
        "split": "evaluation.data.wflw_calibration: WFLW train faces not held out, crc32(hold-out "
                 "key) % 8 == 0 (deterministic; no test face)" if settings.calib_set == "wflw:calib"
                 else scored_set(settings.calib_set).info.description,
        "selection": f"first {n} of {len(calib_all)} calibration faces in annotation order",
        "protocol": calib_protocol,
        "preprocess": "evaluation.metrics.face_batch with the parent bundle's preprocessing",
        "count": n,
        "sha256": _list_sha([f"{img}|{ann}" for img, ann in ids]),
        "sha256_of": "sorted 'image|annotation-file:line' lines joined by newlines",
        "faces": [{"image": img, "annotation": ann} for img, ann in ids],
    }
    headline = sets[0].faces()
    extra = {"evaluation_sha256": _list_sha(["|".join(_ident(f)) for f in headline])}
    return Data(calib, record, sets, extra, calib_protocol)


def figures(meta: BundleMeta, sets: list[ScoredSet]) -> list[EvalSet]:
    """Every figure a model is scored by: per scored set, its native output (and "@68")."""
    out = []
    for s in sets:
        for sc in scorings([o.scheme for o in meta.outputs], s.scheme):
            out.append(EvalSet(s.key + sc.suffix, s.faces(), s.protocol, s.scheme,
                               s.info.description, sc.output, sc.as68))
    return out


# -- scoring ------------------------------------------------------------------------------------
def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _outputs(engine, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(engine(x[i:i + batch])) for i in range(0, len(x), batch)])


def score(engine, meta: BundleMeta, s: EvalSet, batch: int) -> dict:
    """evaluation.metrics.evaluate of an engine on one figure, decoded by the runtime from
    the bundle's description, with the bundle's own preprocessing."""
    lm = Landmarker(meta, engine, s.output)
    return evaluate(lm, s.faces, meta.preprocess, lm.scheme, get_scheme(s.scheme), s.protocol,
                    batch=batch, as68=s.as68)


FAIL_NME = 0.10        # evaluation.metrics' failure threshold (FR@0.10)
MIN_DRIFT_FACES = 30   # fewest localised faces a drift on "ok" faces is taken over
DRIFT_FACES = {
    "ok": "faces the FP32 model localises (FP32 NME <= 0.10); failures excluded",
    "all": "every face",
}


def drift(fp32: dict, int8: dict, faces: str) -> float:
    """Mean per-face NME change in NME points, over `faces` (see DRIFT_FACES).

    "all" is the issue's rule and Settings' default. "ok" exists because the mean over all
    faces is ruled by the FP32 model's failures
    (on the WFLW rect crops a 300-W model fails on more than half the faces; profile faces with
    a tiny eye-corner distance reach NMEs of 100 % and more): a prediction that is wrong anyway
    moves a lot under any perturbation. Gaussian input noise of 1 gray level, WFLW evaluation
    faces: with the ReLU PFLD (epoch 100) it moved the all-faces mean by up to 0.37 NME points
    and the localised-faces mean by < 0.01; with the ReLU6 PFLD up to 0.05 and 0.035.
    """
    d = np.asarray(int8["_nme"]) - np.asarray(fp32["_nme"])
    if faces == "ok":
        d = d[np.asarray(fp32["_nme"]) <= FAIL_NME]
    elif faces != "all":
        raise QuantizeError(f"drift faces {faces!r}: expected one of {', '.join(DRIFT_FACES)}")
    return float(d.mean() * 100) if d.size else 0.0


def compare(fp32: dict, int8: dict, faces: str) -> dict:
    ok = np.asarray(fp32["_nme"]) <= FAIL_NME
    out = {"fp32": _strip(fp32), "int8": _strip(int8),
           "drift_points": drift(fp32, int8, faces), "drift_faces": faces,
           "drift_faces_count": int(ok.sum() if faces == "ok" else ok.size),
           "drift_points_all_faces": drift(fp32, int8, "all"),
           "drift_points_localised_faces": drift(fp32, int8, "ok"),
           "median_face_drift_points": float(np.median(int8["_nme"] - fp32["_nme"]) * 100)}
    if "subsets" in fp32 and "subsets" in int8:
        out["subsets_drift_points"] = {k: (int8["subsets"][k]["nme"] - v["nme"]) * 100
                                       for k, v in fp32["subsets"].items() if k in int8["subsets"]}
    return out


def within(drift_points: float, budget: float) -> bool:
    return abs(drift_points) <= budget + 1e-9


def measure_latency(fp32, int8, x1: np.ndarray, runs: int, warmup: int) -> dict:
    """Median/p90 ms of batch-1 calls, FP32 and INT8 interleaved so load drift hits both."""
    t = time_interleaved({"fp32": fp32, "int8": int8}, x1, warmup, runs)
    return {**t, "ratio": t["int8"]["median_ms"] / t["fp32"]["median_ms"], "runs": runs,
            "warmup": warmup, "batch": 1}


# -- sensitivity search ---------------------------------------------------------------------------
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
    """Step 3: quantize, and keep ops in float while a gated figure is over the budget."""
    opts, settings = job.settings.options(), job.settings
    log(f"    quantize with {len(data.calib)} calibration faces ({opts.method}, "
        f"{'per-channel' if opts.per_channel else 'per-tensor'}, preset {opts.preset})")
    rank_n = settings.rank_faces or len(data.calib)
    first_out = job.gates[0].output if job.gates else 0
    rank_sets = [EvalSet(f"calibration_{p}", data.calib[:rank_n], p, job.gates[0].scheme,
                         "calibration faces (sensitivity ranking only)", first_out)
                 for p in dict.fromkeys(g.protocol for g in job.gates)]
    return fit_budget(backend, job.engine, job.calib_x, job.gates, rank_sets, opts, settings,
                      fp32, job.meta, work, log)


def _search_record(search: dict) -> dict:
    chosen: Candidate = search["chosen"]
    return {
        "calibration_s": search["calibration_s"],
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
    settings, opts = job.settings, job.settings.options()
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
        meta.quantization = {
            "backend": job.name, "method": opts.method,
            "method_detail": job.cls.methods[opts.method],
            "per_channel": opts.per_channel, "preset": opts.preset,
            "preset_detail": PRESETS[opts.preset], "settings": chosen.info["settings"],
            "layers_kept_float": _search_record(search)["layers_kept_float"],
            "calibration": data.record, "calibration_s": search["calibration_s"],
        }
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
