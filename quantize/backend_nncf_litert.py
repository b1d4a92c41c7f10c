"""OpenVINO's (NNCF) and LiteRT's (ai-edge-quantizer) INT8 quantizers; registered in
quantize.backends.BACKENDS.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace

import numpy as np

from quantize.backend_base import BIAS_CORRECTION, Backend, Layer, QuantizeError, _digest


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
                             "1e-4 / 1-1e-4 quantiles)",
               "histogram": "RangeEstimatorParametersSet.HISTOGRAM (NNCF's HistogramObserver: "
                            "the range with the least quantization error on a histogram)"}
    better = {"method": "histogram"}
    better_note = "NNCF's HISTOGRAM range estimator for activations"
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
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )
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
                     "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
                     "histogram": RangeEstimatorParametersSet.HISTOGRAM}[opts.method]
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
                         "calibration faces)",
               "histogram": "MIN_MAX_UNIFORM_QUANT on min/max QSVs narrowed per tensor to the "
                            "least 8-bit rounding + clipping error on a histogram of the "
                            "calibration values (quantize.ranges)"}
    better = {"method": "histogram"}
    better_note = "histogram ranges (quantize.ranges) for the calibrated tensors"
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
        """Per-tensor min/max over all calibration faces (computed once per batch); with
        method "histogram" narrowed per tensor by quantize.ranges."""
        from ai_edge_quantizer import calibrator, recipe_manager
        from ai_edge_quantizer.utils import qsv_utils
        if opts.method == "histogram":
            key = ("histogram", opts.preset, opts.per_channel, _digest(calib))
            if key not in self._cache:
                qsv = self._calibration(calib, replace(opts, method="minmax"))
                self._cache[key] = self._histogram_qsv(calib, qsv)
            return self._cache[key]
        key = (opts.method, opts.preset, opts.per_channel, _digest(calib))
        if key not in self._cache:
            it = self._interp()
            sig = it.get_signature_list()
            if not sig:
                raise QuantizeError(f"{self.src} has no signature; ai-edge-quantizer needs one "
                                    "(re-export it with litert-torch)")
            sig_key = next(iter(sig))
            inp = sig[sig_key]["inputs"][0]
            x = self._nhwc_input(it, calib)
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

    def _nhwc_input(self, it, calib):
        shape = it.get_input_details()[0]["shape"]
        return calib.transpose(0, 2, 3, 1) if shape[-1] == 3 and shape[1] != 3 else calib

    def _histogram_qsv(self, calib, qsv: dict) -> dict:
        """The min/max QSVs with each activation's range from quantize.ranges, its values
        read from the FP32 interpreter (every intermediate tensor kept)."""
        from ai_edge_litert.interpreter import Interpreter

        from quantize.ranges import Histograms
        it = Interpreter(model_path=str(self.src), experimental_preserve_all_tensors=True)
        it.allocate_tensors()
        index = {t["name"]: t["index"] for t in it.get_tensor_details()}
        names = [n for n, v in qsv.items() if n in index and "min" in v and "max" in v]
        hists = Histograms({n: (float(np.min(qsv[n]["min"])), float(np.max(qsv[n]["max"])))
                            for n in names})
        x = self._nhwc_input(it, calib)
        inp = it.get_input_details()[0]["index"]
        for i in range(len(x)):
            it.set_tensor(inp, np.ascontiguousarray(x[i:i + 1]))
            it.invoke()
            hists.add({n: it.get_tensor(index[n]) for n in names})
        out = {n: dict(v) for n, v in qsv.items()}
        for n, (lo, hi) in hists.ranges().items():
            out[n]["min"] = np.full_like(np.asarray(qsv[n]["min"]), lo)
            out[n]["max"] = np.full_like(np.asarray(qsv[n]["max"]), hi)
        return out

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
            "ranges": self.methods[opts.method],
            "activations": "int8 " + ("symmetric" if opts.preset == "arm" else "asymmetric") +
                           " per-tensor", "weights": "int8 symmetric " +
                           ("per-channel" if opts.per_channel else "per-tensor"),
            "io": "int8 input and output tensors (runtime engine (de)quantizes)",
            "no_quantize": list(exclude)}}
