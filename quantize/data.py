"""The faces a quantization works on, and its settings: `load_data(settings)` reads the
calibration faces (the first `calib_samples` of the calibration set, default wflw:calib) and
every scored set (the gated ones first), each image once, and records what was used (count,
annotation list, sha256) for meta.json and the report; `figures` lists every figure a bundle
is scored by (per set its native output, and "@68" through the 98 -> 68 map). Settings (every
option of a run), EvalSet and Data are the records quantize.scoring, quantize.search and
quantize.core pass around; quantize.core re-exports the public names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evaluation.data import DataError, Face
from evaluation.sets import ScoredSet, SetError, scored_set, scorings
from quantize.backends import Options, QuantizeError
from runtime.bundle import BundleMeta

MIN_CALIB_FACES = 16
CALIB_SET = "wflw:calib"
EVAL_SETS = ("wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks")   # reported
GATE_SETS = ("wflw:heldout/landmarks",)   # the budget applies to (and the search chooses on)


@dataclass(frozen=True)
class Settings:
    method: str = "minmax"
    per_channel: bool = True
    preset: str = "x86"
    bias_correction: str = "none"        # OpenVINO/NNCF only (measured: fast BC hurt)
    graph_fixes: bool = False            # onnxruntime only (quantize.backends.Options)
    escalate: bool = True                # plain PTQ -> better PTQ -> float fallback -> QAT
    qat: str = "auto"                    # auto (when the PTQ steps miss) | off | force (search.py)
    qat_steps: int = 300                 # fine-tune steps (quantize.qat.QatOptions)
    qat_set: str = "wflw:fit"            # the faces QAT fine-tunes on (never a gated or test set)
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
        return Options(self.method, self.per_channel, self.preset, self.bias_correction,
                       self.graph_fixes)


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
