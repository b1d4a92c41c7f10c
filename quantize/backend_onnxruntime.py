"""onnxruntime's INT8 quantizer (quantize_static, QDQ), with the better PTQ step's histogram ranges and
graph fixes; registered in quantize.backends.BACKENDS.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from quantize.backend_base import Backend, Layer, _digest


class OnnxRuntimeQuantizer(Backend):
    name, engine, stage, primary = "onnxruntime", "onnxruntime", "onnx_int8", "model.onnx"
    parents = ("onnx_sim_fp32", "onnx_fp32")
    modules = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))
    methods = {"minmax": "CalibrationMethod.MinMax (min/max over all calibration faces)",
               "percentile": "CalibrationMethod.Percentile (99.999th percentile of |x|)",
               "entropy": "CalibrationMethod.Entropy (KL-divergence threshold)",
               "histogram": "CalibrationMethod.MinMax ranges narrowed per tensor to the least "
                            "8-bit rounding + clipping error on a histogram of the calibration "
                            "values (quantize.ranges)"}
    better = {"method": "histogram", "graph_fixes": True}
    better_note = ("histogram ranges (quantize.ranges) and graph fixes: AveragePool outputs "
                   "get their own range, concat inputs share the concat's range, the model "
                   "outputs stay float")
    MIN_OPSET = 13     # per-channel QDQ (DequantizeLinear's axis) needs opset 13
    # quantize_static gives these ops' outputs their input's scale (QDQDirect8BitOp); an
    # average has a far narrower range than its input, so graph_fixes keeps them out of the
    # QDQ pass and their consumer quantizes the pooled values with a range of their own
    POOLS = ("AveragePool",)
    # ops whose output quantize_static quantizes with its input's parameters (QDQDirect8BitOp,
    # MaxPool); AveragePool is one too, but graph_fixes takes it out of the QDQ pass
    SAME_SCALE = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool")
    CALIBRATE = {"minmax": "CalibrationMethod.MinMax", "percentile": "CalibrationMethod.Percentile",
                 "entropy": "CalibrationMethod.Entropy",
                 "histogram": "CalibrationMethod.MinMax, then quantize.ranges per tensor"}

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

    def _reader(self, calib):
        from onnxruntime.quantization import CalibrationDataReader
        name = next(iter(self._input_names()))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib[i:i + 1] for i in range(len(calib)))

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {name: x}
        return Reader()

    def _static(self, calib, opts, path: Path, cache: Path, **kw) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        base = "minmax" if opts.method == "histogram" else opts.method
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[base]
        act = QuantType.QUInt8 if opts.preset == "x86" else QuantType.QInt8
        extra = {"ActivationSymmetric": opts.preset == "arm", "WeightSymmetric": True}
        quantize_static(str(self._prepared()), str(path),
                        None if cache.is_file() else self._reader(calib),
                        quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                        reduce_range=False, activation_type=act, weight_type=QuantType.QInt8,
                        calibrate_method=method, extra_options=extra,
                        calibration_cache_path=str(cache), **kw)

    def _calibration(self, calib, opts) -> Path:
        """The calibration cache (tensor -> range) quantize_static reads for these options.

        Ranges depend only on (model, data, method, graph_fixes): computed once and reused by
        the drift search's many exclude/only variants. The tool's own method fills the first
        cache; "histogram" and graph_fixes rewrite its ranges into a cache of their own."""
        digest = _digest(calib)
        base = "minmax" if opts.method == "histogram" else opts.method
        path = self._cache.setdefault((base, opts.preset, digest),
                                      self.work / f"calib_{base}_{len(self._cache)}.json")
        if (opts.method == "histogram" or opts.graph_fixes) and not path.is_file():
            # quantize_static writes the cache of its calibration (the model is a by-product)
            self._static(calib, replace(opts, method=base), self.work / "calibrate.onnx", path)
        if opts.method == "histogram":
            key = ("histogram", opts.preset, digest)
            if key not in self._cache:
                self._cache[key] = self._rewrite(path, self._histogram_ranges(calib, path),
                                                 f"calib_histogram_{len(self._cache)}.json")
            path = self._cache[key]
        if opts.graph_fixes:
            key = (opts.method, opts.preset, digest, "graph_fixes")
            if key not in self._cache:
                self._cache[key] = self._rewrite(path, self._shared_concat_ranges(path),
                                                 f"calib_{opts.method}_graph_{len(self._cache)}.json")
            path = self._cache[key]
        return path

    @staticmethod
    def _ranges(cache: Path) -> dict[str, tuple[float, float]]:
        from onnxruntime.quantization.calibrate import load_tensors_data
        data = load_tensors_data(cache)
        return {t: (float(np.min(data[t].range_value[0])), float(np.max(data[t].range_value[1])))
                for t in data}

    def _rewrite(self, cache: Path, ranges: dict, name: str) -> Path:
        """A copy of calibration cache `cache` with the given (lo, hi) per tensor."""
        from onnxruntime.quantization.calibrate import (
            TensorData,
            TensorsData,
            load_tensors_data,
            save_tensors_data,
        )
        data = load_tensors_data(cache)
        new = {t: TensorData(lowest=np.array([ranges[t][0]], np.float32),
                             highest=np.array([ranges[t][1]], np.float32))
               if t in ranges else data[t] for t in data}
        out = self.work / name
        save_tensors_data(TensorsData(data.calibration_method, new), out)
        return out

    def _histogram_ranges(self, calib, cache: Path) -> dict[str, tuple[float, float]]:
        """quantize.ranges over every calibrated tensor, from the FP32 model's values."""
        import onnx
        import onnxruntime as ort

        from quantize.ranges import Histograms
        ranges = self._ranges(cache)
        m = onnx.load(str(self._prepared()))
        produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
        tensors = [t for t in ranges if t in produced]
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors)
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count() or 1
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        hists = Histograms({t: ranges[t] for t in tensors})
        for i in range(len(calib)):
            hists.add(dict(zip(tensors, sess.run(tensors, {name: calib[i:i + 1]}))))
        return hists.ranges()

    def _shared_concat_ranges(self, cache: Path) -> dict[str, tuple[float, float]]:
        """Every Concat's inputs and output (transitively) get the union of their ranges, so
        the concat copies int8 values instead of requantizing them (NNCF's unified scales).

        A tensor counts with the tensors quantize_static ties to its scale anyway (a Reshape's
        output takes its input's). A Relu output's range keeps its 0 and a Clip output's range
        its bounds: quantize_static drops the activation and relies on the range clipping
        where it did; such an input keeps its range and the concat requantizes it."""
        import onnx
        ranges = self._ranges(cache)
        nodes = onnx.load(str(self._prepared()), load_external_data=False).graph.node
        made_by = {o: n.op_type for n in nodes for o in n.output}

        def union_find():
            parent: dict[str, str] = {}

            def root(t):
                parent.setdefault(t, t)
                while parent[t] != t:
                    t = parent[t]
                return t
            return parent, root
        chain_parent, chain = union_find()          # tensors sharing one scale in any case
        for n in nodes:
            if n.op_type in self.SAME_SCALE and n.input[0] in ranges and n.output[0] in ranges:
                chain_parent[chain(n.output[0])] = chain(n.input[0])
        group_parent, group = union_find()           # chains joined by a Concat
        for n in nodes:
            if n.op_type == "Concat":
                cs = [chain(t) for t in [*n.input, *n.output] if t in ranges]
                for c in cs[1:]:
                    group_parent[group(c)] = group(cs[0])
        members: dict[str, dict[str, list[str]]] = {}
        for t in ranges:
            c = chain(t)
            if c in group_parent:
                members.setdefault(group(c), {}).setdefault(c, []).append(t)
        out = {}
        for chains in members.values():
            lo = min(ranges[t][0] for ts in chains.values() for t in ts)
            hi = max(ranges[t][1] for ts in chains.values() for t in ts)
            for ts in chains.values():
                # Relu: the range must still start at its 0; Clip: also end at its maximum
                if any(made_by.get(t) == "Relu" and lo < ranges[t][0] or
                       made_by.get(t) == "Clip" and (lo, hi) != ranges[t] for t in ts):
                    continue
                out.update({t: (lo, hi) for t in ts})
        return out

    def _pools(self) -> list[str]:
        import onnx
        return [n.name for n in onnx.load(str(self._prepared()), load_external_data=False).graph.node
                if n.op_type in self.POOLS]

    @staticmethod
    def _float_outputs(path: Path) -> list[str]:
        """Drop the Q -> DQ pair in front of each graph output (the last op's result stays
        float; its inputs and weights stay int8). Returns the outputs changed."""
        import onnx
        m = onnx.load(str(path))
        g = m.graph
        producer = {o: n for n in g.node for o in n.output}
        uses: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        changed, drop = [], []
        for out in g.output:
            dq = producer.get(out.name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if src is None or uses.get(q.output[0], 0) != 1 or uses.get(q.input[0], 0) != 1:
                continue
            src.output[list(src.output).index(q.input[0])] = out.name
            drop += [id(q), id(dq)]
            changed.append(out.name)
        if changed:
            keep = [n for n in g.node if id(n) not in drop]
            del g.node[:]
            g.node.extend(keep)
            used = {i for n in g.node for i in n.input}
            inits = [i for i in g.initializer if i.name in used]
            del g.initializer[:]
            g.initializer.extend(inits)
            onnx.save(m, str(path))
        return changed

    def _quantize(self, calib, opts, out, exclude, only):
        import onnx
        cache = self._calibration(calib, opts)
        pools = self._pools() if opts.graph_fixes else []
        out.mkdir(parents=True, exist_ok=True)
        self._static(calib, opts, out / self.primary, cache,
                     nodes_to_exclude=list(exclude) + pools, nodes_to_quantize=list(only or []))
        float_outputs = self._float_outputs(out / self.primary) if opts.graph_fixes else []
        opset = next((o.version for o in onnx.load(str(out / self.primary)).opset_import
                      if o.domain in ("", "ai.onnx")), None)
        act = "QUInt8" if opts.preset == "x86" else "QInt8"
        settings = {
            "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "pre_process": "quant_pre_process" + (
                f" after onnx.version_converter opset {self.upgraded_from} -> {self.MIN_OPSET}"
                if self.upgraded_from else ""),
            "activations": act, "weights": "QInt8", "per_channel": opts.per_channel,
            "reduce_range": False, "activation_symmetric": opts.preset == "arm",
            "calibrate_method": self.CALIBRATE[opts.method],
            "graph_fixes": opts.graph_fixes, "nodes_to_exclude": list(exclude)}
        if opts.graph_fixes:
            settings.update({"pools_own_range": pools, "concat_shared_range": True,
                             "float_outputs": float_outputs})
        return {"files": [self.primary], "opset": opset, "settings": settings}

    def _input_names(self):
        import onnx
        m = onnx.load(str(self._prepared()), load_external_data=False)
        init = {i.name for i in m.graph.initializer}
        return [i.name for i in m.graph.input if i.name not in init]


# -- OpenVINO through NNCF ------------------------------------------------------------------
