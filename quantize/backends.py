"""INT8 post-training quantizers, one small class per backend, behind one registry BACKENDS
(what the CLI offers and what the tests parametrize over). The base (Backend, Options, Layer,
PRESETS) and what each backend does are described in quantize/backend_base.py; the backends
live in quantize/backend_onnxruntime.py and quantize/backend_nncf_litert.py.
"""
from __future__ import annotations

from quantize.backend_base import BIAS_CORRECTION, PRESETS, Backend, Layer, Options, QuantizeError, quiet
from quantize.backend_nncf_litert import LiteRTQuantizer, NNCFQuantizer, _tflite_label
from quantize.backend_onnxruntime import OnnxRuntimeQuantizer

__all__ = ["BACKENDS", "BIAS_CORRECTION", "PRESETS", "Backend", "Layer", "LiteRTQuantizer",
           "NNCFQuantizer", "OnnxRuntimeQuantizer", "Options", "QuantizeError", "_tflite_label",
           "get_backend", "quiet"]


BACKENDS: dict[str, type[Backend]] = {
    OnnxRuntimeQuantizer.name: OnnxRuntimeQuantizer,
    NNCFQuantizer.name: NNCFQuantizer,
    LiteRTQuantizer.name: LiteRTQuantizer,
}


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise QuantizeError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)} or all")
    return BACKENDS[name]
