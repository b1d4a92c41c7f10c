"""A bundle's description inside its model file, in that format's own metadata, so a bare
.onnx, .xml or .tflite runs correctly without its meta.json:

- ONNX: `metadata_props` key KEY (onnxruntime: session.get_modelmeta().custom_metadata_map);
- OpenVINO IR: `rt_info` entry KEY (openvino: model.get_rt_info([KEY]));
- TFLite: a model `metadata` entry named KEY whose buffer holds the text.

The text is meta.json without "files" (a file cannot hold its own sha256) and "validation"
(measured after the file is written): preprocessing, input, outputs, precision, engine,
lineage. meta.json stays the source of truth; BundleMeta.write embeds the same description
every time it writes, and tests/test_embedded.py checks that the two agree.

    read_embedded(path) -> dict | None     # here: what a device needs, no onnx package
    common.embed.embed(path, description)  # writing (export, quantize), registered with
                                           # runtime.bundle.set_embedder
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from runtime.errors import LandmarkError

KEY = "landmark_bundle_meta"
LEFT_OUT = ("files", "validation")


class EmbeddedError(LandmarkError):
    """A model file's embedded description cannot be written or read."""


def description(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in LEFT_OUT}


def bare_meta(path: Path, detector: bool) -> dict:
    """The meta.json dict of a bare model file, from its embedded description, with the file
    itself as its only (unhashed) file; BundleError when it carries none of that kind."""
    from runtime.bundle import META, BundleError
    try:
        desc = read_embedded(path)
    except EmbeddedError as e:
        raise BundleError(str(e)) from None
    if desc is None:
        raise BundleError(f"{path} carries no bundle description in its metadata (not written "
                          "by this project's export/quantize?); give its bundle folder with "
                          f"{META}, or import it: export/run.py --import")
    if (desc.get("kind") == "detector") != detector:
        raise BundleError(f"{path} is a face detector, not a landmark model: give it to "
                          "--detector-model" if not detector else
                          f"{path} is a landmark model, not a face detector: give it to --model")
    return dict(desc, files={path.name: {"sha256": "", "bytes": 0}})


def _name(n) -> str:
    return n.decode() if isinstance(n, bytes) else str(n)


def read_embedded(path: str | Path) -> dict | None:
    """The description embedded in a model file, or None when it holds none. Reads with the
    format's own light parser (onnx if installed, else onnxruntime; ElementTree; the TFLite
    flatbuffer schema), so a device needs only its engine."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddedError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    text = None
    try:
        if suffix == ".onnx":
            text = _onnx_text(path)
        elif suffix == ".xml":
            rt = ET.parse(path).getroot().find("rt_info")
            node = None if rt is None else rt.find(KEY)
            text = None if node is None else node.get("value")
        elif suffix == ".tflite":
            text = _tflite_text(path)
        else:
            raise EmbeddedError(f"{path}: a bare model file must be .onnx, .xml or .tflite")
    except (ET.ParseError, UnicodeDecodeError) as e:
        raise EmbeddedError(f"{path} cannot be read as a {suffix} model: {e}") from None
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise EmbeddedError(f"{path}: the embedded {KEY} is not valid JSON: {e}") from None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message, top level only."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        yield num, wire, v


def _onnx_text(path: Path) -> str | None:
    """ModelProto.metadata_props (field 14: StringStringEntryProto key 1, value 2), read
    straight from the protobuf wire format: no onnx package needed on a device."""
    try:
        for num, wire, v in _fields(path.read_bytes()):
            if num == 14 and wire == 2:
                entry = {n: val for n, w, val in _fields(v) if w == 2}
                if entry.get(1, b"").decode("utf-8") == KEY:
                    return entry.get(2, b"").decode("utf-8")
    except (IndexError, ValueError) as e:
        raise EmbeddedError(f"{path} is not an ONNX model: {e}") from None
    return None


def _tflite_text(path: Path) -> str | None:
    try:
        from ai_edge_litert import schema_py_generated as fb
    except ImportError:
        raise EmbeddedError(f"{path}: reading a bare .tflite file's description needs the "
                            "package ai-edge-litert; or give the bundle folder") from None
    data = path.read_bytes()
    try:
        model = fb.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            if _name(md.Name()) == KEY:
                buf = model.Buffers(md.Buffer())
                if buf.Offset():        # stored after the flatbuffer (models over 2 GB)
                    return data[buf.Offset():buf.Offset() + buf.Size()].decode("utf-8")
                return buf.DataAsNumpy().tobytes().decode("utf-8")
    except (IndexError, ValueError, TypeError, AttributeError) as e:
        raise EmbeddedError(f"{path} is not a TFLite model: {e}") from None
    return None
