"""INT8 post-training quantizers, one small class per backend, behind one registry.

Each backend turns an FP32 bundle of its engine format into an INT8 model file:

    onnxruntime  onnxruntime.quantization.quantize_static, QDQ, on the FP32 ONNX bundle
                 (after quant_pre_process)
    openvino     nncf.quantize on the FP32 OpenVINO IR bundle
    tflite       ai-edge-quantizer (installed with litert-torch) static int8 recipe on the FP32
                 .tflite bundle: a full-integer model (int8 input and output tensors)

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
everywhere (ORT's entropy method gave identical scales; ai-edge-quantizer's default
moving-average min/max clipped activations); NNCF bias correction off by default (its fast
bias correction added 2.6 to 6.0 NME points of drift with both the ReLU and the ReLU6
checkpoint; without it NNCF drifted no more than onnxruntime).

The registry BACKENDS is what the CLI offers and what the tests parametrize over.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
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
class OnnxRuntimeQuantizer(Backend):
    name, engine, stage, primary = "onnxruntime", "onnxruntime", "onnx_int8", "model.onnx"
    parents = ("onnx_sim_fp32", "onnx_fp32")
    modules = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))
    methods = {"minmax": "CalibrationMethod.MinMax (min/max over all calibration faces)",
               "percentile": "CalibrationMethod.Percentile (99.999th percentile of |x|)",
               "entropy": "CalibrationMethod.Entropy (KL-divergence threshold)"}
    MIN_OPSET = 13     # per-channel QDQ (DequantizeLinear's axis) needs opset 13

    upgraded_from: int | None = None

    def _prepared(self) -> Path:
        """quant_pre_process once: shape inference + ORT graph optimisation before QDQ. A graph
        of an older opset (an imported model) is converted to MIN_OPSET first."""
        pre = self.work / "pre.onnx"
        if not pre.is_file():
            import onnx
            from onnxruntime.quantization import quant_pre_process
            src = self.src
            m = onnx.load(str(src))
            opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
            if opset < self.MIN_OPSET:
                from onnx import version_converter
                src = self.work / f"opset{self.MIN_OPSET}.onnx"
                onnx.save(version_converter.convert_version(m, self.MIN_OPSET), str(src))
                self.upgraded_from = opset
            quant_pre_process(str(src), str(pre))
        return pre

    def _layers_of(self, int8_dir):
        import onnx
        labels = {}
        for n in onnx.load(str(self._prepared()), load_external_data=False).graph.node:
            # torch.onnx (dynamo) records the module path: ['', 'stem', 'stem.0', 'stem.0.1', op]
            scope = {p.key: p.value for p in n.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
            parts = [s.strip(" '\"") for s in scope.strip("[]").split(",")] if scope else []
            labels[n.name] = parts[-2] if len(parts) >= 2 else ""
        q = onnx.load(str(int8_dir / self.primary), load_external_data=False)
        dq = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
        return [Layer(n.name, n.op_type, labels.get(n.name, "")) for n in q.graph.node
                if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name in labels
                and any(i in dq for i in n.input)]

    def _quantize(self, calib, opts, out, exclude, only):
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[opts.method]
        act = QuantType.QUInt8 if opts.preset == "x86" else QuantType.QInt8
        extra = {"ActivationSymmetric": opts.preset == "arm", "WeightSymmetric": True}
        name = next(iter(self._input_names()))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib[i:i + 1] for i in range(len(calib)))

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {name: x}

        # calibration ranges depend only on (model, data, method): computed once, reused by the
        # drift search's many exclude/only variants
        key = (opts.method, opts.preset, _digest(calib))
        cache = self._cache.setdefault(
            key, self.work / f"calib_{opts.method}_{len(self._cache)}.json")
        out.mkdir(parents=True, exist_ok=True)
        quantize_static(str(self._prepared()), str(out / self.primary), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                        reduce_range=False, activation_type=act, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), nodes_to_quantize=list(only or []),
                        calibrate_method=method, extra_options=extra,
                        calibration_cache_path=str(cache))
        opset = next((o.version for o in onnx.load(str(out / self.primary)).opset_import
                      if o.domain in ("", "ai.onnx")), None)
        return {"files": [self.primary], "opset": opset, "settings": {
            "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "pre_process": "quant_pre_process" + (
                f" after onnx.version_converter opset {self.upgraded_from} -> {self.MIN_OPSET}"
                if self.upgraded_from else ""),
            "activations": str(act).split(".")[-1],
            "weights": "QInt8", "per_channel": opts.per_channel, "reduce_range": False,
            "activation_symmetric": opts.preset == "arm", "calibrate_method": str(method),
            "nodes_to_exclude": list(exclude)}}

    def _input_names(self):
        import onnx
        m = onnx.load(str(self._prepared()), load_external_data=False)
        init = {i.name for i in m.graph.initializer}
        return [i.name for i in m.graph.input if i.name not in init]


# -- OpenVINO through NNCF ------------------------------------------------------------------
class NNCFQuantizer(Backend):
    name, engine, stage, primary = "openvino", "openvino", "openvino_int8", "model.xml"
    # f32 pins the float parts (and the FP32 reference) to full precision: the default on CPUs
    # with bf16 would add bf16 rounding to what should be the INT8 cost alone
    precision = "f32"
    parents = ("openvino_fp32",)
    modules = (("openvino", "openvino"), ("nncf", "nncf"))
    # `make arm-check` (emulated Cortex-A76, openvino 2026.4.1): our PFLD's INT8 IR fails to
    # compile on aarch64 ("Check 'any_of(scale.size(), OC, 1U)' failed at
    # dnnl_postops_composer.cpp:526"), per-channel or per-tensor alike; with its depthwise
    # GroupConvolutions left float it compiles but lands 12.9 NME points off x86, and
    # PFLD-GhostOne's compiles but lands 2.7 points off. So OpenVINO INT8 is x86-only here.
    architectures = {"x86": ("x86_64",), "arm": ("x86_64",)}
    architectures_note = ("on aarch64 the OpenVINO CPU plugin refuses this INT8 IR or runs it "
                          "far off its x86 result (make arm-check); use onnx_int8 or "
                          "tflite_int8 there")
    methods = {"minmax": "RangeEstimatorParametersSet.MINMAX (min of mins, max of maxes)",
               "percentile": "RangeEstimatorParametersSet.MEAN_QUANTILE (mean of per-face "
                             "1e-4 / 1-1e-4 quantiles)"}
    def _model(self):
        import openvino as ov
        return ov.Core().read_model(str(self.src))

    def _layers_of(self, int8_dir):
        import openvino as ov
        fp32 = {op.get_friendly_name() for op in self._model().get_ops()}
        q = ov.Core().read_model(str(int8_dir / self.primary))
        out = []
        for op in q.get_ordered_ops():
            srcs = [i.get_source_output().get_node() for i in op.inputs()]
            # activations pass through FakeQuantize; int8 weights through Convert -> Multiply
            quantized = any(n.get_type_name() == "FakeQuantize" or "/fq_weights" in
                            n.get_friendly_name() for n in srcs)
            if quantized and op.get_type_name() != "FakeQuantize" \
                    and op.get_friendly_name() in fp32:
                out.append(Layer(op.get_friendly_name(), op.get_type_name()))
        return out

    def _quantize(self, calib, opts, out, exclude, only):
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           QuantizationParameters)
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
        nncf.set_log_level(logging.WARNING)   # its INFO lines list every skipped quantizer
        model = self._model()
        if only is not None:
            # everything else float: the other candidates by name, every other op type by type
            keep = set(only)
            names = [ly.name for ly in self._layers if ly.name not in keep]
            kinds = {ly.kind for ly in self._layers}
            types = sorted({op.get_type_name() for op in model.get_ops()} - kinds)
            scope = nncf.IgnoredScope(names=names, types=types, validate=False)
        else:
            scope = nncf.IgnoredScope(names=list(exclude)) if exclude else None
        estimator = {"minmax": RangeEstimatorParametersSet.MINMAX,
                     "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE}[opts.method]
        preset = nncf.QuantizationPreset.MIXED if opts.preset == "x86" else \
            nncf.QuantizationPreset.PERFORMANCE
        if opts.bias_correction not in BIAS_CORRECTION:
            raise QuantizeError(f"bias correction {opts.bias_correction!r}: expected one of "
                                f"{', '.join(BIAS_CORRECTION)}")
        adv = AdvancedQuantizationParameters(
            activations_range_estimator_params=estimator,
            weights_quantization_params=QuantizationParameters(per_channel=opts.per_channel),
            disable_bias_correction=opts.bias_correction == "none")
        data = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
        kwargs = {"ignored_scope": scope} if scope is not None else {}
        q = nncf.quantize(model, data, preset=preset, target_device=nncf.TargetDevice.CPU,
                          subset_size=len(calib),
                          fast_bias_correction=opts.bias_correction != "full",
                          advanced_parameters=adv, **kwargs)
        out.mkdir(parents=True, exist_ok=True)
        ov.save_model(q, str(out / self.primary), compress_to_fp16=False)
        return {"files": [self.primary, "model.bin"], "settings": {
            "tool": "nncf.quantize", "preset": str(preset), "target_device": "CPU",
            "range_estimator": opts.method, "per_channel_weights": opts.per_channel,
            "bias_correction": opts.bias_correction, "subset_size": len(calib),
            "ignored_scope": list(exclude)}}


# -- TFLite through ai-edge-quantizer ----------------------------------------------------------
_TORCH_SCOPE = re.compile(r"[A-Za-z0-9_.]+?\.([A-Za-z0-9]+)_([A-Za-z0-9_]+)$")


def _tflite_label(tensor: str) -> str:
    """'PFLD/...Sequential_stem/...Sequential_0/...Conv2d_0;1' -> 'stem.0.0' (best effort)."""
    last = tensor.split(";;")[-1].split(";")[0]
    parts = []
    for seg in last.split("/")[1:]:
        m = _TORCH_SCOPE.match(seg)
        if m:
            parts.append(m.group(2))
    return ".".join(parts)


class LiteRTQuantizer(Backend):
    name, engine, stage, primary = "tflite", "tflite", "tflite_int8", "model.tflite"
    eval_batch = 1        # converted graphs have a static batch of 1 (XNNPACK cannot resize them)
    parents = ("tflite_fp32",)
    modules = (("ai_edge_quantizer", "ai-edge-quantizer"), ("ai_edge_litert", "ai-edge-litert"))
    methods = {"minmax": "MIN_MAX_UNIFORM_QUANT with qsv_utils.min_max_update (min/max over all "
                         "calibration faces)"}
    def _interp(self):
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter(model_path=str(self.src))

    def _layers_of(self, int8_dir):
        from ai_edge_litert.interpreter import Interpreter
        it = Interpreter(model_path=str(int8_dir / self.primary))
        tensors = {t["index"]: t for t in it.get_tensor_details()}
        out = []
        for op in it._get_ops_details():  # noqa: SLF001 - the only way to list ops
            # layout ops are not candidates of their own: they go float with the op they feed
            if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "DELEGATE", *self.LAYOUT_OPS):
                continue
            if any(i >= 0 and tensors[i]["dtype"] == np.int8 for i in op["inputs"]):
                # ai-edge-quantizer's op scope: the output tensor names (kept from the FP32 model)
                tensor = ";".join(tensors[i]["name"] for i in op["outputs"] if i >= 0)
                out.append(Layer(tensor, op["op_name"], _tflite_label(tensor)))
        return out

    def _op_config(self, opts):
        return {"activation_tensor_config": {"num_bits": 8, "symmetric": opts.preset == "arm",
                                             "granularity": "TENSORWISE", "dtype": "INT"},
                "weight_tensor_config": {"num_bits": 8, "symmetric": True, "dtype": "INT",
                                         "granularity": "CHANNELWISE" if opts.per_channel
                                         else "TENSORWISE"},
                "compute_precision": "INTEGER", "explicit_dequantize": False,
                "skip_checks": False, "min_weight_elements": 0}

    LAYOUT_OPS = ("TRANSPOSE", "PAD", "PADV2", "RESHAPE", "SQUEEZE", "EXPAND_DIMS")

    def _with_layout_inputs(self, names: list[str]) -> list[str]:
        """`names` plus the layout ops (transpose, pad, reshape, ...) that feed them.

        ai-edge-quantizer quantizes a tensor where it is produced: keeping a conv float while
        the transpose/pad in front of it stays int8 would still feed it a quantized input.
        """
        it = self._interp()
        tensors = {t["index"]: t["name"] for t in it.get_tensor_details()}
        ops = it._get_ops_details()  # noqa: SLF001 - the only way to list ops
        scope = {id(o): ";".join(tensors[i] for i in o["outputs"] if i >= 0) for o in ops}
        producer = {i: o for o in ops for i in o["outputs"] if i >= 0}
        out, todo = list(names), [o for o in ops if scope[id(o)] in set(names)]
        while todo:
            op = todo.pop()
            for i in op["inputs"]:
                src = producer.get(i)
                if src is not None and src["op_name"] in self.LAYOUT_OPS \
                        and scope[id(src)] not in out:
                    out.append(scope[id(src)])
                    todo.append(src)
        return out

    def _recipe(self, opts, exclude=(), only=None):
        def entry(regex, algo="min_max_uniform_quantize"):
            e = {"regex": regex, "operation": "*", "algorithm_key": algo}
            if algo != "no_quantize":
                e["op_config"] = self._op_config(opts)
            return e
        exact = lambda scope: "^" + re.escape(scope + ";") + "$"  # noqa: E731 - op scope format
        if only is not None:
            return [entry(exact(n)) for n in only]
        return [entry(".*")] + [entry(exact(n), "no_quantize") for n in exclude]

    def _calibration(self, calib, opts):
        """Per-tensor min/max over all calibration faces (computed once per batch)."""
        from ai_edge_quantizer import calibrator, recipe_manager
        from ai_edge_quantizer.utils import qsv_utils
        key = (opts.method, opts.preset, opts.per_channel, _digest(calib))
        if key not in self._cache:
            it = self._interp()
            sig = it.get_signature_list()
            if not sig:
                raise QuantizeError(f"{self.src} has no signature; ai-edge-quantizer needs one "
                                    "(re-export it with litert-torch)")
            sig_key = next(iter(sig))
            inp = sig[sig_key]["inputs"][0]
            shape = it.get_input_details()[0]["shape"]
            nhwc = shape[-1] == 3 and shape[1] != 3
            x = calib.transpose(0, 2, 3, 1) if nhwc else calib
            data = {sig_key: [{inp: np.ascontiguousarray(x[i:i + 1])} for i in range(len(x))]}
            rm = recipe_manager.RecipeManager()
            rm.load_quantization_recipe(self._recipe(opts))
            # true min/max like the other backends; Quantizer.calibrate would use a moving
            # average (factor 0.95), whose narrower ranges clip the outermost activations
            cal = calibrator.Calibrator(str(self.src), num_threads=1,
                                        qsv_update_func=qsv_utils.min_max_update)
            cal.calibrate(data, rm)
            self._cache[key] = cal.get_model_qsvs()
        return self._cache[key]

    def _quantize(self, calib, opts, out, exclude, only):
        from ai_edge_quantizer import quantizer as aeq
        # calibrated with the full recipe once; QSVs are per tensor, so they serve every
        # exclude/only variant of the search
        qsv = self._calibration(calib, opts)
        exclude = self._with_layout_inputs(exclude) if exclude else []
        q = aeq.Quantizer(str(self.src))
        q.load_quantization_recipe(self._recipe(opts, exclude, only))
        res = q.quantize(qsv, enable_progress_bar=False, enable_progress_report=False)
        out.mkdir(parents=True, exist_ok=True)
        res.export_model(str(out / self.primary), overwrite=True)
        from ai_edge_litert.interpreter import Interpreter
        in_dtype = Interpreter(model_path=str(out / self.primary)).get_input_details()[0]["dtype"]
        return {"files": [self.primary], "input_dtype": np.dtype(in_dtype).name, "settings": {
            "tool": "ai_edge_quantizer static int8 recipe (min_max_uniform_quantize)",
            "activations": "int8 " + ("symmetric" if opts.preset == "arm" else "asymmetric") +
                           " per-tensor", "weights": "int8 symmetric " +
                           ("per-channel" if opts.per_channel else "per-tensor"),
            "io": "int8 input and output tensors (runtime engine (de)quantizes)",
            "no_quantize": list(exclude)}}


BACKENDS: dict[str, type[Backend]] = {
    OnnxRuntimeQuantizer.name: OnnxRuntimeQuantizer,
    NNCFQuantizer.name: NNCFQuantizer,
    LiteRTQuantizer.name: LiteRTQuantizer,
}


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise QuantizeError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)} or all")
    return BACKENDS[name]
