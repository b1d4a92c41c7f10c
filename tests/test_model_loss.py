"""PFLD network shapes, losses and metrics, checked against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.loss import LOSSES, l1, l2, pfld, wing
from evaluation.metrics import fr_auc, nme_per_face, summarize
from train.model import PFLD, count_params


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("points", [68, 98])
def test_pfld_shapes(width, points):
    m = PFLD(points, width).eval()
    x = torch.randn(2, 3, 112, 112)
    assert m(x).shape == (2, 2 * points)
    pts, pose = m(x, with_pose=True)
    assert pts.shape == (2, 2 * points) and pose.shape == (2, 3)
    assert count_params(m) < count_params(m, inference_only=False)   # aux is training-only


def test_width_scales_parameters():
    p = [count_params(PFLD(68, w)) for w in (0.25, 0.5, 1.0)]
    assert p[0] < p[1] < p[2]
    assert 1.1e6 < p[2] < 1.4e6      # PFLD 1.0x is about 1.2 M parameters


def test_simple_losses_by_hand():
    pred = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    tgt = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert math.isclose(l2(pred, tgt).item(), 0.01 + 0.04 + 0.09 + 0.16, rel_tol=1e-6)
    assert math.isclose(l1(pred, tgt).item(), 1.0, rel_tol=1e-6)
    # wing: w*ln(1+d/eps) below w pixels, linear above, continuous at w
    d = torch.tensor([[5 / 112, 20 / 112]])
    v = wing(d, torch.zeros_like(d)).item()
    c = 10 - 10 * math.log(1 + 10 / 2)
    assert math.isclose(v, (10 * math.log(1 + 5 / 2) + (20 - c)) / 2, rel_tol=1e-5)
    lo = wing(torch.tensor([[10 / 112 - 1e-6]]), torch.zeros(1, 1)).item()
    hi = wing(torch.tensor([[10 / 112 + 1e-6]]), torch.zeros(1, 1)).item()
    assert abs(lo - hi) < 1e-3


def test_pfld_loss_weights():
    pred = torch.tensor([[0.2, 0.0], [0.2, 0.0]])
    tgt = torch.zeros(2, 2)
    pose_t = torch.zeros(2, 3)
    pose_p = torch.tensor([[0.1, 0.0, 0.0], [0.1, 0.0, 0.0]])
    attrs = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    # classes: sample 0 in "pose" (frequency 1/2), sample 1 "normal" (1/2): both weigh 2
    want = 2 * (1 - math.cos(0.1)) * 0.04
    assert math.isclose(pfld(pred, tgt, pose_p, pose_t, attrs).item(), want, rel_tol=1e-5)
    # a rarer class weighs more: 3 normal faces and one posed face
    pred4, tgt4 = pred.repeat(2, 1), tgt.repeat(2, 1)
    attrs4 = torch.zeros(4, 6)
    attrs4[0, 0] = 1
    per = pfld(pred4[:1], tgt4[:1], pose_p[:1], pose_t[:1], attrs4[:1]).item()
    allf = pfld(pred4, tgt4, pose_p.repeat(2, 1), pose_t.repeat(2, 1), attrs4).item()
    assert math.isclose(allf, (4 + 3 * 4 / 3) / 4 * (1 - math.cos(0.1)) * 0.04, rel_tol=1e-5)
    assert per > 0
    # no pose error -> zero weight -> zero loss (the PFLD formulation, as published)
    assert pfld(pred, tgt, pose_t, pose_t, attrs).item() == 0
    assert set(LOSSES) == {"pfld", "wing", "l1", "l2"}


def test_losses_train_a_step():
    torch.manual_seed(0)
    m = PFLD(68, 0.25)
    x = torch.randn(4, 3, 112, 112)
    y = torch.rand(4, 136)
    for name, fn in LOSSES.items():
        pts, pose = m(x, with_pose=True)
        loss = fn(pts, y, pose_pred=pose, pose_target=torch.rand(4, 3), attributes=torch.zeros(4, 6))
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0, name


def test_nme_fr_auc_by_hand():
    gt = np.zeros((2, 68, 2))
    gt[:, 36] = [0, 0]
    gt[:, 45] = [100, 0]
    pred = gt.copy()
    pred[0] += [5, 0]          # every point off by 5 px: NME 0.05
    pred[1] += [0, 20]         # 0.20: a failure at 0.10
    nme = nme_per_face(pred, gt, (36, 45))
    np.testing.assert_allclose(nme, [0.05, 0.20])
    fr, auc = fr_auc(nme)
    assert fr == 0.5
    assert math.isclose(auc, 0.5 * 0.5, abs_tol=2e-3)   # half the faces, from 0.05 to 0.10
    s = summarize(nme, np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]))
    assert s["subsets"]["pose"]["nme"] == pytest.approx(0.05)
    assert s["subsets"]["blur"]["nme"] == pytest.approx(0.20)
    assert fr_auc(np.zeros(5)) == (0.0, pytest.approx(1.0))
