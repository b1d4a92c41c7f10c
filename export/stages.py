"""Export: a training checkpoint or an outside landmark model -> verified, deployable bundles.

Every target is one entry of TARGETS (what it is converted from, which engine runs it, its
precision, its parity tolerance and the function that builds it). `export_all` (a checkpoint)
and `import_model` (an outside ONNX/TFLite file described by a spec JSON) build the requested
targets plus whatever they are converted from or checked against, in registry order. Each
bundle is assembled in a staging folder (runtime.bundle.staging_dir), then its model is run
through the runtime's engines and decoders next to its reference on the same real faces; a
difference over the tolerance, on any output, raises ExportError and the staging folder is
thrown away, so no unverified artifact is ever left in place.

    from export.stages import export_all, import_model
    export_all("models/pfld68_w05.pt", "artifacts/pfld68_w05")            # all six targets
    export_all(ckpt, out, targets=["tflite_fp16"])     # + tflite_fp32, onnx_sim_fp32, onnx_fp32
    import_model("ghost.onnx", "specs/pfld_ghostone.json", "artifacts/pfld_ghostone")

Lineage: onnx_fp32 <- the source (torch export of a checkpoint, or the imported file as is);
onnx_sim_fp32 <- onnx_fp32; openvino_* <- onnx_sim_fp32; tflite_fp32 <- the source
(litert-torch converts from torch; an imported .tflite is taken as is; an imported ONNX has no
converter in this environment and the target is skipped, saying so); tflite_fp16 <- tflite_fp32
(weights cast to float16 by ai-edge-quantizer). The simplified ONNX is the verified graph every
other backend is compared to; where it does not exist, the source itself is.

A multi-head network exports to one graph with one output per head; every output is checked.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from common import now, package_versions, quiet
from runtime.bundle import (BundleError, BundleMeta, InputSpec, Lineage, OutputSpec, SpecError,
                            atomic_write_json, load_spec, sha256, staging_dir)
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


# -- conversions ----------------------------------------------------------------------------
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


# -- checks ---------------------------------------------------------------------------------
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


def _match_outputs(job: Job, target: Target, spec: dict) -> list[OutputSpec]:
    """The source's output descriptions with each one's index in the new file and its name
    there. ONNX and OpenVINO keep the output order; LiteRT may not, so an output there is found
    by its size (2K values per face), which differs between heads of different schemes."""
    outs = job.source.outputs
    names = spec["outputs"]
    if len(names) < max(o.index for o in outs) + 1:
        raise ExportError(f"{target.name}: the converted model has {len(names)} output(s), the "
                          f"source {len(outs)}")
    if target.engine != "tflite" or len(outs) == 1:
        return [replace(o, name=names[o.index]) for o in outs]
    from ai_edge_litert.interpreter import Interpreter
    sizes = [int(np.prod(d["shape"][1:])) for d in
             Interpreter(model_path=str(spec["_folder"] / spec["files"][0])).get_output_details()]
    out = []
    for o in outs:
        hits = [i for i, s in enumerate(sizes) if s == 2 * o.num_points]
        if len(hits) != 1:
            raise ExportError(f"{target.name}: cannot tell which output is {o.scheme} "
                              f"(output sizes {sizes})")
        out.append(replace(o, name=names[hits[0]], index=hits[0]))
    return out


def parity(job: Job, target: Target, meta: BundleMeta) -> dict:
    """Run the new bundle and its reference on the parity faces, every output decoded to
    points; ExportError if any output is over the tolerance."""
    ref_name = target.checked_against
    if ref_name is not None and ref_name not in job.bundles:
        ref_name = None      # the reference target was skipped: check against the source
    ref, ref_raw = job.points_of(ref_name), job.raw_of(ref_name)
    got, got_raw = _run_bundle(meta.folder, job.faces, meta)
    diffs, bad = {}, []
    for o, a, b, ra, rb in zip(meta.outputs, got, ref, got_raw, ref_raw):
        if a.shape != b.shape:
            raise ExportError(f"{target.name}: output '{o.name}' gives {a.shape}, its reference "
                              f"{ref_name or SOURCE} gives {b.shape}")
        d = np.abs(a.astype(np.float64) - b)
        diffs[o.name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
        if o.kind != "heatmaps":
            if not d.max() <= target.tolerance:
                bad.append(f"output '{o.name}': max |diff| {d.max():.3e} (mean {d.mean():.1e}); "
                           f"tolerance {target.tolerance:.0e} on crop-normalised coordinates")
            continue
        # heatmaps: the maps themselves must agree to the tolerance (values in [0, 1]); the
        # decoded points on average too, and each within one heatmap pixel: where two pixels
        # of a map nearly tie, reduced precision may pick the other argmax and the local window
        # moves with it (a sub-pixel change of the point, not a defect of the conversion)
        if ra.shape != rb.shape:
            raise ExportError(f"{target.name}: output '{o.name}' gives maps of {ra.shape}, its "
                              f"reference {rb.shape}")
        dr = np.abs(ra.astype(np.float64) - rb)
        one_px = o.params["stride"] / job.source.preprocess.input_size
        diffs[o.name].update(raw_max_abs_diff=float(dr.max()), raw_mean_abs_diff=float(dr.mean()),
                             points_max_allowed=one_px)
        if not dr.max() <= target.tolerance * HEATMAP_RAW_FACTOR:
            bad.append(f"output '{o.name}': heatmaps max |diff| {dr.max():.3e} > "
                       f"{target.tolerance * HEATMAP_RAW_FACTOR:.0e}")
        if not (d.mean() <= target.tolerance and d.max() <= one_px):
            bad.append(f"output '{o.name}': decoded points mean |diff| {d.mean():.1e} (limit "
                       f"{target.tolerance:.0e}), max {d.max():.3e} (limit one heatmap pixel, "
                       f"{one_px:.3e}) on crop-normalised coordinates")
    if bad:
        raise ExportError(
            f"{target.name}: parity check against {ref_name or 'the source model'} failed on "
            f"{len(job.faces)} real faces: {'; '.join(bad)}. The artifact was not written.")
    worst = max(v["max_abs_diff"] for v in diffs.values())
    return {"checked_against": _ref_record(job, ref_name), "engine": target.engine,
            "execution_precision": "f32", "faces": len(job.faces), "face_sets": job.face_sets,
            "outputs": diffs, "max_abs_diff": worst,
            "max_abs_diff_crop_px": worst * job.source.preprocess.input_size,
            "tolerance": target.tolerance, "passed": True}


def _ref_record(job: Job, name: str | None) -> dict:
    if name is None:
        engine = "torch" if job.source.kind == "checkpoint" else job.source.spec["engine"]
        return {"target": SOURCE, "path": None, "sha256": job.source.sha, "engine": engine}
    meta = BundleMeta.load(job.bundles[name], verify=False)
    return {"target": name, "path": f"../{job.bundles[name].name}", "sha256": meta.sha256,
            "engine": meta.engine}


# -- sources --------------------------------------------------------------------------------
def _display(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_model(checkpoint: str | Path):
    """(checkpoint dict, eval-mode PFLD); ExportInputError for anything that is not one."""
    from runtime.schemes import get_scheme
    from train.engine import load_checkpoint, model_from_checkpoint
    from train.model import build
    try:
        ck = load_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise ExportInputError(str(e)) from None
    except ValueError as e:
        raise ExportInputError(f"{e}\n(expected a checkpoint written by train/run.py fit or "
                               "train/ship.py)") from None
    try:
        expected = build(ck["arch"]).state_dict()
        scheme = get_scheme(ck["scheme"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportInputError(f"{checkpoint}: arch {ck['arch']!r} / scheme {ck['scheme']!r} is "
                               f"not a PFLD this exporter can build: {e}") from None
    got = ck["model"] if isinstance(ck["model"], dict) else {}
    problems = [f"{k} is missing" for k in expected if k not in got]
    problems += [f"{k} has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    problems += [f"{k} is not a PFLD weight" for k in got if k not in expected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportInputError(f"{checkpoint}: the weights are not those of the PFLD its arch "
                               f"{ck['arch']} describes: {'; '.join(problems[:3])}{more}")
    if not ck["arch"].get("heads") and scheme.num_points != int(ck["arch"]["num_points"]):
        raise ExportInputError(f"{checkpoint}: scheme {scheme.name} has {scheme.num_points} points "
                               f"but the network predicts {ck['arch']['num_points']}")
    return ck, model_from_checkpoint(ck)


def checkpoint_source(checkpoint: str | Path) -> Source:
    from train.model import head_names
    ck, model = load_model(checkpoint)
    heads = ck["arch"].get("heads")
    if ck["arch"].get("family") == "heatmap":
        outputs = [OutputSpec("heatmaps", "heatmaps", ck["scheme"], params=model.output_params())]
    elif heads:
        outputs = [OutputSpec(f"points_{h}", "points", h, index=i) for i, h in enumerate(heads)]
    else:
        outputs = [OutputSpec(head_names(ck["arch"])[0], "points", ck["scheme"])]
    return Source("checkpoint", Path(checkpoint), sha256(checkpoint),
                  Preprocess.from_dict(ck["preprocess"]), outputs, InputSpec(), model)


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


# -- orchestration --------------------------------------------------------------------------
def plan(targets=None) -> list[str]:
    """Requested targets plus the ones they are converted from or checked against, in order."""
    wanted = list(TARGETS) if targets is None else list(targets)
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown or not wanted:
        raise ExportInputError(f"unknown export target(s) {', '.join(unknown) or '(none given)'}; "
                               f"known: {', '.join(TARGETS)}")
    need, todo = set(), list(wanted)
    while todo:
        t = todo.pop()
        if t not in need:
            need.add(t)
            todo += [d for d in (TARGETS[t].parent, TARGETS[t].checked_against) if d]
    return [t for t in TARGETS if t in need]


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and prove it writable with a real file (root ignores mode bits)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportInputError(f"output folder {out_dir} is not writable: "
                               f"{e.strerror or e}") from None


def parity_faces(pre: Preprocess) -> tuple[np.ndarray, dict[str, int]]:
    """A fixed batch of real faces (PARITY_SETS: every n-th face of each set)."""
    from evaluation.data import DataError
    from evaluation.metrics import face_batch
    from evaluation.sets import scored_set
    parts, counts = [], {}
    try:
        for key, n in PARITY_SETS:
            s = scored_set(key)
            faces = s.faces()
            faces = faces[::max(1, len(faces) // n)][:n]
            parts.append(face_batch(faces, pre, s.protocol))
            counts[key] = len(faces)
    except DataError as e:
        raise ExportInputError(f"the parity check needs real faces: {e}") from None
    return np.concatenate(parts), counts


def _reusable(job: Job, name: str) -> BundleMeta | None:
    """An existing bundle made from this source with these settings, intact on disk."""
    folder = job.out_dir / name
    if not folder.is_dir():
        return None
    try:
        meta = BundleMeta.load(folder)
    except BundleError:
        return None
    root = meta.lineage.source_checkpoint or meta.lineage.source_model or {}
    if meta.stage != name or root.get("sha256") != job.source.sha \
            or meta.export != {"opset": job.opset, "batch": job.batch} \
            or not meta.validation.get("passed"):
        return None
    t = TARGETS[name]
    for dep, record in ((t.parent, meta.lineage.parent or {}),
                        (t.checked_against, meta.validation.get("checked_against", {}))):
        if dep and dep not in job.skipped and (
                dep not in job.bundles or _ref_record(job, dep)["sha256"] != record.get("sha256")):
            return None      # made from (or checked against) a bundle that has since changed
    return meta


def _build(job: Job, target: Target) -> tuple[BundleMeta, float, float]:
    """Convert, check and write one bundle: (meta, wall seconds, CPU seconds of this process)."""
    final = job.out_dir / target.name
    t0, c0 = time.perf_counter(), time.process_time()
    with staging_dir(final) as tmp:
        src = BundleMeta.load(job.bundles[target.parent]).model_file if target.parent else None
        try:
            with quiet():
                spec = target.build(job, tmp, src)
        except (ExportError, TargetSkipped):
            raise
        except Exception as e:  # noqa: BLE001 - converters raise anything; name the stage
            raise ExportError(f"{target.name}: conversion failed: {type(e).__name__}: {e}"
                              + "".join(f"\n{n}" for n in getattr(e, "__notes__", []))) from e
        spec["_folder"] = tmp
        parent = ({"target": SOURCE, "path": None, "sha256": job.source.sha}
                  if target.parent is None else _ref_record(job, target.parent))
        parent.pop("engine", None)
        layout = spec["input"].get("layout", job.source.input.layout)
        meta = BundleMeta(
            name=job.out_dir.name, engine=target.engine, precision=target.precision,
            files=BundleMeta.files_of(*spec["files"]), preprocess=job.source.preprocess,
            outputs=_match_outputs(job, target, spec),
            input=InputSpec(spec["input"]["name"], layout, spec["input"]["shape"],
                            spec["input"]["dtype"]),
            opset=spec["opset"],
            lineage=Lineage(stage=target.name, parent=parent, created=now(),
                            tool_versions=package_versions(target.tools), **job.source.lineage()),
            conversion=spec.get("conversion", {}),
            export={"opset": job.opset, "batch": job.batch})
        meta.write(tmp)
        meta.validation = parity(job, target, meta)
        meta.write(tmp)
    return BundleMeta.load(final), time.perf_counter() - t0, time.process_time() - c0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _check_packages(order: list[str]) -> None:
    missing = {pkg for t in order for mod, pkg in TARGETS[t].needs
               if importlib.util.find_spec(mod) is None}
    if missing:
        pkgs = sorted(missing)
        raise ExportInputError(f"targets {', '.join(order)} need the Python package(s) "
                               f"{', '.join(pkgs)} (pip install {' '.join(pkgs)})")


def export_all(checkpoint: str | Path, out_dir: str | Path, targets=None, opset: int = 18,
               dynamic_batch: bool = True, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Build, verify and write the requested targets (default: all) of a checkpoint and what
    they depend on. Returns {target: bundle folder}; writes <out_dir>/export_report.json (also
    when a target fails, with the error)."""
    order = plan(targets)
    _check_packages(order)
    return _export(checkpoint_source(checkpoint), Path(out_dir), order, targets, opset,
                   dynamic_batch, progress)


def import_model(model_file: str | Path, spec: str | Path, out_dir: str | Path, targets=None,
                 progress: Callable[[str], None] = print) -> dict[str, Path]:
    """An outside landmark model (ONNX or TFLite) and its spec -> the same verified bundles:
    the file itself as onnx_fp32 (or tflite_fp32), then every conversion that exists here."""
    order = plan(targets)
    src = import_source(model_file, spec)
    needs = [t for t in order if not (t == "tflite_fp32" and Path(model_file).suffix == ".onnx")]
    _check_packages(needs)
    return _export(src, Path(out_dir), order, targets, 18, True, progress)


def _export(source: Source, out_dir: Path, order: list[str], targets, opset: int,
            dynamic_batch: bool, progress) -> dict[str, Path]:
    t_start, c_start = time.perf_counter(), time.process_time()
    check_out_dir(out_dir)
    faces, face_sets = parity_faces(source.preprocess)
    job = Job(source, out_dir, int(opset), bool(dynamic_batch), faces, face_sets)
    report = {"model": out_dir.name, "source": {"kind": source.kind, **source.lineage()},
              "opset": job.opset, "batch": job.batch, "faces": face_sets, "targets": {},
              "status": "running"}
    progress(f"{'export' if source.kind == 'checkpoint' else 'import'} {_display(source.path)} -> "
             f"{_display(out_dir)}: {', '.join(order)} (parity on {len(faces)} real faces)")
    try:
        for i, name in enumerate(order, 1):
            _export_target(job, name, f"[{i}/{len(order)}] {name}", targets, report, progress)
        report["status"] = "ok"
    except ExportError as e:
        report["status"], report["error"] = "failed", str(e)
        raise
    finally:
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        report["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
        report["created"] = now()
        report["tool_versions"] = package_versions(sorted({v for t in order for v in TARGETS[t].tools}))
        if report["status"] != "running":
            atomic_write_json(out_dir / REPORT, report)
    progress(f"done in {report['total_seconds']:.1f} s (cpu {report['total_cpu_seconds']:.1f} s); "
             f"report {_display(out_dir / REPORT)}")
    return dict(job.bundles)


def _export_target(job: Job, name: str, step: str, targets, report: dict, progress) -> None:
    """Reuse, build or skip one target, and record it in the report."""
    target = TARGETS[name]
    blocked = [d for d in (target.parent,) if d and d in job.skipped]
    if blocked:
        job.skipped[name] = f"needs {blocked[0]}, which was skipped"
        report["targets"][name] = {"status": "skipped", "reason": job.skipped[name]}
        progress(f"{step} ... skipped: {job.skipped[name]}")
        return
    meta = None if name in (targets or TARGETS) else _reusable(job, name)
    reused = meta is not None
    if reused:
        seconds = cpu = 0.0
        progress(f"{step} ... reused existing bundle (same source and settings)")
    else:
        progress(f"{step} ...")
        try:
            meta, seconds, cpu = _build(job, target)
        except TargetSkipped as e:
            job.skipped[name] = str(e)
            report["targets"][name] = {"status": "skipped", "reason": str(e)}
            progress(f"      skipped: {e}")
            return
    job.bundles[name] = job.out_dir / name
    v = meta.validation
    report["targets"][name] = {
        "status": "ok", "path": _display(job.out_dir / name), "bytes": meta.bytes,
        "files": {k: f.bytes for k, f in meta.files.items()},
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
        "max_abs_diff": v["max_abs_diff"], "outputs": v["outputs"],
        "tolerance": v["tolerance"], "checked_against": v["checked_against"]["target"],
        "faces": v["faces"], "engine": meta.engine, "precision": meta.precision,
        "input_shape": meta.input.shape, "reused": reused}
    if not reused:
        hm = [o for o in v["outputs"].values() if "raw_max_abs_diff" in o]
        diff = (f"max |diff| {v['max_abs_diff']:.1e} <= {v['tolerance']:.0e}" if not hm else
                f"heatmaps max |diff| {max(o['raw_max_abs_diff'] for o in hm):.1e} <= "
                f"{v['tolerance'] * HEATMAP_RAW_FACTOR:.0e}, points mean "
                f"{max(o['mean_abs_diff'] for o in hm):.1e} <= {v['tolerance']:.0e}, max "
                f"{v['max_abs_diff']:.1e} <= {hm[0]['points_max_allowed']:.1e} (1 heatmap px)")
        progress(f"      {seconds:.1f} s (cpu {cpu:.1f} s), {_fmt_bytes(meta.bytes)}, {diff} vs "
                 f"{v['checked_against']['target']} on {v['faces']} faces")
