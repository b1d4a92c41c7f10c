"""What can be benchmarked: bundles under artifacts/<model>/, the torch checkpoint, and
external landmark models described by a small JSON spec.

Every target ends up as a `Target`: the engine to run it with, the primary model file, the
preprocessing/point scheme from its meta.json (or spec), and its size on disk. Nothing here
runs a model; measure.py does that in a fresh process per row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.bundle import META, OUTPUT_UNITS, PRECISIONS, BundleError, SpecError, load_spec, model_path, read_meta
from runtime.engines import ENGINES
from runtime.preprocess import Preprocess
from runtime.schemes import get_scheme

REPO_SPEC = Path(__file__).resolve().parent / "specs" / "example_pfld_external.json"


@dataclass
class Target:
    model: str                   # model name, e.g. pfld68_w05 (folder of the bundles) or the external's
    name: str                    # bundle folder (stage) name, "checkpoint", or the external's name
    backend: str                 # engine name in runtime.engines.ENGINES
    precision: str               # fp32 | fp16 | int8
    kind: str                    # bundle | checkpoint | external
    path: Path | None = None     # primary model file the engine loads
    meta: dict = field(default_factory=dict)      # preprocess, scheme, num_points, input
    adapter: dict = field(default_factory=dict)   # external models: layout, output units/order
    size_bytes: int | None = None
    files: list[str] = field(default_factory=list)
    reason: str = ""             # why this target cannot run (unreadable bundle, missing file)
    status: str = "skipped"      # the row status when `reason` is set: skipped (missing) | error


def folder_bytes(folder: Path) -> tuple[int, list[str]]:
    """Bytes of every file in a bundle folder (model, side files, meta.json): what gets copied."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(folder)) for p in files]


def discover_bundles(root: str | Path, model: str | None = None) -> list[Target]:
    """Every bundle folder (a sub-folder with meta.json) under `root`, sha256-verified.

    A bundle that fails verification is returned with `reason` set, so it becomes an error
    row instead of silently vanishing from the table.
    """
    root = Path(root)
    model = model or root.name
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if (p / META).is_file()):
        try:
            meta = read_meta(d, verify=True)
        except BundleError as e:
            try:
                raw = json.loads((d / META).read_text())
            except (OSError, ValueError):
                raw = {}
            out.append(Target(model, d.name, str(raw.get("engine", "?")),
                              str(raw.get("precision", "?")), "bundle", reason=str(e),
                              status="error"))
            continue
        size, files = folder_bytes(d)
        out.append(Target(model, d.name, meta["engine"], meta["precision"], "bundle",
                          model_path(meta), meta, {}, size, files))
    return out


def checkpoint_target(path: str | Path, model: str) -> Target:
    """The torch FP32 reference; `reason` is set when the checkpoint cannot be read."""
    from benchmark.torch_engine import TorchEngine, checkpoint_meta
    path = Path(path)
    t = Target(model, "checkpoint", TorchEngine.name, "fp32", "checkpoint", path)
    ok, why = TorchEngine.available()
    if not ok:
        t.reason = why
        return t
    try:
        t.meta = checkpoint_meta(path)
    except FileNotFoundError as e:
        t.reason = str(e)
        return t
    except ValueError as e:
        t.reason, t.status = str(e), "error"
        return t
    t.size_bytes, t.files = path.stat().st_size, [path.name]
    return t


# -- external models ---------------------------------------------------------------------------
def _engine_for(path: Path, spec: dict, where: str) -> str:
    if "engine" in spec:
        if spec["engine"] not in ENGINES:
            raise SpecError(f"{where}: engine {spec['engine']!r} is not one of {', '.join(ENGINES)}")
        return spec["engine"]
    for name, cls in ENGINES.items():
        if path.suffix in cls.suffixes:
            return name
    raise SpecError(f"{where}: no engine runs {path.suffix} files; set \"engine\" to one of "
                    f"{', '.join(ENGINES)}")


def external_target(model_file: str | Path, spec_path: str | Path) -> Target:
    """An external landmark model scored with its own preprocessing on our faces."""
    model_file = Path(model_file)
    spec = load_spec(spec_path)
    name = spec.get("name") or model_file.stem
    backend = _engine_for(model_file, spec, str(spec_path))
    pre = Preprocess(spec["input_size"], spec["color"], tuple(spec["mean"]), tuple(spec["std"]),
                     float(spec["crop_scale"]), float(spec["box_shift_y"]))
    n = spec["input_size"]
    meta = {"name": name, "engine": backend, "precision": spec["precision"],
            "preprocess": pre.to_meta(), "scheme": spec["scheme"], "num_points": spec["num_points"],
            "input": {"layout": spec["layout"],
                      "shape": [-1, 3, n, n] if spec["layout"] == "NCHW" else [-1, n, n, 3]},
            "spec": str(spec_path)}
    scale = {"normalised": (1.0, 0.0), "pixels": (1.0 / n, 0.0), "signed": (0.5, 0.5)}
    a, b = scale[spec["output_units"]]
    adapter = {"layout": spec["layout"], "output_scale": a, "output_offset": b,
               "output_order": spec["output_order"], "output_units": spec["output_units"]}
    t = Target(name, name, backend, spec["precision"], "external", model_file, meta, adapter)
    if not model_file.is_file():
        t.reason = f"external model {model_file} does not exist"
        return t
    # the model file and any side files next to it with the same stem (model.bin, .onnx.data)
    side = sorted(p for p in model_file.parent.glob(model_file.stem + ".*") if p.is_file())
    t.size_bytes = sum(p.stat().st_size for p in side)
    t.files = [p.name for p in side]
    return t
