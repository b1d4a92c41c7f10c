"""Model bundles: one folder with the model file(s) and a meta.json that describes them.

meta.json holds everything a consumer needs (preprocessing, point scheme, precision, engine
format, parent artifact, sha256 of every file), so no stage re-derives constants. Writes are
atomic: a bundle is assembled in a temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .schemes import get_scheme

META = "meta.json"
FORMAT_VERSION = 1


PRECISIONS = ("fp32", "fp16", "int8")
REPO_SPEC_DOC = "benchmark/specs/example_pfld_external.json"
OUTPUT_UNITS = {   # spec "output_units" -> how to bring the output to crop-normalised [0, 1]
    "normalised": "x, y in [0, 1] of the crop (our bundles)",
    "pixels": "x, y in pixels of the input crop (0 .. input_size)",
    "signed": "x, y in [-1, 1] about the crop centre",
}


class SpecError(ValueError):
    """An external-model spec file is missing a field or has a value that cannot be used."""


class BundleError(Exception):
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


def write_meta(folder: str | os.PathLike, meta: dict) -> dict:
    """Fill in sha256/size of every model file named in meta['files'] and write meta.json."""
    folder = Path(folder)
    meta = dict(meta)
    meta["format_version"] = FORMAT_VERSION
    files = {}
    for name in meta["files"]:
        p = folder / name
        if not p.is_file():
            raise BundleError(f"bundle {folder}: file {name} named in meta.json does not exist")
        files[name] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    meta["files"] = files
    atomic_write_json(folder / META, meta)
    return meta


def read_meta(folder: str | os.PathLike, verify: bool = True) -> dict:
    """Read a bundle's meta.json; with verify, check every file's size and sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} does not exist or is not a folder")
    mp = folder / META
    if not mp.is_file():
        raise BundleError(f"bundle {folder} has no {META}; is it a model bundle written by "
                          "`make export` / `make quantize`?")
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mp} is not valid JSON: {e}") from None
    for key in ("files", "preprocess", "scheme", "engine", "precision"):
        if key not in meta:
            raise BundleError(f"{mp} lacks the key {key!r}")
    if verify:
        for name, info in meta["files"].items():
            p = folder / name
            if not p.is_file():
                raise BundleError(f"bundle {folder}: {name} is missing")
            if p.stat().st_size != info["bytes"] or sha256(p) != info["sha256"]:
                raise BundleError(f"bundle {folder}: {name} does not match the sha256 in "
                                  f"{META} (corrupt or modified copy); re-copy the bundle")
    meta["_dir"] = str(folder)
    return meta


def model_path(meta: dict) -> Path:
    """The primary model file of a bundle (the first entry of 'files')."""
    return Path(meta["_dir"]) / next(iter(meta["files"]))


# -- specs of outside models ------------------------------------------------------------------
def load_spec(spec_path: str | Path) -> dict:
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
    for key in ("input_size", "mean", "std"):
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
    if not isinstance(spec["input_size"], int) or spec["input_size"] <= 0:
        raise SpecError(f"{where}: 'input_size' must be a positive integer, got {spec['input_size']!r}")
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


