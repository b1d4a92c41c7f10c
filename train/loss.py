"""Landmark losses: PFLD (pose- and attribute-weighted squared L2), L1, L2 and Wing.

All take predictions and targets as (N, 2K) crop-normalised coordinates; l1, l2 and wing
also take optional per-point weights (N, K) (e.g. from a teacher's disagreement), which scale
each point's term and are normalised so that all-ones weights give the unweighted loss.
"""
from __future__ import annotations

import math

import torch


def _weighted(per_coord: torch.Tensor, weights) -> torch.Tensor:
    """(N, 2K) per-coordinate terms -> (N,) per-face sums, each point scaled by its weight."""
    if weights is None:
        return per_coord.sum(1)
    w = weights.repeat_interleave(2, dim=1)
    return (per_coord * w).sum(1) * (w.shape[1] / w.sum(1).clamp_min(1e-6))


def l2(pred, target, weights=None, **_):
    return _weighted((pred - target).square(), weights).mean()


def l1(pred, target, weights=None, **_):
    return _weighted((pred - target).abs(), weights).mean()


def wing(pred, target, w: float = 10.0, eps: float = 2.0, unit: float = 112.0, weights=None, **_):
    """Wing loss (Feng et al., CVPR 2018) on coordinates in pixels of a `unit`-pixel crop."""
    d = (pred - target).abs() * unit
    c = w - w * math.log(1 + w / eps)
    per = torch.where(d < w, w * torch.log1p(d / eps), d - c)
    return (_weighted(per, weights) / per.shape[1]).mean()


def pfld(pred, target, pose_pred=None, pose_target=None, attributes=None, **_):
    """PFLD loss: sum_c w_c x sum_{yaw,pitch,roll} (1 - cos(angle error)) x ||d||^2.

    w_c is the inverse frequency in the batch of each attribute class a sample belongs to
    ("normal" for a sample with no attribute flag), so rare conditions weigh more.
    Angles are in radians.
    """
    n = pred.shape[0]
    if attributes is None:
        attributes = torch.zeros(n, 6, device=pred.device)
    normal = (attributes.sum(1, keepdim=True) == 0).float()
    classes = torch.cat([normal, attributes.float()], 1)                 # (N, 7)
    freq = classes.mean(0)
    w_class = torch.where(freq > 0, 1.0 / freq.clamp_min(1e-6), torch.zeros_like(freq))
    w_attr = (classes * w_class).sum(1)
    w_angle = (1 - torch.cos(pose_pred - pose_target)).sum(1)
    sq = (pred - target).square().sum(1)
    return (w_attr * w_angle * sq).mean()


LOSSES = {"wing": wing, "l2": l2, "l1": l1, "pfld": pfld}
