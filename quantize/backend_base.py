"""INT8 post-training quantizers, one small class per backend, behind one registry.

Each backend turns an FP32 bundle of its engine format into an INT8 model file:

    onnxruntime  onnxruntime.quantization.quantize_static, QDQ, on the FP32 ONNX bundle
                 (after quant_pre_process)
    openvino     nncf.quantize on the FP32 OpenVINO IR bundle
    tflite       ai-edge-quantizer (installed with litert-torch) static int8 recipe on the FP32
                 .tflite bundle: a full-integer model (int8 input and output tensors)

Each backend also names its *better* post-training quantization (`better`: the Options the
escalation in quantize.search tries when the plain settings miss the budget): activation
ranges from histograms ("histogram": quantize.ranges for onnxruntime and ai-edge-quantizer,
NNCF's HISTOGRAM estimator for OpenVINO) and, on onnxruntime, `graph_fixes`: averaging pools
quantize their output with a range of its own (quantize_static gives an AveragePool's output
its input's scale: PFLD-GhostOne's pooled features got 11 to 15 levels, and that is +1.0 of
its +1.17 NME points of drift), concat inputs share the concat's range (no requantization,
and faster) and the model's outputs stay float (the last op's output, not its computation).
Measured in docs/quantization.md ("Why GhostOne's onnxruntime INT8 drifted").

A backend knows the FP32 stages it starts from (`parents`, first found wins), the stage it
writes (`stage`), which calibration methods it supports (`methods`), how the x86/arm presets
(PRESETS) map onto its settings, and, given a fully quantized model, which ops it quantized
(`layers`): the drift search's candidates for keeping in float. `quantize(..., exclude=[...])`
keeps ops float (ORT nodes_to_exclude, NNCF ignored_scope, ai-edge-quantizer no_quantize
recipe entries, plus the transposes/pads feeding them); `quantize(..., only=[...])` quantizes
just those (the sensitivity ranking). Calibration statistics are computed once per batch and
reused by every exclude/only variant where the tool allows it (ORT's calibration cache,
ai-edge-quantizer's QSVs); NNCF recalibrates (about 1 s per call for this network).

Measured choices (PFLD, 68 points, width 0.5, on the WFLW evaluation faces): min/max ranges
for plain PTQ everywhere (ORT's entropy method gave identical scales; ai-edge-quantizer's default
moving-average min/max clipped activations); NNCF bias correction off by default (its fast
bias correction added 2.6 to 6.0 NME points of drift with both the ReLU and the ReLU6
checkpoint; without it NNCF drifted no more than onnxruntime).

The registry BACKENDS is what the CLI offers and what the tests parametrize over.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common import quiet as _quiet
from runtime.bundle import BundleMeta
from runtime.errors import LandmarkError


class QuantizeError(LandmarkError):
    """Bad input to the quantizer (data, bundle, option); the message says what and where."""


def quiet():
    """Quantizer chatter off the console (see common.quiet)."""
    return _quiet("quantizer")


# Presets: what "x86" and "arm" mean for each backend (also written to every INT8 meta.json).
PRESETS = {
    "x86": "asymmetric 8-bit activations (u8 on onnxruntime, NNCF 'mixed'), symmetric s8 "
           "weights; VNNI u8 x s8 kernels",
    "arm": "symmetric s8 activations and symmetric s8 weights (s8 x s8 dot-product kernels)",
}


@dataclass(frozen=True)
class Layer:
    name: str          # backend-native name used for exclusion
    kind: str          # op type (Conv, Convolution, CONV_2D, ...)
    label: str = ""    # readable name (torch module path) where the backend can tell


@dataclass(frozen=True)
class Options:
    method: str = "minmax"
    per_channel: bool = True
    preset: str = "x86"
    bias_correction: str = "none"     # NNCF only: fast | full | none
    graph_fixes: bool = False         # onnxruntime only: own pool ranges, shared concat ranges,
                                      # float model outputs (see the module docstring)

    def describe(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "preset": self.preset,
                "bias_correction": self.bias_correction, "graph_fixes": self.graph_fixes}


BIAS_CORRECTION = ("fast", "full", "none")


def _digest(x: np.ndarray) -> str:
    """Identity of a calibration batch, for reusing calibration statistics."""
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def _version(dist: str) -> str:
    from common import package_versions
    return package_versions([dist]).get(dist, "not installed")


class Backend:
    name = ""
    engine = ""                         # runtime.engines name that runs the result
    # machines an INT8 model of a preset is known to run on (None: any); written to meta.json
    # and enforced by the runtime. Set from what `make arm-check` found, never guessed.
    architectures: dict[str, tuple[str, ...] | None] = {}
    architectures_note: str = ""
    parents: tuple[str, ...] = ()        # FP32 stages to start from, in order of preference
    stage = ""                           # INT8 stage written
    modules: tuple[tuple[str, str], ...] = ()   # (import name, pip package)
    methods: dict[str, str] = {}         # method -> what the backend does for it
    primary = ""                         # INT8 primary file name
    eval_batch = 32                      # faces per engine call when scoring
    precision: str | None = None         # engine precision hint for FP32 and INT8 scoring
    # the better post-training quantization the escalation tries after the plain settings
    # (quantize.search.fit_budget): Options fields to change; {} when the tool offers none
    better: dict = {}
    better_note = ""

    @classmethod
    def better_options(cls, opts: Options) -> Options | None:
        """The escalation's second step from `opts`; None when it would change nothing."""
        better = replace(opts, **cls.better)
        return None if better == opts else better

    @classmethod
    def available(cls) -> tuple[bool, str]:
        for mod, pkg in cls.modules:
            if importlib.util.find_spec(mod) is None:
                return False, f"{cls.name} quantization needs the Python package '{pkg}' " \
                              f"(pip install {pkg})"
        return True, ""

    @classmethod
    def check_method(cls, method: str) -> None:
        if method not in cls.methods:
            raise QuantizeError(f"--method {method} is not supported by the {cls.name} quantizer; "
                                f"it supports: {', '.join(cls.methods)}")

    def __init__(self, fp32_meta: BundleMeta, work: Path):
        self.meta = fp32_meta
        self.src = fp32_meta.model_file
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._cache: dict = {}
        self._layers: list[Layer] = []

    def layers(self, int8_dir: Path) -> list[Layer]:
        """The ops the quantizer actually quantized in the full INT8 model written to `int8_dir`
        (those reading a quantized tensor), in graph order: the drift search's candidates."""
        self._layers = self._layers_of(Path(int8_dir))
        return self._layers

    def _layers_of(self, int8_dir: Path) -> list[Layer]:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, calib: np.ndarray, opts: Options, out: Path, exclude=(), only=None) -> dict:
        """Write the INT8 model into folder `out`; return {"files": [...], "settings": {...}}.

        `calib`: NCHW float32 calibration crops. `exclude`: layer names kept float. `only`:
        if given, quantize just these layers (the sensitivity ranking).
        """
        self.check_method(opts.method)
        with quiet():
            return self._quantize(calib, opts, Path(out), list(exclude), only)

    def _quantize(self, calib, opts, out, exclude, only) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def tool_versions(self) -> dict:
        return {pkg: _version(pkg) for _, pkg in self.modules}


# -- onnxruntime ----------------------------------------------------------------------------
