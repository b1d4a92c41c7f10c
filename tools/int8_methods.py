"""onnxruntime INT8 of one FP32 bundle under each calibration / placement choice, side by side:
drift on the held-out training faces (the budget set; every choice is made there), the test
sets reported, latency against FP32 (interleaved, 1 thread), and where the pooled features
lose their precision. The table of docs/quantization.md ("onnxruntime INT8 of PFLD-GhostOne").

    python tools/int8_methods.py --bundle-dir artifacts/pfld_ghostone --out /tmp/g1methods.json
    python tools/int8_methods.py --bundle-dir artifacts/student_w05 --variants plain,better

Variants (quantize.backends.OnnxRuntimeQuantizer unless said):
  plain             min/max, per-channel s8 weights, u8 activations (the default)
  per-tensor        per-tensor weights
  percentile        CalibrationMethod.Percentile
  entropy           CalibrationMethod.Entropy
  reduce-range      7-bit weights (quantize_static reduce_range=True)
  symmetric         symmetric s8 activations (--preset arm)
  pools             AveragePool nodes out of the QDQ pass (their outputs get their own range)
  pools+outputs     ... and the model outputs left float
  graph             graph fixes: pools, outputs, shared concat ranges (Options.graph_fixes)
  histogram         histogram ranges (quantize.ranges), no graph fix
  better            histogram + graph fixes: the escalation's better PTQ step
  nncf-onnx         nncf.quantize on the ONNX model (mixed preset, min/max, no bias correction)
  nncf-onnx-fbc     the same with fast bias correction
Team tool; it writes nothing into the bundle folder.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("plain", "per-tensor", "percentile", "entropy", "reduce-range", "symmetric", "pools",
            "pools+outputs", "graph", "histogram", "better", "nncf-onnx", "nncf-onnx-fbc")


def _ort_variant(b, name: str, x: np.ndarray, out: Path) -> Path:
    """Quantize with one variant; returns the model file."""
    from quantize.backends import Options
    from quantize.core import QuantizeError
    opts = {"plain": Options(), "per-tensor": Options(per_channel=False),
            "percentile": Options(method="percentile"), "entropy": Options(method="entropy"),
            "symmetric": Options(preset="arm"), "graph": Options(graph_fixes=True),
            "histogram": Options(method="histogram"),
            "better": Options(method="histogram", graph_fixes=True)}
    path = out / b.primary
    if name in opts:
        b.quantize(x, opts[name], out)
    elif name in ("reduce-range", "pools", "pools+outputs"):
        from quantize.backends import quiet
        o = Options()
        cache = b._calibration(x, o)
        out.mkdir(parents=True, exist_ok=True)
        with quiet():
            if name == "reduce-range":
                _static_reduce_range(b, x, o, path, cache)
            else:
                b._static(x, o, path, cache, nodes_to_exclude=b._pools())
                if name == "pools+outputs":
                    b._float_outputs(path)
    elif name.startswith("nncf-onnx"):
        _nncf_onnx(b, x, path, fast_bias_correction=name.endswith("fbc"))
    else:
        raise QuantizeError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return path


def _static_reduce_range(b, x, opts, path, cache):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    quantize_static(str(b._prepared()), str(path), None if cache.is_file() else b._reader(x),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True}, calibration_cache_path=str(cache))


def _nncf_onnx(b, x, path: Path, fast_bias_correction: bool) -> None:
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from quantize.backends import quiet
    nncf.set_log_level(logging.ERROR)
    model = onnx.load(str(b._prepared()))
    name = b._input_names()[0]
    data = nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))])
    adv = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        disable_bias_correction=not fast_bias_correction)
    with quiet():
        q = nncf.quantize(model, data, preset=nncf.QuantizationPreset.MIXED,
                          target_device=nncf.TargetDevice.CPU, subset_size=len(x),
                          fast_bias_correction=True, advanced_parameters=adv)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(q, str(path))


def _pooled_features(fp32_path: Path, int8_path: Path, x: np.ndarray) -> list[dict]:
    """For each Concat input fed by an AveragePool (through Reshape/Flatten): the step the
    INT8 model quantizes it with, the FP32 values' range, and the SQNR (dB) of quantizing the
    FP32 values with that step (the precision the INT8 model gives the pooled features)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    f = onnx.load(str(fp32_path)).graph
    producer = {o: n for n in f.node for o in n.output}

    def from_pool(t):
        n = producer.get(t)
        while n is not None and n.op_type in ("Reshape", "Flatten"):
            n = producer.get(n.input[0])
        return n is not None and n.op_type == "AveragePool"
    wanted = [(n.name, i, t) for n in f.node if n.op_type == "Concat"
              for i, t in enumerate(n.input) if from_pool(t)]
    if not wanted:
        return []
    q = onnx.load(str(int8_path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in q.initializer}
    qprod = {o: n for n in q.node for o in n.output}
    qnodes = {n.name: n for n in q.node}
    m = onnx.load(str(fp32_path))
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for _, _, t in wanted)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    vals = [np.concatenate(v) for v in zip(*[sess.run(None, {name: x[i:i + 1]})
                                             for i in range(len(x))])]
    out = []
    for (node, i, t), v in zip(wanted, vals):
        dq = qprod.get(qnodes[node].input[i]) if node in qnodes else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        s = float(init[dq.input[1]].ravel()[0])
        z = int(init[dq.input[2]].ravel()[0])
        info = np.iinfo(init[dq.input[2]].dtype)
        qv = (np.clip(np.round(v / s) + z, info.min, info.max) - z) * s
        err = float(((qv - v) ** 2).sum())
        out.append({"tensor": t, "step": s, "fp32_range": [float(v.min()), float(v.max())],
                    "levels_used": round(float(v.max() - v.min()) / s) + 1,
                    "sqnr_db": 10 * np.log10(float((v ** 2).sum()) / max(err, 1e-30))})
    return out


def _kernels(path: Path) -> dict:
    """Op types of the graph onnxruntime actually runs (after its optimisations, 1 thread):
    QLinearConv is an int8 kernel; a Conv left between DequantizeLinear and QuantizeLinear
    runs in float with the (de)quantization around it. Also the activation quantizers with
    per-channel scales, which no fused int8 kernel takes."""
    import collections
    import tempfile as tf

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    with tf.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    g = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    per_channel = sum(1 for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in init
                      and init.get(n.input[1], np.zeros(1)).size > 1)
    keep = ("QLinearConv", "Conv", "FusedConv", "QLinearConcat", "Concat", "QGemm", "Gemm")
    return {**{k: ops[k] for k in keep if ops[k]}, "per_channel_activation_quantizers": per_channel}


@click.command()
@click.option("--bundle-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--test/--no-test", default=True, show_default=True,
              help="also score the test sets (reported only, never chosen on)")
@click.option("--latency-runs", default=200, show_default=True)
@click.option("--grid", type=int, default=None,
              help="candidate bounds per side of the histogram range search (default: "
                   "quantize.ranges.GRID); for measuring how much the result moves with it")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(bundle_dir, variants, test, latency_runs, grid, out):
    from common import time_interleaved
    from evaluation.metrics import face_batch
    from quantize.backends import OnnxRuntimeQuantizer
    from quantize.core import find_parent
    from quantize.data import Settings, figures, load_data
    from quantize.scoring import drift, score
    from runtime.bundle import BundleMeta
    from runtime.engines import get_engine

    names = [v.strip() for v in variants.split(",") if v.strip()]
    if grid:
        from quantize import ranges
        ranges.best_range.__defaults__ = (ranges.LEVELS, grid)
    settings = Settings()
    data = load_data(settings)
    parent = find_parent(bundle_dir, OnnxRuntimeQuantizer)
    meta = BundleMeta.load(parent)
    figs = [f for f in figures(meta, data.sets)
            if test or f.key.split("@")[0] in settings.gate_sets]
    x = face_batch(data.calib, meta.preprocess, data.calib_protocol)
    engine = get_engine("onnxruntime")
    fp32 = {f.key: score(engine(meta.model_file), meta, f, 32) for f in figs}
    rows = {}
    click.echo(f"{parent}: {len(x)} calibration faces ({settings.calib_set}); drift in NME "
               f"points on {', '.join(f.key for f in figs)}")
    with tempfile.TemporaryDirectory(prefix="int8-methods-") as tmp:
        b = OnnxRuntimeQuantizer(meta, Path(tmp) / "backend")
        for v in names:
            t = time.perf_counter()
            path = _ort_variant(b, v, x, Path(tmp) / v)
            seconds = time.perf_counter() - t
            eng = engine(path)
            d = {f.key: drift(fp32[f.key], score(eng, meta, f, 32), "all") for f in figs}
            lat = time_interleaved({"fp32": engine(meta.model_file), "int8": engine(path)},
                                   x[:1], 20, latency_runs)
            rows[v] = {"drift_points": d, "seconds": seconds,
                       "latency_ratio": lat["int8"]["median_ms"] / lat["fp32"]["median_ms"],
                       "latency_ms": {k: t["median_ms"] for k, t in lat.items()},
                       "pooled_features": _pooled_features(b._prepared(), path, x),
                       "kernels": _kernels(path)}
            pooled = rows[v]["pooled_features"]
            click.echo(f"{v:14s} {seconds:5.1f} s  " + "  ".join(
                f"{k.split(':', 1)[1]} {val:+.3f}" for k, val in d.items())
                + f"  latency x{rows[v]['latency_ratio']:.2f}"
                + (f"  pooled-feature SQNR {min(p['sqnr_db'] for p in pooled):.1f}-"
                   f"{max(p['sqnr_db'] for p in pooled):.1f} dB" if pooled else "")
                + "  kernels " + ", ".join(f"{k} {n}" for k, n in rows[v]["kernels"].items()))
    if out:
        out.write_text(json.dumps({"bundle": str(parent), "calibration": data.record["count"],
                                   "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
