"""Landmark losses: PFLD (pose- and attribute-weighted squared L2), L1, L2 and Wing.

All take predictions and targets as (N, 2K) crop-normalised coordinates. Every loss
returns (loss_to_minimise, plain_l2_for_logging).
"""
from __future__ import annotations

import math

import torch


def l2(pred, target, **_):
    return (pred - target).square().sum(1).mean()


def l1(pred, target, **_):
    return (pred - target).abs().sum(1).mean()


def wing(pred, target, w: float = 10.0, eps: float = 2.0, unit: float = 112.0, **_):
    """Wing loss (Feng et al., CVPR 2018) on coordinates in pixels of a `unit`-pixel crop."""
    d = (pred - target).abs() * unit
    c = w - w * math.log(1 + w / eps)
    return torch.where(d < w, w * torch.log1p(d / eps), d - c).mean(1).mean()


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
