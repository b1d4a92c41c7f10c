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
from runtime.errors import ConfigError


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
            raise ConfigError(f"model output has {y.shape[1]} values per face, expected "
                             f"{2 * self.k} ({self.k} points); check the bundle's meta.json/spec")
        if self.identity:
            return y
        if self.xxyy:
            y = y.reshape(len(y), 2, self.k).transpose(0, 2, 1).reshape(len(y), -1)
        return y * self.scale + self.offset


class HeatmapDecoder:
    """One heatmap per point, (N, K, H, W) at `stride` pixels of the input crop per heatmap
    pixel -> crop-normalised x,y pairs and a per-point confidence.

    decoder (params["decoder"]):
      local_soft_argmax  Bulat et al. 2021: the argmax, then softmax(tau * h) over the d x d
                         window around it; the expected offset in the window is added to the
                         argmax (d = params["window"], default 5; tau = params["tau"])
      argmax_quarter     the usual baseline: argmax + 0.25 px towards the higher neighbour
      global_soft_argmax softmax(tau * h) over the whole map, expected position
    Heatmap pixel (i, j) is centred at crop coordinate ((j + 0.5) * stride, (i + 0.5) * stride)
    (encode_heatmaps uses the same convention). Confidence: the heatmap's peak value.
    """
    kind = "heatmaps"

    def __init__(self, out: OutputSpec, input_size: int):
        p = out.params
        self.k, self.n = out.num_points, input_size
        self.stride = float(p.get("stride", 4))
        self.decoder = p.get("decoder", "local_soft_argmax")
        if self.decoder not in HEATMAP_DECODERS:
            raise ConfigError(f"heatmap decoder {self.decoder!r} is not one of "
                             f"{', '.join(HEATMAP_DECODERS)}")
        self.window, self.tau = int(p.get("window", 5)), float(p.get("tau", HEATMAP_TAU))
        self.confidence: np.ndarray | None = None    # (N, K) of the last call

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        h = np.asarray(raw, np.float32)
        if h.ndim != 4 or h.shape[1] != self.k:
            raise ConfigError(f"heatmap output has shape {h.shape}, expected (N, {self.k}, H, W)")
        xy, conf = decode_heatmaps(h, self.decoder, self.window, self.tau)
        self.confidence = conf
        pts = (xy + 0.5) * self.stride / self.n
        return pts.reshape(len(h), -1).astype(np.float32)


HEATMAP_DECODERS = ("local_soft_argmax", "argmax_quarter", "global_soft_argmax")
# Encoding sigma and decoding temperature chosen together on an encode -> decode round trip of
# 500 random points (28 x 28 maps, stride 4): sigma 1.5 px, 5 x 5 window, tau 8 recovers points
# to 0.013 heatmap px on average (0.018 worst); sigma 1.0 could not go below 0.045 (tau 6).
HEATMAP_SIGMA, HEATMAP_TAU = 1.5, 8.0


def decode_heatmaps(h: np.ndarray, decoder: str = "local_soft_argmax", window: int = 5,
                    tau: float = HEATMAP_TAU) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, H, W) heatmaps -> ((N, K, 2) x,y in heatmap pixels, (N, K) peak values)."""
    n, k, hh, ww = h.shape
    flat = h.reshape(n, k, -1)
    idx = flat.argmax(-1)
    peak = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    iy, ix = np.divmod(idx, ww)
    if decoder == "global_soft_argmax":
        e = np.exp(tau * (flat - flat.max(-1, keepdims=True)))
        e /= e.sum(-1, keepdims=True)
        ys, xs = np.divmod(np.arange(hh * ww), ww)
        return np.stack([(e * xs).sum(-1), (e * ys).sum(-1)], -1), peak
    if decoder == "argmax_quarter":
        x, y = ix.astype(np.float64), iy.astype(np.float64)
        get = lambda yy, xx: np.take_along_axis(flat, (np.clip(yy, 0, hh - 1) * ww   # noqa: E731
                                                       + np.clip(xx, 0, ww - 1))[..., None], -1)[..., 0]
        x += 0.25 * np.sign(get(iy, ix + 1) - get(iy, ix - 1)) * ((ix > 0) & (ix < ww - 1))
        y += 0.25 * np.sign(get(iy + 1, ix) - get(iy - 1, ix)) * ((iy > 0) & (iy < hh - 1))
        return np.stack([x, y], -1), peak
    r = window // 2
    offs = np.arange(-r, r + 1)
    yy = np.clip(iy[..., None] + offs, 0, hh - 1)                  # (N, K, d)
    xx = np.clip(ix[..., None] + offs, 0, ww - 1)
    win = np.take_along_axis(flat, (yy[..., :, None] * ww + xx[..., None, :]).reshape(n, k, -1),
                             -1).reshape(n, k, window, window)
    e = np.exp(tau * (win - win.reshape(n, k, -1).max(-1)[..., None, None]))
    e /= e.sum((-1, -2), keepdims=True)
    # expected position within the (clipped) window, in absolute heatmap coordinates
    x = (e * xx[..., None, :]).sum((-1, -2))
    y = (e * yy[..., :, None]).sum((-1, -2))
    return np.stack([x, y], -1), peak


def encode_heatmaps(points: np.ndarray, size: int, stride: float, sigma: float = HEATMAP_SIGMA,
                    continuous: bool = True) -> np.ndarray:
    """(K, 2) crop-pixel points -> (K, size, size) Gaussian heatmaps, peak 1, centred at the
    exact scaled location (continuous) or at it rounded to a heatmap pixel (the baseline)."""
    c = np.asarray(points, np.float64) / stride - 0.5
    if not continuous:
        c = np.round(c)
    g = np.arange(size, dtype=np.float64)
    gx = np.exp(-((g[None, :] - c[:, :1]) ** 2) / (2 * sigma ** 2))        # (K, W)
    gy = np.exp(-((g[None, :] - c[:, 1:]) ** 2) / (2 * sigma ** 2))        # (K, H)
    return (gy[:, :, None] * gx[:, None, :]).astype(np.float32)


DECODERS = {PointsDecoder.kind: PointsDecoder, HeatmapDecoder.kind: HeatmapDecoder}


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

    @property
    def confidence(self) -> np.ndarray | None:
        """(N, K) per-point confidence of the last call (heatmap outputs), else None."""
        return getattr(self.decode, "confidence", None)

    def points(self, image: np.ndarray, boxes) -> np.ndarray:
        """Face boxes of one BGR image -> (N, K, 2) points in image pixels."""
        batch, mats = self.pre(image, boxes)
        return self.pre.decode(self(batch), mats)
