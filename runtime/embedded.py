"""A bundle's description inside its model file, in that format's own metadata, so a bare
.onnx, .xml or .tflite runs correctly without its meta.json:

- ONNX: `metadata_props` key KEY (onnxruntime: session.get_modelmeta().custom_metadata_map);
- OpenVINO IR: `rt_info` entry KEY (openvino: model.get_rt_info([KEY]));
- TFLite: a model `metadata` entry named KEY whose buffer holds the text.

The text is meta.json without "files" (a file cannot hold its own sha256) and "validation"
(measured after the file is written): preprocessing, input, outputs, precision, engine,
lineage. meta.json stays the source of truth; BundleMeta.write embeds the same description
every time it writes, and tests/test_embedded.py checks that the two agree.

    embed(path, description)          # in place, atomically
    read_embedded(path) -> dict | None
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


def embed(path: str | Path, meta: dict) -> None:
    """Write `description(meta)` into the model file at `path` (by suffix)."""
    from runtime.bundle import atomic_write_bytes
    path = Path(path)
    text = json.dumps(description(meta), sort_keys=True)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx
        m = onnx.load(str(path), load_external_data=False)
        props = [p for p in m.metadata_props if p.key != KEY]
        del m.metadata_props[:]
        m.metadata_props.extend(props)
        m.metadata_props.add(key=KEY, value=text)
        atomic_write_bytes(path, m.SerializeToString())
    elif suffix == ".xml":
        tree = ET.parse(path)
        net = tree.getroot()
        rt = net.find("rt_info")
        if rt is None:
            rt = ET.SubElement(net, "rt_info")
        for old in rt.findall(KEY):
            rt.remove(old)
        ET.SubElement(rt, KEY, {"value": text})
        atomic_write_bytes(path, ET.tostring(net, encoding="utf-8", xml_declaration=True))
    elif suffix == ".tflite":
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools import flatbuffer_utils as fu
        # read_model_from_bytearray also brings buffers stored after the flatbuffer (litert-torch
        # writes weights that way) back inside it, so the re-packed file holds them
        model = fu.read_model_from_bytearray(bytearray(path.read_bytes()))
        model.metadata = [m for m in (model.metadata or []) if _name(m.name) != KEY]
        buf = fb.BufferT()
        buf.data = list(text.encode("utf-8"))
        model.buffers.append(buf)
        md = fb.MetadataT()
        md.name, md.buffer = KEY, len(model.buffers) - 1
        model.metadata.append(md)
        atomic_write_bytes(path, bytes(fu.convert_object_to_bytearray(model)))
    else:
        raise EmbeddedError(f"{path}: cannot embed a description in a {suffix} file "
                            "(.onnx, .xml or .tflite)")


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


def _onnx_text(path: Path) -> str | None:
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError & co
            raise EmbeddedError(f"{path} is not an ONNX model: {e}") from None
        return next((p.value for p in m.metadata_props if p.key == KEY), None)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.get_modelmeta().custom_metadata_map.get(KEY)


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
