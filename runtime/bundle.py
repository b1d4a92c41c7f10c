"""Model bundles: one folder with the model file(s) and a meta.json that describes them.

meta.json holds everything a consumer needs (preprocessing, the outputs and how to decode them,
precision, engine format, lineage, sha256 of every file), so no stage re-derives constants. It
is read and written only through `BundleMeta`, which validates it and names the file and key
at fault. Writes are atomic: a bundle is assembled in a temporary sibling folder and renamed
into place. Also here: the spec format that describes an outside model (`load_spec`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .preprocess import Preprocess
from .schemes import get_scheme
from runtime.errors import LandmarkError

META = "meta.json"
SCHEMA_VERSION = 2          # 1: before the typed description (still read)


PRECISIONS = ("fp32", "fp16", "int8")
REPO_SPEC_DOC = "benchmark/specs/example_pfld_external.json"
OUTPUT_UNITS = {   # spec "output_units" -> how to bring the output to crop-normalised [0, 1]
    "normalised": "x, y in [0, 1] of the crop (our bundles)",
    "pixels": "x, y in pixels of the input crop (0 .. input_size)",
    "signed": "x, y in [-1, 1] about the crop centre",
}


class SpecError(LandmarkError, ValueError):
    """An external-model spec file is missing a field or has a value that cannot be used."""


class BundleError(LandmarkError):
    """A bundle is missing, incomplete or corrupt; the message says which file and why."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600: give it the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def staging_dir(final: str | os.PathLike):
    """Yield a temporary folder next to `final`; on success it replaces `final` atomically.

    On any exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(final.parent, os.W_OK):
        raise BundleError(f"output folder {final.parent} is not writable")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it 0700; a bundle is copied to devices
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the typed description ---------------------------------------------------------------------
OUTPUT_KINDS = {
    "points": "direct regression: 2K values a face, x,y pairs (order) in `units` of the crop",
    "heatmaps": "one heatmap a point, (K, H, W); params: stride, decoder, window, tau "
                "(runtime.decode.HeatmapDecoder)",
}
OUTPUT_ORDERS = ("xyxy", "xxyy")


def _need(d: dict, key: str, types, where: str):
    if key not in d:
        raise BundleError(f"{where}: lacks the key {key!r}")
    v = d[key]
    if not isinstance(v, types) or isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BundleError(f"{where}: key {key!r} must be {want}, got {v!r}")
    return v


@dataclass
class FileInfo:
    sha256: str
    bytes: int


@dataclass
class InputSpec:
    name: str = "input"
    layout: str = "NCHW"                  # what the model file takes (engines feed NCHW batches)
    shape: list = field(default_factory=lambda: [-1, 3, 112, 112])
    dtype: str = "float32"
    tensor_dtype: str | None = None       # a full-integer model's own input tensor type

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "InputSpec":
        layout = d.get("layout", "NCHW")
        if layout not in ("NCHW", "NHWC"):
            raise BundleError(f"{where}: input.layout must be NCHW or NHWC, got {layout!r}")
        shape = d.get("shape", [-1, 3, 112, 112])
        if not (isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
            raise BundleError(f"{where}: input.shape must be a list of integers, got {shape!r}")
        return cls(str(d.get("name", "input")), layout, shape, str(d.get("dtype", "float32")),
                   d.get("tensor_dtype"))


@dataclass
class OutputSpec:
    """One model output and how to read it (runtime.decode picks the decoder from `kind`)."""
    name: str = "points"                  # graph output name
    kind: str = "points"                  # OUTPUT_KINDS
    scheme: str = "300w68"                # runtime.schemes name
    units: str = "normalised"             # OUTPUT_UNITS (kind "points")
    order: str = "xyxy"                   # OUTPUT_ORDERS (kind "points")
    index: int = 0                        # position among the model file's outputs
    params: dict = field(default_factory=dict)   # kind-specific settings

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "OutputSpec":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object, got {d!r}")
        kind = d.get("kind", "points")
        if kind not in OUTPUT_KINDS:
            raise BundleError(f"{where}: kind {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
        scheme = _need(d, "scheme", str, where)
        try:
            get_scheme(scheme)
        except KeyError as e:
            raise BundleError(f"{where}: {e.args[0]}") from None
        units = d.get("units", "normalised")
        if units not in OUTPUT_UNITS:
            raise BundleError(f"{where}: units {units!r} is not one of {', '.join(OUTPUT_UNITS)}")
        order = d.get("order", "xyxy")
        if order not in OUTPUT_ORDERS:
            raise BundleError(f"{where}: order {order!r} is not one of {', '.join(OUTPUT_ORDERS)}")
        index = d.get("index", 0)
        if not isinstance(index, int) or index < 0:
            raise BundleError(f"{where}: index must be a non-negative integer, got {index!r}")
        return cls(str(d.get("name", "points")), kind, scheme, units, order, index,
                   dict(d.get("params", {})))

    @property
    def num_points(self) -> int:
        return get_scheme(self.scheme).num_points


@dataclass
class Lineage:
    """Where a bundle comes from: its stage, the bundle it was converted from (parent), and
    the training checkpoint or outside model at the root."""
    stage: str = ""
    parent: dict | None = None            # {"target", "path", "sha256"}
    source_checkpoint: dict | None = None  # {"path", "sha256"}
    source_model: dict | None = None      # imported models: {"path", "sha256", "spec"}
    created: str = ""
    tool_versions: dict = field(default_factory=dict)


@dataclass
class BundleMeta:
    """A bundle's meta.json as a type: `BundleMeta.load(folder)` reads and checks it (naming
    the file and the bad key), `meta.write(folder)` fills in each file's sha256/size and
    writes it atomically. Schema 1 files (written before the type existed: one implicit output
    described by top-level "scheme"/"output") still load."""
    name: str
    engine: str
    precision: str                        # PRECISIONS
    files: dict[str, FileInfo]            # the first is the model file the engine loads
    preprocess: Preprocess
    outputs: list[OutputSpec]
    input: InputSpec = field(default_factory=InputSpec)
    opset: int | None = None
    lineage: Lineage = field(default_factory=Lineage)
    validation: dict = field(default_factory=dict)     # parity (export) or drift (INT8) figures
    conversion: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)         # export settings (opset, batch)
    architectures: list[str] | None = None   # machines the bundle is known to run on (None: any)
    schema_version: int = SCHEMA_VERSION
    folder: Path | None = field(default=None, compare=False, repr=False)

    # -- reading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = META) -> "BundleMeta":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        version = d.get("schema_version", d.get("format_version"))
        if version not in (1, SCHEMA_VERSION):
            raise BundleError(f"{where}: schema_version {version!r} is not one this runtime "
                              f"reads (1 or {SCHEMA_VERSION}); update the runtime")
        engine = _need(d, "engine", str, where)
        precision = _need(d, "precision", str, where)
        if precision not in PRECISIONS:
            raise BundleError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        files = _need(d, "files", dict, where)
        if not files:
            raise BundleError(f"{where}: 'files' names no model file")
        finfo = {}
        for name, info in files.items():
            if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                    and isinstance(info.get("bytes"), int)):
                raise BundleError(f"{where}: files[{name!r}] must be {{\"sha256\": str, "
                                  f"\"bytes\": int}}, got {info!r}")
            finfo[name] = FileInfo(info["sha256"], info["bytes"])
        p = _need(d, "preprocess", dict, where)
        try:
            pre = Preprocess.from_dict(p)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: key 'preprocess' is not valid: {e!r}") from None
        if version == 1:      # one implicit regression output
            scheme = _need(d, "scheme", str, where)
            out = d.get("output") or {}
            outputs = [OutputSpec.from_dict({"name": out.get("name", "points"), "scheme": scheme},
                                            f"{where}: key 'scheme'")]
            lineage = Lineage(d.get("stage", ""), d.get("parent"), d.get("source_checkpoint"),
                              None, d.get("created", ""), d.get("tool_versions", {}))
        else:
            outs = _need(d, "outputs", list, where)
            if not outs:
                raise BundleError(f"{where}: 'outputs' is empty")
            outputs = [OutputSpec.from_dict(o, f"{where}: outputs[{i}]") for i, o in enumerate(outs)]
            lin = d.get("lineage", {})
            if not isinstance(lin, dict):
                raise BundleError(f"{where}: key 'lineage' must be an object")
            lineage = Lineage(**{k: lin[k] for k in Lineage.__dataclass_fields__ if k in lin})
        opset = d.get("opset")
        if opset is not None and not isinstance(opset, int):
            raise BundleError(f"{where}: key 'opset' must be an integer or null, got {opset!r}")
        archs = d.get("architectures")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise BundleError(f"{where}: key 'architectures' must be a list of machine names "
                              f"(e.g. [\"x86_64\"]) or null, got {archs!r}")
        return cls(d.get("name", ""), engine, precision, finfo, pre, outputs,
                   InputSpec.from_dict(d.get("input", {}), where), opset, lineage,
                   dict(d.get("validation", {})), dict(d.get("conversion", {})),
                   dict(d.get("quantization", {})), dict(d.get("export", {})), archs,
                   SCHEMA_VERSION)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BundleMeta":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise BundleError(f"{path} cannot be read: {e.strerror or e}") from None
        meta = cls.from_dict(d, str(path))
        meta.folder = path.parent
        return meta

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = True) -> "BundleMeta":
        """Read a bundle folder's meta.json; with verify, check every file's size and sha256."""
        folder = Path(folder)
        if folder.is_file():
            return cls.from_model_file(folder)
        if not folder.is_dir():
            raise BundleError(f"bundle {folder} does not exist or is not a folder")
        mp = folder / META
        if not mp.is_file():
            raise BundleError(f"bundle {folder} has no {META}; is it a model bundle written by "
                              "`make export` / `make quantize`?")
        meta = cls.from_json(mp)
        if verify:
            meta.verify()
        return meta

    @classmethod
    def from_model_file(cls, path: str | os.PathLike) -> "BundleMeta":
        """A bare model file (.onnx, .xml, .tflite) described by what it carries in its own
        metadata (runtime.embedded; written by every export and quantize); nothing to verify
        against, since the sha256 lives in meta.json."""
        from .embedded import bare_meta
        path = Path(path)
        meta = cls.from_dict(bare_meta(path, detector=False), f"{path} (embedded {META})")
        meta.folder = path.parent
        return meta

    def verify(self) -> None:
        for name, info in self.files.items():
            p = self.folder / name
            if not p.is_file():
                raise BundleError(f"bundle {self.folder}: {name} is missing")
            if p.stat().st_size != info.bytes or sha256(p) != info.sha256:
                raise BundleError(f"bundle {self.folder}: {name} does not match the sha256 in "
                                  f"{META} (corrupt or modified copy); re-copy the bundle")

    # -- writing ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        d["preprocess"] = self.preprocess.to_meta()
        d["schema_version"] = SCHEMA_VERSION
        return d

    def write(self, folder: str | os.PathLike) -> "BundleMeta":
        """Fill in sha256/size of every file named in `files` (which must exist in `folder`)
        and write meta.json atomically."""
        self.folder = write_meta(self, Path(folder), "bundle")
        return self

    def check_machine(self, machine: str | None = None) -> None:
        """BundleError if the bundle is known not to run on this machine (`architectures`)."""
        import platform
        machine = machine or platform.machine()
        if self.architectures is not None and machine not in self.architectures:
            why = self.quantization.get("architectures_note", "")
            raise BundleError(f"bundle {self.folder} runs on {', '.join(self.architectures)} "
                              f"only, not on {machine}" + (f": {why}" if why else "")
                              + "; use another bundle of the model on this machine")

    # -- what consumers ask --------------------------------------------------------------------
    @property
    def model_file(self) -> Path:
        """The primary model file (the first entry of `files`)."""
        return Path(self.folder or ".") / next(iter(self.files))

    @property
    def sha256(self) -> str:
        return next(iter(self.files.values())).sha256

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @property
    def stage(self) -> str:
        return self.lineage.stage

    @property
    def scheme(self) -> str:
        """The point scheme of the default (first) output."""
        return self.outputs[0].scheme

    def output(self, which: str | int | None = None) -> OutputSpec:
        """An output by position in `outputs` (a small int), scheme name, output name or point
        count (68, 98); None: the first."""
        if which is None:
            return self.outputs[0]
        if isinstance(which, int) and 0 <= which < len(self.outputs):
            return self.outputs[which]
        for o in self.outputs:
            if which in (o.scheme, o.name, o.num_points):
                return o
        raise BundleError(f"bundle {self.folder}: no output {which!r}; it has "
                          + ", ".join(f"{o.name} ({o.scheme}, {o.num_points} points)" for o in self.outputs))

    @classmethod
    def from_spec(cls, model_file: str | os.PathLike, spec: dict, engine: str,
                  spec_path: str | os.PathLike | None = None) -> "BundleMeta":
        """The description of an outside model file from its checked spec (load_spec); its
        file entry is not hashed (nothing is written: use export/run.py --import for that)."""
        model_file = Path(model_file)
        n = spec["input_size"]
        pre = Preprocess(n, spec["color"], tuple(spec["mean"]), tuple(spec["std"]),
                         float(spec["crop_scale"]), float(spec["box_shift_y"]))
        meta = cls(spec.get("name") or model_file.stem, engine, spec["precision"],
                   {model_file.name: FileInfo("", 0)}, pre,
                   [OutputSpec(f"output_{spec['output_index']}", "points", spec["scheme"],
                               spec["output_units"], spec["output_order"], spec["output_index"])],
                   InputSpec("input", spec["layout"],
                             [-1, 3, n, n] if spec["layout"] == "NCHW" else [-1, n, n, 3]),
                   lineage=Lineage(stage="external", source_model={
                       "path": str(model_file), "spec_path": str(spec_path) if spec_path else None}))
        meta.folder = model_file.parent
        return meta

    @staticmethod
    def files_of(*names: str) -> dict[str, FileInfo]:
        """A files dict to be filled in by write()."""
        return {n: FileInfo("", 0) for n in names}


# What writes a bundle's description into its model file: common.embed registers it when
# imported (writing needs the onnx package, which a device does not have; the runtime only
# reads it, runtime/embedded.py).
_EMBEDDER = None


def set_embedder(fn) -> None:
    global _EMBEDDER
    _EMBEDDER = fn


def write_meta(meta, folder: Path, what: str) -> Path:
    """The shared write of BundleMeta and DetectorMeta: check that every file in `meta.files`
    exists, embed the description in the first (the model file), then fill in each file's
    sha256 and size and write meta.json atomically."""
    for name in meta.files:
        if not (folder / name).is_file():
            raise BundleError(f"{what} {folder}: file {name} named in meta.json does not exist")
    embed_description(folder / next(iter(meta.files)), meta.to_dict())
    for name in meta.files:
        p = folder / name
        meta.files[name] = FileInfo(sha256(p), p.stat().st_size)
    atomic_write_json(folder / META, meta.to_dict())
    return folder


def embed_description(model_file: Path, meta: dict) -> None:
    """The description in the model file's own metadata, for the formats that have it; other
    files (a torch reference) are left as they are."""
    if model_file.suffix.lower() not in (".onnx", ".xml", ".tflite"):
        return
    from .embedded import EmbeddedError, description, read_embedded
    try:
        if read_embedded(model_file) == json.loads(json.dumps(description(meta))):
            return      # already there (a bundle's second write adds only its validation)
    except EmbeddedError:
        pass            # not readable as its format: the embedder says why
    if _EMBEDDER is None:
        raise BundleError(f"{model_file}: nothing registered to embed the bundle description "
                          "(import common.embed before writing bundles)")
    try:
        _EMBEDDER(model_file, meta)
    except (EmbeddedError, ImportError) as e:
        raise BundleError(f"{model_file}: the bundle description could not be embedded: "
                          f"{e}") from None


def read_meta(folder: str | os.PathLike, verify: bool = True) -> BundleMeta:
    return BundleMeta.load(folder, verify)


# -- specs of outside models ------------------------------------------------------------------
def load_spec(spec_path: str | Path, require_size: bool = True) -> dict:
    """Read and check an outside model's spec (see benchmark/specs/example_pfld_external.json)."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise SpecError(f"external-model spec {spec_path} does not exist")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{spec_path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{spec_path}: expected a JSON object")
    where = str(spec_path)
    for key in (("input_size",) if require_size else ()) + ("mean", "std"):
        if key not in spec:
            raise SpecError(f"{where}: missing {key!r} (see {REPO_SPEC_DOC})")
    for key in ("mean", "std"):
        v = spec[key]
        v = [v] * 3 if isinstance(v, (int, float)) else v
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise SpecError(f"{where}: {key!r} must be a number or 3 numbers (pixel units 0..255), "
                            f"got {spec[key]!r}")
        if key == "std" and min(v) <= 0:
            raise SpecError(f"{where}: 'std' must be positive, got {v}")
        spec[key] = [float(x) for x in v]
    size = spec.get("input_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise SpecError(f"{where}: 'input_size' must be a positive integer, got {size!r}")
    index = spec.setdefault("output_index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise SpecError(f"{where}: 'output_index' must be a non-negative integer, got {index!r}")
    color = spec.setdefault("color", "RGB")
    if color not in ("RGB", "BGR"):
        raise SpecError(f"{where}: 'color' must be 'RGB' or 'BGR', got {color!r}")
    layout = spec.setdefault("layout", "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise SpecError(f"{where}: 'layout' must be 'NCHW' or 'NHWC', got {layout!r}")
    units = spec.setdefault("output_units", "normalised").replace("normalized", "normalised")
    if units not in OUTPUT_UNITS:
        raise SpecError(f"{where}: 'output_units' must be one of {', '.join(OUTPUT_UNITS)}, got {units!r}")
    spec["output_units"] = units
    order = spec.setdefault("output_order", "xyxy")
    if order not in ("xyxy", "xxyy"):
        raise SpecError(f"{where}: 'output_order' must be 'xyxy' (x0 y0 x1 y1 ...) or 'xxyy' "
                        f"(all x then all y), got {order!r}")
    if "scheme" not in spec and "num_points" not in spec:
        raise SpecError(f"{where}: give 'scheme' (300w68 | wflw98) or 'num_points' (68 | 98)")
    try:
        scheme = get_scheme(spec.get("scheme", spec.get("num_points")))
    except KeyError as e:
        raise SpecError(f"{where}: {e.args[0]}") from None
    if "num_points" in spec and int(spec["num_points"]) != scheme.num_points:
        raise SpecError(f"{where}: num_points {spec['num_points']} does not match scheme {scheme.name}")
    spec["scheme"], spec["num_points"] = scheme.name, scheme.num_points
    spec.setdefault("crop_scale", 1.2)
    spec.setdefault("box_shift_y", 0.0)
    spec.setdefault("precision", "fp32")
    if spec["precision"] not in PRECISIONS:
        raise SpecError(f"{where}: 'precision' must be one of {', '.join(PRECISIONS)}")
    return spec


