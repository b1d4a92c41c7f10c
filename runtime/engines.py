"""Thin inference-engine wrappers behind one registry.

Each engine is one small class: `available()` says whether its package is importable (and if
not, which package to install), `Engine(path, threads=, device=)` loads a model file,
`engine.run(batch)` maps an NCHW float32 batch to the list of the model's outputs and
`engine(batch)` returns the first. What an engine can do is said by class attributes
(`reports_precision`, `handles_layout`), never probed. The runtime, the benchmark and the
export/quantize checks all run models through these classes (runtime.decode.Landmarker turns
outputs into points), and the CLIs take their choices from ENGINES. A new engine is one class
and one entry.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from runtime.errors import ConfigError, LandmarkError, UnknownNameError


class EngineUnavailable(LandmarkError, RuntimeError):
    """The engine's package is missing or cannot run this model on this device."""


class Engine:
    name = ""
    package = ""             # what to pip install
    suffixes: tuple[str, ...] = ()
    reports_precision = False   # execution_precision() tells what the device actually ran
    handles_layout = False      # takes NCHW batches for an NHWC model file itself

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    def __init__(self, path: str | Path, threads: int = 1, device: str | None = None,
                 precision: str | None = None):
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.name}: model file {self.path} does not exist")
        self.threads, self.device, self.precision = threads, device, precision

    def run(self, batch: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        """Every output of the model for an NCHW float32 batch, in the model file's order."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def describe(self) -> str:
        return f"{self.name} {self.device or 'CPU'} x{self.threads}"


def _in_slices(run, batch: np.ndarray, size: int) -> list[np.ndarray]:
    """Run a model with a fixed batch `size` on any number of rows (last slice zero-padded)."""
    x = np.asarray(batch, np.float32)
    n = len(x)
    x = np.concatenate([x, np.zeros((-n % size, *x.shape[1:]), np.float32)])
    parts = [run(x[i:i + size]) for i in range(0, len(x), size)]
    return [np.concatenate([p[j] for p in parts])[:n] for j in range(len(parts[0]))]


def _missing(module: str, package: str, engine: str) -> tuple[bool, str]:
    if importlib.util.find_spec(module) is None:
        return False, f"{engine} needs the Python package '{package}' (pip install {package})"
    return True, ""


class OnnxRuntimeEngine(Engine):
    name, package, suffixes = "onnxruntime", "onnxruntime", (".onnx",)

    @classmethod
    def available(cls):
        return _missing("onnxruntime", cls.package, cls.name)

    def __init__(self, path, threads=1, device=None, precision=None):
        super().__init__(path, threads, device, precision)
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = [device] if device else ["CPUExecutionProvider"]
        unknown = set(providers) - set(ort.get_available_providers())
        if unknown:
            raise EngineUnavailable(f"onnxruntime has no provider {', '.join(unknown)} here; "
                                    f"available: {', '.join(ort.get_available_providers())}")
        self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        self.input = self.session.get_inputs()[0].name
        n = self.session.get_inputs()[0].shape[0]   # an int for a static-batch export
        self._batch = n if isinstance(n, int) and n > 0 else None

    def run(self, batch):
        if self._batch and len(batch) != self._batch:
            return _in_slices(self.run, batch, self._batch)
        return self.session.run(None, {self.input: np.ascontiguousarray(batch, np.float32)})


class OpenVINOEngine(Engine):
    name, package, suffixes = "openvino", "openvino", (".xml",)
    reports_precision = True

    @classmethod
    def available(cls):
        return _missing("openvino", cls.package, cls.name)

    def __init__(self, path, threads=1, device=None, precision=None):
        super().__init__(path, threads, device, precision)
        import openvino as ov
        core = ov.Core()
        device = device or "CPU"
        if device.split(".")[0].split(":")[0] not in {d.split(".")[0] for d in core.available_devices} \
                and not device.startswith(("AUTO", "HETERO", "MULTI")):
            raise EngineUnavailable(f"OpenVINO device {device} not found; available: "
                                    f"{', '.join(core.available_devices)}")
        cfg = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            cfg["INFERENCE_NUM_THREADS"] = max(1, threads)
        # precision "f32" pins full precision (parity checks); None keeps the device default
        # (bf16 on CPUs with AMX/AVX512-bf16), which is what a deployment would run.
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        self.device = device
        self.compiled = core.compile_model(core.read_model(str(self.path)), device, cfg)
        self.request = self.compiled.create_infer_request()
        n = self.compiled.input(0).get_partial_shape()[0]   # static for a static-batch export
        self._batch = n.get_length() if n.is_static else None

    def run(self, batch):
        if self._batch and len(batch) != self._batch:
            return _in_slices(self.run, batch, self._batch)
        res = self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
        return [np.asarray(res[o]) for o in self.compiled.outputs]

    def execution_precision(self) -> str:
        try:
            return str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:  # noqa: BLE001 - not every device reports it
            return "unknown"


def _tflite_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
        return Interpreter, load_delegate
    except ImportError:
        pass
    try:  # devices that only have the older package: same API
        from tflite_runtime.interpreter import Interpreter, load_delegate
        return Interpreter, load_delegate
    except ImportError:
        return None, None


class LiteRTEngine(Engine):
    name, package, suffixes = "tflite", "ai-edge-litert", (".tflite",)
    handles_layout = True       # an NHWC model file gets its NCHW batch transposed here

    @classmethod
    def available(cls):
        if _tflite_interpreter()[0] is None:
            return False, ("tflite needs the Python package 'ai-edge-litert' (pip install "
                           "ai-edge-litert), or 'tflite-runtime' on devices without it")
        return True, ""

    def __init__(self, path, threads=1, device=None, precision=None):
        super().__init__(path, threads, device, precision)
        Interpreter, load_delegate = _tflite_interpreter()
        delegates = []
        if device and device.upper() != "CPU":
            # a delegate library path (NPU/GPU), e.g. libvx_delegate.so on an i.MX 8M Plus
            try:
                delegates = [load_delegate(device)]
            except (ValueError, OSError) as e:
                raise EngineUnavailable(f"TFLite delegate {device} could not be loaded: {e}") from None
        self.interp = Interpreter(model_path=str(self.path), num_threads=max(1, threads),
                                  experimental_delegates=delegates or None)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.outs = self.interp.get_output_details()
        self.nhwc = self.inp["shape"][-1] == 3 and self.inp["shape"][1] != 3
        self._batch = int(self.inp["shape"][0])
        # litert-torch bakes the batch into its reshapes, so such a model cannot be resized:
        # it runs a larger batch one slice of its own batch size at a time
        self._fixed = int(self.inp.get("shape_signature", self.inp["shape"])[0]) > 0

    def run(self, batch):
        x = np.asarray(batch, np.float32)
        if self._fixed and x.shape[0] != self._batch:
            return _in_slices(self.run, x, self._batch)
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if x.shape[0] != self._batch:
            self.interp.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interp.allocate_tensors()
            self.inp = self.interp.get_input_details()[0]
            self.outs = self.interp.get_output_details()
            self._batch = x.shape[0]
        if self.inp["dtype"] != np.float32:   # full-integer model: quantise the input
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.inp["dtype"])
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x))
        self.interp.invoke()
        ys = []
        for out in self.outs:
            y = self.interp.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            ys.append(y)
        return ys


ENGINES: dict[str, type[Engine]] = {
    OnnxRuntimeEngine.name: OnnxRuntimeEngine,
    OpenVINOEngine.name: OpenVINOEngine,
    LiteRTEngine.name: LiteRTEngine,
}


def register(engine: type[Engine]) -> type[Engine]:
    """Add an engine (e.g. the benchmark's torch reference) to the shared registry."""
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise UnknownNameError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return ENGINES[name]


def load_bundle(bundle: str | Path, engine: str | None = None, threads: int = 1,
                device: str | None = None, precision: str | None = None, verify: bool = True):
    """(BundleMeta, engine instance) for a bundle folder; `engine` overrides the bundle's own."""
    from .bundle import BundleMeta
    meta = BundleMeta.load(bundle, verify=verify)
    meta.check_machine()
    eng = get_engine(engine or meta.engine)
    path = meta.model_file
    if eng.suffixes and path.suffix not in eng.suffixes:
        raise ConfigError(f"bundle {bundle} holds a {path.suffix} model; engine {eng.name} "
                         f"runs {', '.join(eng.suffixes)} files")
    return meta, eng(path, threads=threads, device=device, precision=precision)
