"""Detector bundles: a face detector's model file and a meta.json of kind "detector".

The landmark bundle's BundleMeta describes crops and points; a detector takes a whole image of
any size and returns boxes, so it has its own, smaller description:

    {"kind": "detector", "schema_version": 1, "name", "engine", "precision", "files",
     "input":   {"name", "layout": "NCHW", "color": "bgr", "range": [0, 255], "divisor": 32,
                 "shape": [1, 3, -1, -1]},
     "decoder": "yunet",  "outputs": ["cls_8", ... "kps_32"],     (the model file's order)
     "defaults": {"size", "score_threshold", "nms_threshold"},    (size: measured on photos)
     "lineage", "validation", "quantization", "conversion", "architectures"}

Read and written only through DetectorMeta (errors name the file and key); writes are atomic.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.bundle import META, PRECISIONS, BundleError, FileInfo, sha256
from runtime.errors import LandmarkError

KIND = "detector"
SCHEMA = 1
DECODERS = ("yunet",)


def is_detector_bundle(path: str | os.PathLike) -> bool:
    """A detector bundle folder, or a model file that carries a detector description."""
    path = Path(path)
    try:
        if path.is_file():
            from runtime.embedded import read_embedded
            return (read_embedded(path) or {}).get("kind") == KIND
        return json.loads((path / META).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError, LandmarkError):
        return False


@dataclass
class DetectorMeta:
    name: str
    engine: str
    precision: str
    files: dict[str, FileInfo]
    input: dict = field(default_factory=lambda: {"name": "input", "layout": "NCHW",
                                                 "color": "bgr", "range": [0, 255],
                                                 "divisor": 32, "shape": [1, 3, -1, -1]})
    decoder: str = "yunet"
    outputs: list[str] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    conversion: dict = field(default_factory=dict)
    architectures: list[str] | None = None
    folder: Path | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> DetectorMeta:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        if d.get("kind") != KIND:
            raise BundleError(f"{where}: kind {d.get('kind')!r} is not {KIND!r}: a landmark "
                              "bundle goes to --model, a detector bundle to --detector-model")
        if d.get("schema_version") != SCHEMA:
            raise BundleError(f"{where}: schema_version {d.get('schema_version')!r} is not "
                              f"{SCHEMA}; update the runtime")
        for key, typ in (("name", str), ("engine", str), ("precision", str), ("files", dict),
                         ("input", dict), ("decoder", str), ("outputs", list)):
            if not isinstance(d.get(key), typ):
                raise BundleError(f"{where}: key {key!r} must be a {typ.__name__}, got "
                                  f"{d.get(key)!r}")
        if d["precision"] not in PRECISIONS:
            raise BundleError(f"{where}: precision {d['precision']!r} is not one of "
                              f"{', '.join(PRECISIONS)}")
        if d["decoder"] not in DECODERS:
            raise BundleError(f"{where}: decoder {d['decoder']!r} is not one of {', '.join(DECODERS)}")
        if not d["files"]:
            raise BundleError(f"{where}: 'files' names no model file")
        files = {}
        for n, info in d["files"].items():
            if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                    and isinstance(info.get("bytes"), int)):
                raise BundleError(f"{where}: files[{n!r}] must be {{\"sha256\": str, \"bytes\": "
                                  f"int}}, got {info!r}")
            files[n] = FileInfo(info["sha256"], info["bytes"])
        if d["input"].get("layout", "NCHW") != "NCHW" or d["input"].get("color", "bgr") != "bgr":
            raise BundleError(f"{where}: input must be NCHW BGR (got {d['input']!r})")
        size = d.get("defaults", {}).get("size", 320)
        if not isinstance(size, int) or size < 0:
            raise BundleError(f"{where}: defaults.size must be an integer >= 0, got {size!r}")
        archs = d.get("architectures")
        return cls(d["name"], d["engine"], d["precision"], files, dict(d["input"]),
                   d["decoder"], [str(o) for o in d["outputs"]], dict(d.get("defaults", {})),
                   dict(d.get("lineage", {})), dict(d.get("validation", {})),
                   dict(d.get("quantization", {})), dict(d.get("conversion", {})), archs)

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = True) -> DetectorMeta:
        folder = Path(folder)
        if folder.is_file():          # a bare model file that carries its description
            from runtime.embedded import bare_meta
            meta = cls.from_dict(bare_meta(folder, detector=True), f"{folder} (embedded {META})")
            meta.folder = folder.parent
            return meta
        if not folder.is_dir():
            raise BundleError(f"detector bundle {folder} does not exist or is not a folder")
        p = folder / META
        if not p.is_file():
            raise BundleError(f"detector bundle {folder} has no {META}; make one with "
                              "`python export/detector.py`")
        try:
            d = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{p} is not valid JSON: {e}") from None
        meta = cls.from_dict(d, str(p))
        meta.folder = folder
        if verify:
            for n, info in meta.files.items():
                f = folder / n
                if not f.is_file():
                    raise BundleError(f"detector bundle {folder}: {n} is missing")
                if f.stat().st_size != info.bytes or sha256(f) != info.sha256:
                    raise BundleError(f"detector bundle {folder}: {n} does not match the sha256 "
                                      f"in {META} (corrupt or modified copy)")
        return meta

    def check_machine(self) -> None:
        m = platform.machine()
        if self.architectures is not None and m not in self.architectures:
            raise BundleError(f"detector bundle {self.folder} runs on "
                              f"{', '.join(self.architectures)} only, not on {m}")

    @property
    def model_file(self) -> Path:
        return Path(self.folder or ".") / next(iter(self.files))

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        return {"kind": KIND, "schema_version": SCHEMA, **d}

    def write(self, folder: str | os.PathLike) -> DetectorMeta:
        from runtime.bundle import write_meta
        self.folder = write_meta(self, Path(folder), "detector bundle")
        return self
