"""Writing a bundle's description into its model file, in the format's own metadata (the
reading side, which a device needs, is runtime/embedded.py). Writing needs the onnx package
(and ai-edge-litert's flatbuffer tools for TFLite), which a device does not have, so it lives
here and is registered with runtime.bundle at import: every stage that writes bundles imports
`common`, and BundleMeta.write / DetectorMeta.write refuse to write a model file without it.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from runtime.bundle import atomic_write_bytes, set_embedder
from runtime.embedded import KEY, EmbeddedError, description


def embed(path: str | Path, meta: dict) -> None:
    """Write `description(meta)` into the model file at `path` (by suffix), atomically; an
    older description is replaced."""
    path = Path(path)
    text = json.dumps(description(meta), sort_keys=True)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx
        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError & co
            raise EmbeddedError(f"{path} is not an ONNX model: {e}") from None
        props = [p for p in m.metadata_props if p.key != KEY]
        del m.metadata_props[:]
        m.metadata_props.extend(props)
        m.metadata_props.add(key=KEY, value=text)
        atomic_write_bytes(path, m.SerializeToString())
    elif suffix == ".xml":
        try:
            net = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise EmbeddedError(f"{path} is not an OpenVINO IR: {e}") from None
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
        try:
            model = fu.read_model_from_bytearray(bytearray(path.read_bytes()))
        except Exception as e:  # noqa: BLE001 - flatbuffers raise anything on bad bytes
            raise EmbeddedError(f"{path} is not a TFLite model: {e}") from None
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


set_embedder(embed)
