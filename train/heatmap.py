"""The heatmap family: subpixel heatmap regression (Bulat et al., "Subpixel Heatmap Regression
for Facial Landmark Localization", 2021) on the PFLD MobileNetV2 backbone.

- `HeatmapPFLD`: PFLD's stem and inverted-residual blocks (28 x 28 and 14 x 14 features at the
  112 input), the 14 x 14 features upsampled and joined with the 28 x 28 ones, a depthwise
  separable 3 x 3 conv and a 1 x 1 conv to one heatmap a point at 1/4 of the input (28 x 28).
- Targets (`heatmap_targets`): a Gaussian per point centred at the exact scaled location
  ("continuous", the paper's encoding) or at it rounded to a heatmap pixel (the baseline); the
  same convention as runtime.decode.encode_heatmaps (pixel (i, j) centred at ((j+.5)s, (i+.5)s)).
- Loss: pixel-wise L2 on the heatmaps, per point weighted, masked per face.
- Siamese consistency (`siamese_loss`): two random augmentations of the same face go through the
  network, each predicted heatmap set is warped back to the face's canonical crop by the inverse
  of its augmentation, the two are averaged and compared with the canonical target.
Decoding is the runtime's (runtime.decode.HeatmapDecoder, numpy): training evaluation, export
parity, INT8 drift, the benchmark and the device all use that one implementation.

This module registers the "heatmap" model family (train/family.py): one head, decoder settings
("decoder", "window") an evaluation may override.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.decode import HEATMAP_SIGMA, HEATMAP_TAU
from runtime.errors import ConfigError
from runtime.schemes import get_scheme
from train.family import Family, register_family
from train.model import InvertedResidual, _ch, conv_bn, load_partial

STRIDE = 4
ENCODINGS = ("continuous", "rounded")


class HeatmapPFLD(nn.Module):
    family = "heatmap"

    def __init__(self, num_points: int = 68, width: float = 0.5, input_size: int = 112,
                 sigma: float = HEATMAP_SIGMA, encoding: str = "continuous",
                 decoder: str = "local_soft_argmax", window: int = 5, tau: float = HEATMAP_TAU):
        super().__init__()
        if input_size % (2 * STRIDE):
            raise ConfigError(f"input size {input_size} is not a multiple of {2 * STRIDE}")
        if encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        self.num_points, self.width, self.input_size = num_points, width, input_size
        self.sigma, self.encoding = sigma, encoding
        self.decoder, self.window, self.tau = decoder, window, tau
        self.head_points = None
        c64, c128 = _ch(64, width), _ch(128, width)
        self.stem = nn.Sequential(conv_bn(3, c64, 3, 2), conv_bn(c64, c64, 3, 1, groups=c64))
        self.block4 = nn.Sequential(InvertedResidual(c64, c64, 2, 2),
                                    *[InvertedResidual(c64, c64, 1, 2) for _ in range(4)])  # 28x28
        self.block5 = nn.Sequential(InvertedResidual(c64, c128, 2, 2),
                                    *[InvertedResidual(c128, c128, 1, 4) for _ in range(6)])  # 14x14
        self.fuse = conv_bn(c64 + c128, c64, 1, 1)
        self.refine = nn.Sequential(conv_bn(c64, c64, 3, 1, groups=c64), conv_bn(c64, c64, 1, 1))
        self.out = nn.Conv2d(c64, num_points, 1)

    @property
    def size(self) -> int:
        return self.input_size // STRIDE

    def forward(self, x: torch.Tensor, with_pose: bool = False):
        f4 = self.block4(self.stem(x))
        f5 = self.block5(f4)
        up = F.interpolate(f5, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        h = self.out(self.refine(self.fuse(torch.cat([f4, up], 1))))
        return (h, None) if with_pose else h

    def forward_heads(self, x: torch.Tensor, with_pose: bool = False):
        out = self.forward(x, with_pose)
        return ({"heatmaps": out[0]}, None) if with_pose else {"heatmaps": out}

    @property
    def arch(self) -> dict:
        return {"family": self.family, "num_points": self.num_points, "width": self.width,
                "input_size": self.input_size, "stride": STRIDE, "sigma": self.sigma,
                "encoding": self.encoding, "decoder": self.decoder, "window": self.window,
                "tau": self.tau}

    def output_params(self) -> dict:
        """What a bundle's OutputSpec.params says about this output (runtime.decode)."""
        return {"stride": STRIDE, "decoder": self.decoder, "window": self.window, "tau": self.tau,
                "sigma": self.sigma, "encoding": self.encoding}


def build_heatmap(arch: dict) -> HeatmapPFLD:
    return HeatmapPFLD(int(arch["num_points"]), float(arch["width"]),
                       int(arch.get("input_size", 112)), float(arch.get("sigma", HEATMAP_SIGMA)),
                       arch.get("encoding", "continuous"), arch.get("decoder", "local_soft_argmax"),
                       int(arch.get("window", 5)), float(arch.get("tau", HEATMAP_TAU)))


def output_names(arch: dict) -> list[str]:
    return ["heatmaps"]


def describe_outputs(arch: dict, scheme: str, model: HeatmapPFLD | None = None) -> list:
    """One "heatmaps" output of the checkpoint's scheme, with the decoder's settings."""
    from runtime.bundle import OutputSpec
    params = (model if model is not None else build_heatmap(arch)).output_params()
    return [OutputSpec(output_names(arch)[0], "heatmaps", scheme, params=params)]


def build_for_training(cfg, heads: list[str]) -> HeatmapPFLD:
    """The heatmap network of a training run (cfg: train.engine.TrainConfig, one head), from
    --init weights when given (the tensors that fit, e.g. a PFLD's backbone)."""
    from train.checkpoint import Checkpoint
    model = HeatmapPFLD(get_scheme(heads[0]).num_points, cfg.width,
                        encoding=cfg.hm_encoding, decoder=cfg.hm_decoder,
                        window=cfg.hm_window)
    if cfg.init:
        init = Checkpoint.load(cfg.init)
        fresh = load_partial(model, init.weights)
        print(f"--init {cfg.init}: left at their initial values: {', '.join(fresh) or 'none'}",
              flush=True)
    return model


def heatmap_targets(points: torch.Tensor, size: int, sigma: float,
                    continuous: bool = True) -> torch.Tensor:
    """(N, K, 2) crop-pixel points -> (N, K, size, size) Gaussians with peak 1."""
    c = points / STRIDE - 0.5
    if not continuous:
        c = torch.round(c)
    g = torch.arange(size, dtype=points.dtype, device=points.device)
    gx = torch.exp(-(g - c[..., :1]) ** 2 / (2 * sigma ** 2))            # (N, K, W)
    gy = torch.exp(-(g - c[..., 1:]) ** 2 / (2 * sigma ** 2))            # (N, K, H)
    return gy[..., :, None] * gx[..., None, :]


def heatmap_loss(pred: torch.Tensor, points: torch.Tensor, weights: torch.Tensor,
                 sigma: float, continuous: bool) -> torch.Tensor:
    """Pixel-wise L2 between predicted heatmaps and the targets of `points` (N, K, 2, crop px),
    each point's map weighted by `weights` (N, K)."""
    t = heatmap_targets(points, pred.shape[-1], sigma, continuous)
    per_point = (pred - t).square().mean((-1, -2))                      # (N, K)
    w = weights / weights.mean(1, keepdim=True).clamp_min(1e-6)
    return (per_point * w).mean() * 100.0     # x100: the map is mostly zeros


def batch_loss(cfg, model, heads: list[str], x, targets, pose=None, attrs=None):
    """The heatmap loss of a batch (its one head; no pose branch): (loss, 0.0)."""
    pred = model(x.to(memory_format=torch.channels_last))
    y, mask, pw = targets[heads[0]]
    pts = y.reshape(len(y), -1, 2) * x.shape[-1]
    loss = heatmap_loss(pred[mask], pts[mask], pw[mask], model.sigma,
                        cfg.hm_encoding == "continuous")
    return loss, 0.0


def warp_to_canonical(h: torch.Tensor, to_canonical: torch.Tensor) -> torch.Tensor:
    """Resample heatmaps (N, K, S, S) of augmented crops into the canonical crop's heatmap grid.
    to_canonical: (N, 2, 3) affine taking augmented-crop pixels to canonical-crop pixels."""
    n, _, s, _ = h.shape
    a = torch.cat([to_canonical, torch.tensor([0.0, 0.0, 1.0]).expand(n, 1, 3)], 1)
    inv = torch.linalg.inv(a)[:, :2]                    # canonical crop px -> augmented crop px
    # grid_sample(align_corners=False): normalised x = 2 * px / (S * STRIDE) - 1 in both grids
    scale = 2.0 / (s * STRIDE)
    lin = inv[:, :, :2]
    # canonical normalised u -> canonical px (u + 1) / scale -> augmented px -> normalised
    theta = torch.cat([lin, (lin.sum(-1, keepdim=True) / scale + inv[:, :, 2:]) * scale - 1.0], -1)
    grid = F.affine_grid(theta, list(h.shape), align_corners=False)
    return F.grid_sample(h, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_canonical_points(h: torch.Tensor, to_canonical: torch.Tensor,
                        mirror: tuple[int, ...] | None) -> torch.Tensor:
    """Heatmaps of an augmented crop in the canonical crop's grid AND point order: a flipped
    crop's channel k holds point mirror[k] (augmentation re-indexes points on a flip), so after
    the spatial warp-back its channels are re-indexed with the scheme's mirror table."""
    back = warp_to_canonical(h, to_canonical)
    if mirror is None:
        return back
    flipped = torch.linalg.det(to_canonical[:, :, :2]) < 0                # (N,)
    if not bool(flipped.any()):
        return back
    inv = torch.argsort(torch.as_tensor(mirror))          # channel holding each point
    return torch.where(flipped[:, None, None, None], back[:, inv], back)


def siamese_loss(pred0: torch.Tensor, pred1: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor,
                 canonical_points: torch.Tensor, weights: torch.Tensor, sigma: float,
                 continuous: bool, mirror: tuple[int, ...] | None = None) -> torch.Tensor:
    """The two predictions warped back to the canonical crop (and, for a flipped view, put back
    in the canonical point order with `mirror`), averaged, against its target."""
    mean = (to_canonical_points(pred0, m0, mirror) + to_canonical_points(pred1, m1, mirror)) / 2
    return heatmap_loss(mean, canonical_points, weights, sigma, continuous)


def to_numpy_decoder(model: HeatmapPFLD):
    """The runtime's decoder for this model's output (numpy), as training evaluation uses it."""
    from runtime.decode import HeatmapDecoder
    scheme = {68: "300w68", 98: "wflw98"}[model.num_points]
    return HeatmapDecoder(describe_outputs(model.arch, scheme, model)[0], model.input_size)


def canonical_matrix(points: np.ndarray, size: int, scale: float = 1.25) -> np.ndarray:
    """The canonical crop of a face: its landmark extent x `scale`, upright, `size` px."""
    from runtime.preprocess import landmark_box
    x0, y0, x1, y1 = landmark_box(points)
    side = max(x1 - x0, y1 - y0) * scale
    s = size / side
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[s, 0, size / 2 - cx * s], [0, s, size / 2 - cy * s]], np.float64)


FAMILY = register_family(Family(
    name=HeatmapPFLD.family, summary="subpixel heatmap regression (train/heatmap.py)",
    build=build_heatmap, output_names=output_names, named_heads=lambda arch: [],
    describe_outputs=describe_outputs, build_for_training=build_for_training, loss=batch_loss,
    decoder=to_numpy_decoder, multi_head=False, decoder_settings=("decoder", "window")))
