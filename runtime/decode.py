"""Network outputs -> points, chosen from a bundle's description, in one place.

A bundle's meta.json lists its outputs (runtime.bundle.OutputSpec); `decoder_for` picks the
decoder of an output's kind from DECODERS, and `Landmarker` ties a bundle, an engine and one
output's decoder together. Training evaluation, export parity, INT8 drift, the benchmark and the
device pipeline all run models through `Landmarker`, so they decode exactly alike.

    lm = Landmarker.open("artifacts/pfld68_w05/onnx_int8")       # engine from meta.json
    y = lm(x)                          # NCHW float batch -> (N, 2K) crop-normalised x,y
    pts = lm.points(image_bgr, boxes)  # face boxes -> (N, K, 2) image pixels
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleMeta, OutputSpec
from .engines import Engine, load_bundle
from .schemes import get_scheme


class PointsDecoder:
    """Direct regression: 2K values a face -> crop-normalised [0, 1] x0 y0 x1 y1 ...

    Converts the output's units ("normalised", "pixels" of the input crop, "signed" [-1, 1]
    about the centre) and order ("xyxy" or all x then all y)."""
    kind = "points"

    def __init__(self, out: OutputSpec, input_size: int):
        self.k = out.num_points
        self.scale, self.offset = {"normalised": (1.0, 0.0), "pixels": (1.0 / input_size, 0.0),
                                   "signed": (0.5, 0.5)}[out.units]
        self.xxyy = out.order == "xxyy"
        self.identity = self.scale == 1.0 and self.offset == 0.0 and not self.xxyy

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        y = np.asarray(raw, np.float32).reshape(len(raw), -1)
        if y.shape[1] != 2 * self.k:
            raise ValueError(f"model output has {y.shape[1]} values per face, expected "
                             f"{2 * self.k} ({self.k} points); check the bundle's meta.json/spec")
        if self.identity:
            return y
        if self.xxyy:
            y = y.reshape(len(y), 2, self.k).transpose(0, 2, 1).reshape(len(y), -1)
        return y * self.scale + self.offset


DECODERS = {PointsDecoder.kind: PointsDecoder}


def decoder_for(out: OutputSpec, input_size: int):
    return DECODERS[out.kind](out, input_size)


class Landmarker:
    """A bundle's model with one of its outputs decoded to points.

    `output` picks the output by scheme name, output name or point count (None: the first);
    `engine_obj` lets a caller pass an engine it built itself (e.g. the benchmark's reference).
    """

    def __init__(self, meta: BundleMeta, engine: Engine, output: str | int | None = None):
        self.meta, self.engine = meta, engine
        self.pre = meta.preprocess
        self.out = meta.output(output)
        self.scheme = get_scheme(self.out.scheme)
        self.decode = decoder_for(self.out, self.pre.input_size)
        self.nhwc = meta.input.layout == "NHWC" and not engine.handles_layout

    @classmethod
    def open(cls, bundle: str | Path, engine: str | None = None, threads: int = 1,
             device: str | None = None, precision: str | None = None, verify: bool = True,
             output: str | int | None = None) -> "Landmarker":
        meta, eng = load_bundle(bundle, engine, threads, device, precision, verify)
        return cls(meta, eng, output)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 batch -> (N, 2K) crop-normalised x,y pairs of the chosen output."""
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if self.nhwc else x
        return self.decode(self.engine.run(x)[self.out.index])

    def points(self, image: np.ndarray, boxes) -> np.ndarray:
        """Face boxes of one BGR image -> (N, K, 2) points in image pixels."""
        batch, mats = self.pre(image, boxes)
        return self.pre.decode(self(batch), mats)
