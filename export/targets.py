"""The export targets: one conversion function per bundle kind (ONNX, simplified ONNX,
OpenVINO IR, TFLite, each in FP32 or FP16) and the registry TARGETS that names, for every
target, what it is converted from, the engine that runs it, its precision, its parity
tolerance and the Python packages the conversion needs. export.stages walks TARGETS in order
and calls each entry's `build(job, folder, parent model file)`, which writes the model file(s)
into the staging folder and returns their input/output description; _onnx_io and _tflite_io
(a model file's input and outputs) also serve the import checks of export.sources.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from export.base import TOL_FP16, TOL_FP32, ExportError, Job, Target, TargetSkipped


def _onnx_io(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    inp = [i for i in m.graph.input if i.name not in init][0]
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    return {"input": {"name": inp.name, "shape": shape, "dtype": "float32"},
            "outputs": [o.name for o in m.graph.output],
            "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(m.graph.node)}


def build_onnx(job: Job, folder: Path, src: None) -> dict:
    import onnx
    path = folder / "model.onnx"
    if job.source.kind == "import":
        if job.source.path.suffix != ".onnx":
            raise TargetSkipped(f"the imported model is a {job.source.path.suffix} file; this "
                                "environment has no converter from it to ONNX")
        shutil.copyfile(job.source.path, path)
        tool = "imported as is (onnx.checker passed)"
    else:
        import torch
        # torch.export specialises a dimension whose sample size is 1: trace dynamic with 2 faces
        sample = torch.from_numpy(job.faces[:2] if job.dynamic_batch else job.faces[:1])
        dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if job.dynamic_batch else None
        torch.onnx.export(job.model, (sample,), str(path), dynamo=True, external_data=False,
                          opset_version=job.opset, input_names=["input"],
                          output_names=[o.name for o in job.source.outputs],
                          dynamic_shapes=dynamic, verbose=False)
        tool = "torch.onnx.export(dynamo=True)"
    onnx.checker.check_model(str(path), full_check=True)
    io_ = _onnx_io(path)
    return {"files": ["model.onnx"], "input": io_["input"], "outputs": io_["outputs"],
            "opset": io_["opset"], "conversion": {"tool": tool, "nodes": io_["nodes"]}}


def build_onnx_sim(job: Job, folder: Path, src: Path) -> dict:
    import onnx
    from onnxsim import simplify
    model, ok = simplify(onnx.load(str(src)))
    if not ok:
        raise ExportError(f"onnxsim could not validate the simplified graph of {src}")
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    io_ = _onnx_io(path)
    return {"files": ["model.onnx"], "input": io_["input"], "outputs": io_["outputs"],
            "opset": io_["opset"], "conversion": {"tool": "onnxsim.simplify",
                                                  "nodes_before": _onnx_io(src)["nodes"],
                                                  "nodes": io_["nodes"]}}


def _build_openvino(job: Job, folder: Path, src: Path, fp16: bool) -> dict:
    import openvino as ov
    model = ov.convert_model(str(src))
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=fp16)
    ps = model.input(0).get_partial_shape()
    return {"files": ["model.xml", "model.bin"],
            "input": {"name": model.input(0).get_any_name(),
                      "shape": [d.get_length() if d.is_static else -1 for d in ps],
                      "dtype": "float32"},
            "outputs": [o.get_any_name() for o in model.outputs],
            "opset": _onnx_io(src)["opset"],    # of the ONNX graph the IR was converted from
            "conversion": {"tool": "openvino.convert_model + save_model",
                           "compress_to_fp16": fp16}}


def build_openvino_fp32(job: Job, folder: Path, src: Path) -> dict:
    return _build_openvino(job, folder, src, fp16=False)


def build_openvino_fp16(job: Job, folder: Path, src: Path) -> dict:
    return _build_openvino(job, folder, src, fp16=True)


def _tflite_io(path: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    i = it.get_input_details()[0]
    shape = [int(v) for v in i.get("shape_signature", i["shape"])]
    return {"input": {"name": i["name"], "layout": "NHWC" if shape[-1] == 3 else "NCHW",
                      "shape": shape, "dtype": np.dtype(i["dtype"]).name},
            "outputs": [o["name"] for o in it.get_output_details()]}


def build_tflite_fp32(job: Job, folder: Path, src: None) -> dict:
    if job.source.kind == "import":
        if job.source.path.suffix == ".tflite":
            shutil.copyfile(job.source.path, folder / "model.tflite")
            return {"files": ["model.tflite"], **_tflite_io(folder / "model.tflite"),
                    "opset": None, "conversion": {"tool": "imported as is"}}
        raise TargetSkipped(
            "no ONNX -> TFLite converter is installed in this environment (onnx2tf needs a "
            "TensorFlow environment of its own); convert the model with onnx2tf and import "
            "the .tflite with the same spec")
    import litert_torch
    import torch
    # NHWC input, the TFLite convention (runtime.engines transposes NCHW batches for it). The
    # batch is fixed at 1: litert-torch 0.10 cannot lower this graph's flatten with a symbolic
    # batch; the engine runs larger batches one face at a time.
    sample = torch.from_numpy(job.faces[:1].transpose(0, 2, 3, 1).copy())
    wrapped = litert_torch.to_channel_last_io(job.model, args=[0]).eval()
    shown = litert_torch.config.show_progress
    litert_torch.config.show_progress = False
    try:
        litert_torch.convert(wrapped, (sample,)).export(str(folder / "model.tflite"))
    finally:
        litert_torch.config.show_progress = shown
    return {"files": ["model.tflite"], **_tflite_io(folder / "model.tflite"), "opset": None,
            "conversion": {"tool": "litert_torch.convert", "batch_note":
                           "static batch 1 (litert-torch cannot convert a dynamic batch here)"}}


def build_tflite_fp16(job: Job, folder: Path, src: Path) -> dict:
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer
    q = quantizer.Quantizer(str(src))
    # float16 weights, float32 compute: the LiteRT "float16 quantization"
    q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                             num_bits=16, algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    res = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    (folder / "model.tflite").write_bytes(bytes(res.quantized_model))
    return {"files": ["model.tflite"], **_tflite_io(folder / "model.tflite"), "opset": None,
            "conversion": {"tool": "ai_edge_quantizer weight-only float_casting (fp16 weights)"}}


_ONNX = (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"))
_TORCH_ONNX = ("torch", "onnx", "onnxscript", "onnxruntime")
TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("onnx_fp32", None, "onnxruntime", "fp32", TOL_FP32, build_onnx, reference=None,
           needs=_ONNX, tools=_TORCH_ONNX),
    Target("onnx_sim_fp32", "onnx_fp32", "onnxruntime", "fp32", TOL_FP32, build_onnx_sim,
           needs=_ONNX + (("onnxsim", "onnxsim"),), tools=("onnx", "onnxsim", "onnxruntime")),
    Target("openvino_fp32", "onnx_sim_fp32", "openvino", "fp32", TOL_FP32, build_openvino_fp32,
           needs=(("openvino", "openvino"),), tools=("openvino",)),
    Target("openvino_fp16", "onnx_sim_fp32", "openvino", "fp16", TOL_FP16, build_openvino_fp16,
           needs=(("openvino", "openvino"),), tools=("openvino",)),
    Target("tflite_fp32", None, "tflite", "fp32", TOL_FP32, build_tflite_fp32,
           reference="onnx_sim_fp32",
           needs=(("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")),
           tools=("torch", "litert-torch", "ai-edge-litert")),
    Target("tflite_fp16", "tflite_fp32", "tflite", "fp16", TOL_FP16, build_tflite_fp16,
           reference="onnx_sim_fp32", needs=(("ai_edge_quantizer", "ai-edge-quantizer"),),
           tools=("ai-edge-quantizer", "ai-edge-litert")),
]}
