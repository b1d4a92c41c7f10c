"""Activation ranges that minimise the quantization error of each tensor ("histogram" method).

    ranges = {"conv1_out": (lo, hi), ...}            # min/max over the calibration faces
    hists = Histograms(ranges)
    for values in per_face_tensors:                   # {tensor name: array} of one face
        hists.add(values)
    better = hists.ranges()                           # {"conv1_out": (lo', hi'), ...}

For every tensor a histogram of its calibration values (2048 bins over its min/max), then the
range [a, b] (a <= 0 <= b, as 8-bit zero points need) with the smallest expected squared error
of 8-bit uniform quantization: rounding inside the range (step^2 / 12 per value, step
(b - a) / 255) plus clipping outside it. This is the objective of the histogram observers of
the anchors (PyTorch's HistogramObserver, which NNCF's HISTOGRAM range estimator
reimplements); quantize.backends uses it where the tool has no such estimator (onnxruntime's
quantize_static, ai-edge-quantizer) and NNCF's own for OpenVINO.

Why not min/max: the rare large values of a long-tailed activation set the step for all the
others; the histogram range weighs their clipping error against everyone's rounding error, and
keeps the whole range where the tail carries more of the error (a lone far outlier is kept: its
squared clipping error outweighs the rounding it would save). Why not a fixed percentile: it
clips regardless of what the clipping costs (onnxruntime's 99.999 % percentile drifted more than
the histogram ranges on the shipped student; see docs/quantization.md).
"""
from __future__ import annotations

import numpy as np

BINS = 2048
LEVELS = 255          # 8-bit
GRID = 96             # candidate bounds per side


class Histograms:
    """Per-tensor histograms over fixed (min, max) ranges, filled face by face."""

    def __init__(self, ranges: dict[str, tuple[float, float]], bins: int = BINS):
        self.bounds = {t: (float(lo), float(hi)) for t, (lo, hi) in ranges.items()}
        self.bins = bins
        self.counts = {t: np.zeros(bins, np.int64) for t in self.bounds}

    def add(self, values: dict[str, np.ndarray]) -> None:
        for t, v in values.items():
            lo, hi = self.bounds.get(t, (0.0, 0.0))
            if hi > lo:
                self.counts[t] += np.histogram(np.asarray(v, np.float32), self.bins, (lo, hi))[0]

    def ranges(self, levels: int = LEVELS) -> dict[str, tuple[float, float]]:
        return {t: best_range(self.counts[t], lo, hi, levels) for t, (lo, hi) in self.bounds.items()}


def best_range(counts: np.ndarray, lo: float, hi: float, levels: int = LEVELS,
               grid: int = GRID) -> tuple[float, float]:
    """The [a, b] (a <= 0 <= b) with the least rounding + clipping squared error over a
    histogram of `counts` on [lo, hi]; (lo, hi) itself when nothing is better."""
    if not hi > lo or counts.sum() == 0:
        return lo, hi
    n = counts.astype(np.float64)
    edges = np.linspace(lo, hi, len(n) + 1)
    c = (edges[:-1] + edges[1:]) / 2
    # candidates: the full bound and `grid` cut points towards zero, per side
    highs = np.unique(np.r_[hi, np.linspace(max(lo, 0.0), hi, grid + 1)[1:]]) if hi > 0 else np.r_[0.0]
    lows = np.unique(np.r_[lo, np.linspace(lo, min(hi, 0.0), grid + 1)[:-1]]) if lo < 0 else np.r_[0.0]
    lows, highs = np.minimum(lows, 0.0), np.maximum(highs, 0.0)
    # suffix/prefix sums of n, n*c, n*c^2 give each candidate's clipping error in O(1)
    s0, s1, s2 = np.cumsum(n), np.cumsum(n * c), np.cumsum(n * c * c)

    def below(x):      # sum over bins with centre < x of n*(c - x)^2, and their count
        i = np.searchsorted(c, x, side="left")
        k = np.maximum(i - 1, 0)
        m0 = np.where(i > 0, s0[k], 0.0)
        m1 = np.where(i > 0, s1[k], 0.0)
        m2 = np.where(i > 0, s2[k], 0.0)
        return m2 - 2 * x * m1 + x * x * m0, m0

    def above(x):      # the same over bins with centre > x
        i = np.searchsorted(c, x, side="right")
        k = np.maximum(i - 1, 0)
        m0 = s0[-1] - np.where(i > 0, s0[k], 0.0)
        m1 = s1[-1] - np.where(i > 0, s1[k], 0.0)
        m2 = s2[-1] - np.where(i > 0, s2[k], 0.0)
        return m2 - 2 * x * m1 + x * x * m0, m0

    clip_lo, out_lo = below(lows)            # (L,)
    clip_hi, out_hi = above(highs)           # (H,)
    step = (highs[None, :] - lows[:, None]) / levels
    inside = s0[-1] - out_lo[:, None] - out_hi[None, :]
    err = inside * step * step / 12 + clip_lo[:, None] + clip_hi[None, :]
    err = np.where(step > 0, err, np.inf)
    i, j = np.unravel_index(np.argmin(err), err.shape)
    return float(lows[i]), float(highs[j])
