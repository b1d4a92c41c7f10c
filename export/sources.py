"""What an export starts from: `checkpoint_source` loads a training checkpoint (load_model
checks its weights against the network its arch describes; its model family, train/family.py,
describes its outputs) and `import_source` checks an outside ONNX or TFLite model against its
spec JSON (the _check_* functions: graph validity, input rank, layout, size and channels, the
output the spec reads, and one run on a blank batch). Both return an export.base.Source, or
raise ExportInputError naming the mismatch before anything is built; export.stages.export_all
and import_model call them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import quiet
from export.base import ExportInputError, Source
from export.targets import _onnx_io, _tflite_io
from runtime.bundle import InputSpec, OutputSpec, SpecError, load_spec, sha256
from runtime.preprocess import Preprocess


def load_model(checkpoint: str | Path):
    """(train.checkpoint.Checkpoint, eval-mode network); ExportInputError for anything that is
    not one."""
    from runtime.schemes import get_scheme
    from train.checkpoint import Checkpoint
    try:
        ck = Checkpoint.load(checkpoint)
    except FileNotFoundError as e:
        raise ExportInputError(str(e)) from None
    except ValueError as e:
        raise ExportInputError(f"{e}\n(expected a checkpoint written by train/run.py fit or "
                               "train/ship.py)") from None
    try:
        expected = ck.family.build(ck.arch).state_dict()
        scheme = get_scheme(ck.scheme)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportInputError(f"{checkpoint}: arch {ck.arch!r} / scheme {ck.scheme!r} is "
                               f"not a PFLD this exporter can build: {e}") from None
    got = ck.weights if isinstance(ck.weights, dict) else {}
    problems = [f"{k} is missing" for k in expected if k not in got]
    problems += [f"{k} has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    problems += [f"{k} is not a PFLD weight" for k in got if k not in expected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportInputError(f"{checkpoint}: the weights are not those of the PFLD its arch "
                               f"{ck.arch} describes: {'; '.join(problems[:3])}{more}")
    if not ck.named_heads and scheme.num_points != ck.num_points:
        raise ExportInputError(f"{checkpoint}: scheme {scheme.name} has {scheme.num_points} points "
                               f"but the network predicts {ck.num_points}")
    return ck, ck.build()


def checkpoint_source(checkpoint: str | Path) -> Source:
    ck, model = load_model(checkpoint)
    return Source("checkpoint", Path(checkpoint), sha256(checkpoint), ck.preprocess,
                  ck.outputs(model), InputSpec(), model)


def import_source(model_file: str | Path, spec_path: str | Path) -> Source:
    """Check an outside model against its spec; ExportInputError naming the mismatch."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise ExportInputError(f"model file {model_file} does not exist")
    if model_file.suffix not in (".onnx", ".tflite"):
        raise ExportInputError(f"{model_file}: import takes an .onnx or .tflite file")
    try:
        spec = load_spec(spec_path, require_size=False)
    except SpecError as e:
        raise ExportInputError(str(e)) from None
    spec.setdefault("engine", "onnxruntime" if model_file.suffix == ".onnx" else "tflite")
    io_ = _check_onnx(model_file, spec, spec_path) if model_file.suffix == ".onnx" else \
        _check_tflite(model_file, spec, spec_path)
    n = spec["input_size"]
    layout = spec["layout"]
    pre = Preprocess(n, spec["color"], tuple(spec["mean"]), tuple(spec["std"]),
                     float(spec["crop_scale"]), float(spec["box_shift_y"]))
    out = OutputSpec(io_["outputs"][spec["output_index"]], "points", spec["scheme"],
                     spec["output_units"], spec["output_order"], spec["output_index"])
    src = Source("import", model_file, sha256(model_file), pre, [out],
                 InputSpec(io_["input"]["name"], layout,
                           [-1, 3, n, n] if layout == "NCHW" else [-1, n, n, 3]),
                 spec=spec, spec_path=Path(spec_path))
    _check_output_size(src, spec_path)
    return src


def _spatial(shape: list[int], layout: str) -> tuple[int, int, int]:
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    return c, h, w


def _check_input(name: str, shape: list[int], spec: dict, spec_path, model_file) -> None:
    layout = spec["layout"]
    if len(shape) != 4:
        raise ExportInputError(f"{model_file}: input '{name}' has shape {shape}; a landmark "
                               f"model takes one image batch of rank 4 ({layout})")
    c, h, w = _spatial(shape, layout)
    if c not in (3, -1):
        raise ExportInputError(f"{model_file}: input '{name}' has {c} channels at the {layout} "
                               f"channel position (shape {shape}); spec {spec_path} says layout "
                               f"{layout}: is the layout right?")
    size = spec.get("input_size")
    if h > 0 and w > 0:
        if h != w:
            raise ExportInputError(f"{model_file}: input is {h}x{w}; only square inputs are supported")
        if size is not None and size != h:
            raise ExportInputError(f"{model_file}: input is {h}x{w} but spec {spec_path} says "
                                   f"input_size {size}")
        spec["input_size"] = h
    elif size is None:
        raise ExportInputError(f"{model_file}: input '{name}' has a dynamic spatial size "
                               f"(shape {shape}) and spec {spec_path} gives no input_size")


def _check_onnx(model_file: Path, spec: dict, spec_path) -> dict:
    import onnx
    try:
        onnx.checker.check_model(str(model_file), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise ExportInputError(f"{model_file} is not a valid ONNX model: "
                               f"{str(e).splitlines()[0]}") from None
    io_ = _onnx_io(model_file)
    m = onnx.load(str(model_file), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ExportInputError(f"{model_file}: {len(inputs)} graph inputs; a landmark model "
                               "takes one image batch")
    _check_input(io_["input"]["name"], io_["input"]["shape"], spec, spec_path, model_file)
    if spec["output_index"] >= len(io_["outputs"]):
        raise ExportInputError(f"{model_file}: spec {spec_path} reads output {spec['output_index']} "
                               f"but the graph has {len(io_['outputs'])}")
    return io_


def _check_tflite(model_file: Path, spec: dict, spec_path) -> dict:
    try:
        io_ = _tflite_io(model_file)
    except Exception as e:  # noqa: BLE001
        raise ExportInputError(f"{model_file} is not a loadable TFLite model: "
                               f"{str(e).splitlines()[0]}") from None
    spec["layout"] = io_["input"]["layout"]
    _check_input(io_["input"]["name"], io_["input"]["shape"], spec, spec_path, model_file)
    if spec["output_index"] >= len(io_["outputs"]):
        raise ExportInputError(f"{model_file}: spec {spec_path} reads output {spec['output_index']} "
                               f"but the model has {len(io_['outputs'])}")
    return io_


def _check_output_size(src: Source, spec_path) -> None:
    """Run the model once: the output the spec names must hold 2 x points values a face."""
    n = src.preprocess.input_size
    try:
        with quiet():
            raw = src.run(np.zeros((1, 3, n, n), np.float32))
    except Exception as e:  # noqa: BLE001 - engines raise anything for a model they cannot run
        raise ExportInputError(f"{src.path}: the model does not run on a 1x3x{n}x{n} input "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    o = src.outputs[0]
    got = int(np.prod(np.asarray(raw[o.index]).shape[1:]))
    if got != 2 * o.num_points:
        raise ExportInputError(
            f"{src.path}: output {o.index} ('{o.name}') has {got} values per face, expected "
            f"{2 * o.num_points} ({o.num_points} points of {o.scheme}); is it a landmark model, "
            f"and are 'scheme' and 'output_index' in {spec_path} right?")
