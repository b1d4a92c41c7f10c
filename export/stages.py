"""Export: a training checkpoint -> verified, deployable model bundles.

Every target is one entry of TARGETS (what it is converted from, which engine runs it, its
precision, its parity tolerance and the function that builds it). `export_all` builds the
requested targets plus whatever they are converted from or checked against, in registry order.
Each bundle is assembled in a staging folder (runtime.bundle.staging_dir), then its model is run
through runtime.engines next to its reference on the same real faces; a difference over the
tolerance raises ExportError and the staging folder is thrown away, so no unverified artifact
is ever left in place.

    from export.stages import export_all
    export_all("models/pfld68_w05.pt", "artifacts/pfld68_w05")            # all six targets
    export_all(ckpt, out, targets=["tflite_fp16"])     # + tflite_fp32, onnx_sim_fp32, onnx_fp32

Lineage: onnx_fp32 <- checkpoint; onnx_sim_fp32 <- onnx_fp32; openvino_* <- onnx_sim_fp32;
tflite_fp32 <- checkpoint (litert-torch converts from torch); tflite_fp16 <- tflite_fp32 (weights
cast to float16 by ai-edge-quantizer: litert-torch has no float16 option for non-generative
models). The simplified ONNX is the verified graph every other backend is compared to.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.bundle import BundleError, atomic_write_json, model_path, read_meta, sha256, \
    staging_dir, write_meta
from runtime.engines import ENGINES, EngineUnavailable
from runtime.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
TOL_FP32 = 1e-4          # max |diff| on crop-normalised coordinates (0.011 px of a 112 crop)
TOL_FP16 = 2e-3
PARITY_WFLW = 32         # WFLW test faces, cut from the official rectangles ("rect" protocol)
PARITY_300W = 8          # 300-W HELEN test faces (no rectangles: cut from the landmark extent)
OUTPUT_UNITS = "crop-normalised [0,1] x,y pairs"
REPORT = "export_report.json"
CHECKPOINT = "checkpoint"  # the lineage root: the torch model itself


class ExportError(Exception):
    """A conversion or its parity check failed; the message names the target and the figures."""


class ExportInputError(ExportError):
    """Bad input (checkpoint, output folder, target name, missing package): nothing was built."""


@dataclass(frozen=True)
class Target:
    name: str
    parent: str | None           # target it is converted from; None: the checkpoint
    engine: str                  # runtime.engines name that runs it
    precision: str               # fp32 | fp16
    tolerance: float             # max |diff| against `reference` on real faces
    build: Callable[["Job", Path, Path | None], dict]   # (job, folder, parent model file)
    reference: str | None = ""   # target it is checked against; "" = its parent, None = torch
    needs: tuple[tuple[str, str], ...] = ()   # (module, pip package) the conversion imports
    tools: tuple[str, ...] = ()               # distributions whose versions go to meta.json

    @property
    def checked_against(self) -> str | None:
        return self.parent if self.reference == "" else self.reference


@dataclass
class Job:
    """One export run: the checkpoint, its model, the parity faces and what is built so far."""
    checkpoint: Path
    ck: dict
    model: object                      # eval-mode train.model.PFLD
    out_dir: Path
    opset: int
    dynamic_batch: bool
    ck_sha: str
    faces: np.ndarray                  # NCHW float32 parity batch of real faces
    face_sets: dict[str, int]
    bundles: dict[str, Path] = field(default_factory=dict)
    _outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch(self) -> str:
        return "dynamic" if self.dynamic_batch else "static"

    def output_of(self, name: str | None) -> np.ndarray:
        """Output of the checkpoint (None) or of a finished bundle on the parity faces (cached)."""
        key = name or CHECKPOINT
        if key not in self._outputs:
            if name is None:
                import torch
                with torch.inference_mode():
                    y = self.model(torch.from_numpy(self.faces)).numpy()
            else:
                y = _run(self.bundles[name], TARGETS[name].engine, self.faces)
            self._outputs[key] = np.asarray(y, np.float32)
        return self._outputs[key]


# -- conversions ----------------------------------------------------------------------------
@contextlib.contextmanager
def quiet(label: str = "converter"):
    """Keep converters' chatter (Python and C++ logs alike) off the console: fds 1 and 2 go
    to a temporary file for the duration, whose tail is attached to the error if one is raised.
    Also used by quantize/."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except Exception as e:
            sys.stdout.flush()
            sys.stderr.flush()
            log.seek(0)
            text = log.read().decode(errors="replace").strip()
            if text:
                e.add_note(f"{label} output (last lines):\n" + text[-2000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _onnx_io(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    inp = m.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    return {"input": {"name": inp.name, "layout": "NCHW", "shape": shape, "dtype": "float32"},
            "output": {"name": m.graph.output[0].name, "units": OUTPUT_UNITS},
            "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(m.graph.node)}


def build_onnx(job: Job, folder: Path, src: None) -> dict:
    import onnx
    import torch
    path = folder / "model.onnx"
    # torch.export specialises a dimension whose sample size is 1, so trace dynamic with 2 faces
    sample = torch.from_numpy(job.faces[:2] if job.dynamic_batch else job.faces[:1])
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if job.dynamic_batch else None
    torch.onnx.export(job.model, (sample,), str(path), dynamo=True, external_data=False,
                      opset_version=job.opset, input_names=["input"], output_names=["points"],
                      dynamic_shapes=dynamic, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    io_ = _onnx_io(path)
    return {"files": ["model.onnx"], "input": io_["input"], "output": io_["output"],
            "opset": io_["opset"], "conversion": {"tool": "torch.onnx.export(dynamo=True)",
                                                  "nodes": io_["nodes"]}}


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
    return {"files": ["model.onnx"], "input": io_["input"], "output": io_["output"],
            "opset": io_["opset"], "conversion": {"tool": "onnxsim.simplify",
                                                  "nodes_before": _onnx_io(src)["nodes"],
                                                  "nodes": io_["nodes"]}}


def _build_openvino(job: Job, folder: Path, src: Path, fp16: bool) -> dict:
    import openvino as ov
    model = ov.convert_model(str(src))
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=fp16)
    ps = model.input(0).get_partial_shape()
    return {"files": ["model.xml", "model.bin"],
            "input": {"name": model.input(0).get_any_name(), "layout": "NCHW",
                      "shape": [d.get_length() if d.is_static else -1 for d in ps],
                      "dtype": "float32"},
            "output": {"name": model.output(0).get_any_name(), "units": OUTPUT_UNITS},
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
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    shape = [int(v) for v in i.get("shape_signature", i["shape"])]
    return {"input": {"name": i["name"], "layout": "NHWC" if shape[-1] == 3 else "NCHW",
                      "shape": shape, "dtype": np.dtype(i["dtype"]).name},
            "output": {"name": o["name"], "units": OUTPUT_UNITS}}


def build_tflite_fp32(job: Job, folder: Path, src: None) -> dict:
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
def _run(bundle_or_file: Path, engine: str, x: np.ndarray) -> np.ndarray:
    """Run a model through runtime.engines at full precision ("f32": OpenVINO would otherwise
    pick bf16 on CPUs that have it; the other engines run float32 anyway)."""
    path = Path(bundle_or_file)
    if path.is_dir():
        path = model_path(read_meta(path))
    try:
        with quiet():     # e.g. LiteRT's "Created TensorFlow Lite XNNPACK delegate" notice
            return np.asarray(ENGINES[engine](path, threads=1, precision="f32")(x), np.float32)
    except EngineUnavailable as e:
        raise ExportError(f"cannot run {path} for the parity check: {e}") from None


def parity(job: Job, target: Target, model_file: Path) -> dict:
    """Run `model_file` and its reference on the parity faces; ExportError if over tolerance."""
    ref_name = target.checked_against
    ref = job.output_of(ref_name)
    out = _run(model_file, target.engine, job.faces)
    outputs = {"points": (out, ref)}    # PFLD has one output; each output gets its own figure
    diffs = {}
    for name, (a, b) in outputs.items():
        if a.shape != b.shape:
            raise ExportError(f"{target.name}: output '{name}' has shape {a.shape}, its reference "
                              f"{ref_name or CHECKPOINT} gives {b.shape}")
        d = np.abs(a.astype(np.float64) - b)
        diffs[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
    bad = {k: v for k, v in diffs.items() if not v["max_abs_diff"] <= target.tolerance}
    if bad:
        lines = "; ".join(f"output '{k}': max |diff| {v['max_abs_diff']:.3e} "
                          f"(mean {v['mean_abs_diff']:.1e})" for k, v in diffs.items())
        raise ExportError(
            f"{target.name}: parity check against {ref_name or 'the torch checkpoint'} failed on "
            f"{len(job.faces)} real faces: {lines}; tolerance {target.tolerance:.0e} on "
            f"crop-normalised coordinates. The artifact was not written.")
    size = int(job.ck["arch"].get("input_size", 112))
    worst = max(v["max_abs_diff"] for v in diffs.values())
    return {"checked_against": _ref_record(job, ref_name), "engine": target.engine,
            "execution_precision": "f32", "faces": len(job.faces), "face_sets": job.face_sets,
            "outputs": diffs, "max_abs_diff": worst, "max_abs_diff_crop_px": worst * size,
            "tolerance": target.tolerance, "passed": True}


def _ref_record(job: Job, name: str | None) -> dict:
    if name is None:
        return {"target": CHECKPOINT, "path": None, "sha256": job.ck_sha, "engine": "torch"}
    meta = read_meta(job.bundles[name], verify=False)
    return {"target": name, "path": f"../{job.bundles[name].name}",
            "sha256": meta["files"][next(iter(meta["files"]))]["sha256"], "engine": meta["engine"]}


# -- orchestration --------------------------------------------------------------------------
def _versions(names) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _display(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


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
    if scheme.num_points != int(ck["arch"]["num_points"]):
        raise ExportInputError(f"{checkpoint}: scheme {scheme.name} has {scheme.num_points} points "
                               f"but the network predicts {ck['arch']['num_points']}")
    return ck, model_from_checkpoint(ck)


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


def parity_faces(pre) -> tuple[np.ndarray, dict[str, int]]:
    """A fixed batch of real faces: WFLW test faces ("rect") plus a few 300-W HELEN test faces."""
    from train.data import DataError, load_300w, load_wflw
    from train.metrics import face_batch
    try:
        wflw, helen = load_wflw(), load_300w(split="helen_test")
    except DataError as e:
        raise ExportInputError(f"the parity check needs real faces: {e}") from None
    wflw = wflw[::max(1, len(wflw) // PARITY_WFLW)][:PARITY_WFLW]
    helen = helen[::max(1, len(helen) // PARITY_300W)][:PARITY_300W]
    x = np.concatenate([face_batch(wflw, pre, "rect"), face_batch(helen, pre, "landmarks")])
    return x, {"wflw test (rect)": len(wflw), "300w helen_test (landmarks)": len(helen)}


def _reusable(job: Job, name: str) -> dict | None:
    """An existing bundle made from this checkpoint with these settings, intact on disk."""
    folder = job.out_dir / name
    if not folder.is_dir():
        return None
    try:
        meta = read_meta(folder)
    except BundleError:
        return None
    if meta.get("stage") != name or meta.get("source_checkpoint", {}).get("sha256") != job.ck_sha \
            or meta.get("export") != {"opset": job.opset, "batch": job.batch} \
            or not meta.get("validation", {}).get("passed"):
        return None
    t = TARGETS[name]
    for dep, record in ((t.parent, meta.get("parent", {})),
                        (t.checked_against, meta["validation"].get("checked_against", {}))):
        if dep and (dep not in job.bundles or _ref_record(job, dep)["sha256"] != record.get("sha256")):
            return None      # made from (or checked against) a bundle that has since changed
    return meta


def _build(job: Job, target: Target) -> tuple[dict, float, float]:
    """Convert, check and write one bundle: (meta, wall seconds, CPU seconds of this process)."""
    final = job.out_dir / target.name
    t0, c0 = time.perf_counter(), time.process_time()
    with staging_dir(final) as tmp:
        src = model_path(read_meta(job.bundles[target.parent])) if target.parent else None
        try:
            with quiet():
                spec = target.build(job, tmp, src)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - converters raise anything; name the stage
            raise ExportError(f"{target.name}: conversion failed: {type(e).__name__}: {e}"
                              + "".join(f"\n{n}" for n in getattr(e, "__notes__", []))) from e
        validation = parity(job, target, tmp / spec["files"][0])
        parent = ({"target": CHECKPOINT, "path": None, "sha256": job.ck_sha}
                  if target.parent is None else _ref_record(job, target.parent))
        parent.pop("engine", None)
        ck = job.ck
        meta = {
            "name": job.out_dir.name, "engine": target.engine, "precision": target.precision,
            "files": spec["files"], "preprocess": Preprocess.from_meta(ck).to_meta(),
            "scheme": ck["scheme"],
            "num_points": int(ck["arch"]["num_points"]), "input": spec["input"],
            "output": spec["output"], "opset": spec["opset"], "stage": target.name,
            "parent": parent,
            "source_checkpoint": {"path": _display(job.checkpoint), "sha256": job.ck_sha},
            "validation": validation, "conversion": spec.get("conversion", {}),
            "export": {"opset": job.opset, "batch": job.batch},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool_versions": _versions(target.tools),
        }
        write_meta(tmp, meta)
    return read_meta(final), time.perf_counter() - t0, time.process_time() - c0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def export_all(checkpoint: str | Path, out_dir: str | Path, targets=None, opset: int = 18,
               dynamic_batch: bool = True, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Build, verify and write the requested targets (default: all) and what they depend on.

    Returns {target: bundle folder} for every target in the plan and writes
    <out_dir>/export_report.json (also when a target fails, with the error).
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    order = plan(targets)
    missing = {pkg for t in order for mod, pkg in TARGETS[t].needs
               if importlib.util.find_spec(mod) is None}
    if missing:
        pkgs = sorted(missing)
        raise ExportInputError(f"targets {', '.join(order)} need the Python package(s) "
                               f"{', '.join(pkgs)} (pip install {' '.join(pkgs)})")
    ck, model = load_model(checkpoint)
    check_out_dir(out_dir)
    faces, face_sets = parity_faces(Preprocess.from_meta(ck))
    job = Job(checkpoint, ck, model, out_dir, int(opset), bool(dynamic_batch), sha256(checkpoint),
              faces, face_sets)
    report = {"model": out_dir.name,
              "checkpoint": {"path": _display(checkpoint), "sha256": job.ck_sha},
              "opset": job.opset, "batch": job.batch, "faces": face_sets, "targets": {},
              "status": "running"}
    progress(f"export {_display(checkpoint)} -> {_display(out_dir)}: {', '.join(order)} "
             f"(parity on {len(faces)} real faces)")
    try:
        for i, name in enumerate(order, 1):
            target = TARGETS[name]
            step = f"[{i}/{len(order)}] {name}"
            meta = None if name in (targets or TARGETS) else _reusable(job, name)
            reused = meta is not None
            if reused:
                seconds = cpu = 0.0
                progress(f"{step} ... reused existing bundle (same checkpoint and settings)")
            else:
                progress(f"{step} ...")
                meta, seconds, cpu = _build(job, target)
            job.bundles[name] = out_dir / name
            v = meta["validation"]
            size = sum(f["bytes"] for f in meta["files"].values())
            report["targets"][name] = {
                "path": _display(out_dir / name), "bytes": size,
                "files": {k: f["bytes"] for k, f in meta["files"].items()},
                "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                "max_abs_diff": v["max_abs_diff"],
                "tolerance": v["tolerance"], "checked_against": v["checked_against"]["target"],
                "faces": v["faces"], "engine": meta["engine"], "precision": meta["precision"],
                "input_shape": meta["input"]["shape"], "reused": reused}
            if not reused:
                progress(f"      {seconds:.1f} s (cpu {cpu:.1f} s), {_fmt_bytes(size)}, max |diff| "
                         f"{v['max_abs_diff']:.1e} <= {v['tolerance']:.0e} vs "
                         f"{v['checked_against']['target']} on {v['faces']} faces")
        report["status"] = "ok"
    except ExportError as e:
        report["status"], report["error"] = "failed", str(e)
        raise
    finally:
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        report["total_cpu_seconds"] = round(time.process_time() - c_start, 1)
        report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report["tool_versions"] = _versions(sorted({v for t in order for v in TARGETS[t].tools}))
        if report["status"] != "running":
            atomic_write_json(out_dir / REPORT, report)
    progress(f"done in {report['total_seconds']:.1f} s (cpu {report['total_cpu_seconds']:.1f} s); "
             f"report {_display(out_dir / REPORT)}")
    return dict(job.bundles)
