"""What can be benchmarked: bundles under artifacts/<model>/ (ours or imported), a torch
checkpoint, and external landmark model files described by a spec JSON.

Every target ends up as a `Target`: the engine to run it with, the primary model file, its
description as a runtime.bundle.BundleMeta (from meta.json, the checkpoint, or the spec: so the
runtime's decoders read every output alike), and its size on disk. Nothing here runs a model;
measure.py does that in a fresh process per row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.torch_engine import TorchEngine, bench_engines, checkpoint_meta
from runtime.bundle import (META, BundleError, BundleMeta, SpecError, load_spec)

REPO_SPEC = Path(__file__).resolve().parent / "specs" / "example_pfld_external.json"


@dataclass
class Target:
    model: str                   # model name, e.g. pfld68_w05 (folder of the bundles) or the external's
    name: str                    # bundle folder (stage) name, "checkpoint", or the external's name
    backend: str                 # engine name in benchmark.torch_engine.bench_engines()
    precision: str               # fp32 | fp16 | int8
    kind: str                    # bundle | checkpoint | external | missing
    path: Path | None = None     # primary model file the engine loads
    meta: BundleMeta | None = None
    size_bytes: int | None = None
    files: list[str] = field(default_factory=list)
    reason: str = ""             # why this target cannot run (unreadable bundle, missing file)
    status: str = "skipped"      # the row status when `reason` is set: skipped (missing) | error

    @property
    def root_sha(self) -> str | None:
        """sha256 of the lineage root (checkpoint or imported model), to tie rows of one model."""
        if self.meta is None:
            return None
        lin = self.meta.lineage
        return (lin.source_checkpoint or lin.source_model or {}).get("sha256")


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
            meta = BundleMeta.load(d, verify=True)
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
        out.append(Target(model, d.name, meta.engine, meta.precision, "bundle",
                          meta.model_file, meta, size, files))
    return out


def checkpoint_target(path: str | Path, model: str) -> Target:
    """The torch FP32 reference; `reason` is set when the checkpoint cannot be read."""
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
    engines = bench_engines()
    if "engine" in spec:
        if spec["engine"] not in engines:
            raise SpecError(f"{where}: engine {spec['engine']!r} is not one of {', '.join(engines)}")
        return spec["engine"]
    for name, cls in engines.items():
        if path.suffix in cls.suffixes:
            return name
    raise SpecError(f"{where}: no engine runs {path.suffix} files; set \"engine\" to one of "
                    f"{', '.join(engines)}")


def external_target(model_file: str | Path, spec_path: str | Path) -> Target:
    """An external landmark model scored with its own preprocessing on our faces."""
    model_file = Path(model_file)
    spec = load_spec(spec_path)
    name = spec.get("name") or model_file.stem
    backend = _engine_for(model_file, spec, str(spec_path))
    t = Target(name, name, backend, spec["precision"], "external", model_file,
               BundleMeta.from_spec(model_file, spec, backend, spec_path))
    if not model_file.is_file():
        t.reason = f"external model {model_file} does not exist"
        return t
    # the model file and any side files next to it with the same stem (model.bin, .onnx.data)
    side = sorted(p for p in model_file.parent.glob(model_file.stem + ".*") if p.is_file())
    t.size_bytes = sum(p.stat().st_size for p in side)
    t.files = [p.name for p in side]
    return t
