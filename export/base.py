"""Shared ground of the export stage: its errors, constants and the records every other part
works on. Target is one registry entry (export.targets), Source what an export starts from
(export.sources builds one), Job one export run (the source, the parity faces and the bundles
built so far, whose decoded outputs it runs and caches through _run_bundle). The other export
modules import from here and never the other way round; export.stages re-exports the public
names, so code outside the package keeps importing them from export.stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common import quiet
from runtime.bundle import BundleMeta, InputSpec, OutputSpec
from runtime.decode import Landmarker
from runtime.engines import ENGINES, EngineUnavailable
from runtime.preprocess import Preprocess
from runtime.errors import LandmarkError

REPO = Path(__file__).resolve().parents[1]
TOL_FP32 = 1e-4          # max |diff| on crop-normalised coordinates (0.011 px of a 112 crop)
TOL_FP16 = 2e-3
# heatmap outputs: tolerance on the raw maps (values in [0, 1]) = this x the target's. The maps
# are not averaged by a final fully connected layer: the first trained heatmap model's FP16
# weight cast moved them by up to 5.1e-3 (decoded points: mean 2.5e-5), FP32 conversions 3e-6
HEATMAP_RAW_FACTOR = 5.0
PARITY_SETS = (("wflw:test/rect", 32), ("300w:helen_test/landmarks", 8))   # real faces, every
REPORT = "export_report.json"                                               # n-th of the set
SOURCE = "source"        # the lineage root: the checkpoint's torch model, or the imported file


class ExportError(LandmarkError):
    """A conversion or its parity check failed; the message names the target and the figures."""


class ExportInputError(ExportError):
    """Bad input (checkpoint, model, spec, output folder, target name, missing package):
    nothing was built."""


class TargetSkipped(Exception):
    """A target that cannot be built from this source here; the message says what would."""


@dataclass(frozen=True)
class Target:
    name: str
    parent: str | None           # target it is converted from; None: the source
    engine: str                  # runtime.engines name that runs it
    precision: str               # fp32 | fp16
    tolerance: float             # max |diff| against `reference` on real faces
    build: Callable[["Job", Path, Path | None], dict]   # (job, folder, parent model file)
    reference: str | None = ""   # target it is checked against; "" = its parent, None = source
    needs: tuple[tuple[str, str], ...] = ()   # (module, pip package) the conversion imports
    tools: tuple[str, ...] = ()               # distributions whose versions go to meta.json

    @property
    def checked_against(self) -> str | None:
        return self.parent if self.reference == "" else self.reference


@dataclass
class Source:
    """What an export starts from: a checkpoint (torch model) or an imported model file."""
    kind: str                          # "checkpoint" | "import"
    path: Path
    sha: str
    preprocess: Preprocess
    outputs: list[OutputSpec]          # in the order of the model's outputs
    input: InputSpec
    model: object = None               # eval-mode train.model.PFLD (checkpoint)
    spec: dict | None = None           # the import spec
    spec_path: Path | None = None

    def lineage(self) -> dict:
        if self.kind == "checkpoint":
            return {"source_checkpoint": {"path": _display(self.path), "sha256": self.sha}}
        return {"source_model": {"path": _display(self.path), "sha256": self.sha,
                                 "spec": {k: v for k, v in self.spec.items() if k != "_doc"},
                                 "spec_path": _display(self.spec_path)}}

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Raw outputs of the source model on an NCHW batch."""
        if self.kind == "checkpoint":
            import torch
            with torch.inference_mode():
                y = self.model(torch.from_numpy(x))
            return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]
        eng = ENGINES[self.spec["engine"]](self.path, threads=1, precision="f32")
        if self.input.layout == "NHWC" and not eng.handles_layout:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return eng.run(x)


@dataclass
class Job:
    """One export run: the source, the parity faces and what is built so far."""
    source: Source
    out_dir: Path
    opset: int
    dynamic_batch: bool
    faces: np.ndarray                  # NCHW float32 parity batch of real faces
    face_sets: dict[str, int]
    bundles: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _points: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _raw: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def batch(self) -> str:
        return "dynamic" if self.dynamic_batch else "static"

    @property
    def model(self):
        return self.source.model

    def points_of(self, name: str | None) -> list[np.ndarray]:
        """Decoded points (crop-normalised, per output) of the source (None) or of a finished
        bundle on the parity faces (cached)."""
        self._run(name)
        return self._points[name or SOURCE]

    def raw_of(self, name: str | None) -> list[np.ndarray]:
        """Raw outputs (per output, e.g. heatmaps) of the source or a finished bundle."""
        self._run(name)
        return self._raw[name or SOURCE]

    def _run(self, name: str | None) -> None:
        key = name or SOURCE
        if key not in self._points:
            if name is None:
                raw = self.source.run(self.faces)
                meta = _meta_stub(self.source)
                self._points[key] = [_decode(meta, o, raw) for o in meta.outputs]
                self._raw[key] = [np.asarray(raw[o.index], np.float32) for o in meta.outputs]
            else:
                self._points[key], self._raw[key] = _run_bundle(self.bundles[name], self.faces)


def _meta_stub(src: Source) -> BundleMeta:
    return BundleMeta("", "", "fp32", {}, src.preprocess, src.outputs, src.input)


def _decode(meta: BundleMeta, out: OutputSpec, raw: list[np.ndarray]) -> np.ndarray:
    from runtime.decode import decoder_for
    return np.asarray(decoder_for(out, meta.preprocess.input_size)(raw[out.index]), np.float32)


def _display(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _run_bundle(folder: Path, x: np.ndarray, meta: BundleMeta | None = None
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Decoded points and raw outputs of every output of a bundle at full precision ("f32":
    OpenVINO would otherwise pick bf16 on CPUs that have it; the others run float32 anyway)."""
    meta = meta or BundleMeta.load(folder, verify=False)
    try:
        with quiet():     # e.g. LiteRT's "Created TensorFlow Lite XNNPACK delegate" notice
            eng = ENGINES[meta.engine](meta.model_file, threads=1, precision="f32")
            lm = Landmarker(meta, eng, 0)
            outs = eng.run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if lm.nhwc else x)
    except EngineUnavailable as e:
        raise ExportError(f"cannot run {meta.model_file} for the parity check: {e}") from None
    return ([_decode(meta, o, outs) for o in meta.outputs],
            [np.asarray(outs[o.index], np.float32) for o in meta.outputs])
