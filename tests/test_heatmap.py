"""The heatmap family: the continuous encoding decodes back exactly (and the rounding baseline
does not), training and runtime encode alike and training evaluation decodes with the runtime's
decoder, the Siamese warp-back, a few real training steps (plain and Siamese), and an exported
heatmap bundle's parity on real faces with per-point confidences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.decode import HEATMAP_DECODERS, decode_heatmaps, encode_heatmaps


def test_continuous_encoding_round_trip_is_subpixel_exact_and_rounding_is_not():
    rng = np.random.default_rng(1)
    pts = rng.uniform(8, 104, (300, 2))               # crop pixels of a 112 crop
    err = {}
    for continuous in (True, False):
        h = encode_heatmaps(pts, 28, 4.0, continuous=continuous)[None]
        xy, peak = decode_heatmaps(h)
        err[continuous] = np.abs((xy[0] + 0.5) - pts / 4).max(-1)      # heatmap pixels
        assert peak.shape == (1, 300) and (peak <= 1.0 + 1e-6).all()
    assert err[True].mean() < 0.05 and err[True].max() < 0.05
    assert err[False].mean() > 0.15                    # the rounding baseline's quantisation
    # the other decoders run; the plain argmax(+0.25) cannot beat a quarter pixel
    h = encode_heatmaps(pts, 28, 4.0)[None]
    for dec in HEATMAP_DECODERS:
        xy, _ = decode_heatmaps(h, dec)
        assert xy.shape == (1, 300, 2)
    quarter = np.abs(decode_heatmaps(h, "argmax_quarter")[0][0] + 0.5 - pts / 4).mean()
    assert quarter > err[True].mean()


def test_training_targets_equal_runtime_encoding_and_eval_uses_runtime_decoder():
    from train.engine import torch_predictor
    from train.heatmap import HeatmapPFLD, heatmap_targets, to_numpy_decoder
    pts = np.random.default_rng(2).uniform(8, 104, (2, 68, 2))
    for continuous in (True, False):
        t = heatmap_targets(torch.tensor(pts), 28, 1.5, continuous).numpy()
        r = np.stack([encode_heatmaps(p, 28, 4.0, 1.5, continuous) for p in pts])
        assert np.abs(t - r).max() < 1e-6
    torch.manual_seed(0)
    model = HeatmapPFLD(68, 0.25).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        maps = model(x).numpy()
    assert maps.shape == (2, 68, 28, 28)
    ours = torch_predictor(model)(x.numpy())
    assert np.array_equal(ours, to_numpy_decoder(model)(maps))


def test_siamese_warp_back_recovers_the_canonical_heatmaps():
    import cv2

    from train.heatmap import heatmap_targets, warp_to_canonical
    pc = np.random.default_rng(0).uniform(30, 80, (1, 68, 2))
    a = cv2.getRotationMatrix2D((56, 56), 20, 1.1)
    a[:, 2] += (5, -3)
    a = np.array([[-1, 0, 111], [0, 1, 0]]) @ np.vstack([a, [0, 0, 1]])     # with a flip
    pa = pc @ a[:, :2].T + a[:, 2]
    back = warp_to_canonical(heatmap_targets(torch.tensor(pa), 28, 1.5).float(),
                             torch.tensor(cv2.invertAffineTransform(a)[None]).float())
    xy, _ = decode_heatmaps(back.numpy())
    assert np.abs((xy[0] + 0.5) * 4 - pc[0]).mean() < 0.3         # crop px, after resampling


def test_siamese_view_of_a_flipped_crop_comes_back_in_canonical_point_order():
    """Augmentation re-indexes points on a flip (channel k of a flipped crop is point
    mirror[k]); the Siamese warp-back must undo that too, or half the views teach the wrong
    side of the face (the first Siamese run stalled at 33 % NME that way)."""
    import cv2

    from runtime.schemes import get_scheme
    from train.heatmap import heatmap_targets, to_canonical_points
    scheme = get_scheme("300w68")
    pc = np.random.default_rng(1).uniform(30, 80, (1, 68, 2))
    a = cv2.getRotationMatrix2D((56, 56), -12, 0.95)
    a = np.array([[-1, 0, 111], [0, 1, 0]]) @ np.vstack([a, [0, 0, 1]])     # flipped view
    pa = scheme.flip_index(pc @ a[:, :2].T + a[:, 2])                        # as augment does
    h = heatmap_targets(torch.tensor(pa), 28, 1.5).float()
    inv = torch.tensor(cv2.invertAffineTransform(a)[None]).float()
    err = lambda hm: np.abs((decode_heatmaps(hm.numpy())[0][0] + 0.5) * 4 - pc[0]).mean()  # noqa: E731
    assert err(to_canonical_points(h, inv, scheme.mirror)) < 0.3
    assert err(to_canonical_points(h, inv, None)) > 5.0       # left and right swapped
    # an unflipped view keeps its order
    b = cv2.getRotationMatrix2D((56, 56), 8, 1.05)
    hb = heatmap_targets(torch.tensor(pc @ b[:, :2].T + b[:, 2]), 28, 1.5).float()
    assert err(to_canonical_points(hb, torch.tensor(cv2.invertAffineTransform(b)[None]).float(),
                                   scheme.mirror)) < 0.3


@pytest.mark.parametrize("siamese", [False, True])
def test_heatmap_training_steps_run_and_reduce_the_loss(tmp_path, siamese):
    from train.engine import TrainConfig, train
    cfg = TrainConfig(dataset="300w", width=0.25, epochs=2, batch_size=8, limit_faces=24,
                      val_fraction=0.2, family="heatmap", siamese=siamese, lr=3e-3,
                      out=str(tmp_path / "run"), threads=1, progress=False)
    last = train(cfg)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["arch"]["family"] == "heatmap" and ck["arch"]["encoding"] == "continuous"
    hist = ck["history"]
    assert len(hist) == 2 and np.isfinite(last["loss"]) and hist[1]["loss"] < hist[0]["loss"]
    assert 0 < last["val"]["nme"] < 5


@pytest.mark.slow
def test_exported_heatmap_bundle_parity_and_confidence(tmp_path, helen_faces, wflw_faces):
    from evaluation.metrics import face_batch
    from export.stages import export_all
    from runtime.bundle import BundleMeta
    from runtime.decode import Landmarker
    from runtime.preprocess import Preprocess
    from train.engine import save_checkpoint
    from train.heatmap import HeatmapPFLD
    torch.manual_seed(0)
    m = HeatmapPFLD(68, 0.25).eval()
    ck = tmp_path / "hm.pt"
    save_checkpoint(ck, {"arch": m.arch, "scheme": "300w68", "preprocess": Preprocess().to_meta(),
                         "model": m.state_dict()})
    bundles = export_all(ck, tmp_path / "art", targets=["onnx_sim_fp32", "tflite_fp32"],
                         progress=lambda s: None)
    x = face_batch(helen_faces[:6], Preprocess(), "landmarks")
    ref = Landmarker.open(bundles["onnx_sim_fp32"])
    a = ref(x)
    for name in ("onnx_fp32", "tflite_fp32"):
        meta = BundleMeta.load(bundles[name])
        assert meta.outputs[0].kind == "heatmaps" and meta.outputs[0].params["stride"] == 4
        assert meta.validation["max_abs_diff"] <= 1e-4
        lm = Landmarker.open(bundles[name])
        assert np.abs(lm(x) - a).max() < 1e-3
        assert lm.confidence.shape == (6, 68)
    # the benchmark's scoring collects the confidences per chunk and rates them against the
    # real point errors (evaluation.metrics.confidence_quality)
    from evaluation.metrics import evaluate
    from runtime.schemes import get_scheme
    s68 = get_scheme("300w68")
    r = evaluate(ref, helen_faces[:10], Preprocess(), s68, s68, "landmarks", batch=4)
    c = r["confidence"]
    assert c["points"] == 10 * 68 and 0 <= c["bad_points"] <= c["points"]
    assert c["auc_flag_bad"] is None or 0.0 <= c["auc_flag_bad"] <= 1.0
    # a 68-point model on 98-point WFLW faces: rated against the faces' points mapped to 68,
    # with the occlusion subset
    occluded = [f for f in wflw_faces if f.attributes[4] == 1][:6]
    w = evaluate(ref, occluded, Preprocess(), s68, get_scheme("wflw98"), "rect", batch=4)
    assert w["confidence"]["points"] == 6 * 68 and w["confidence"]["occlusion"]["faces"] == 6


def test_rank_auc_equals_the_pairwise_definition():
    from evaluation.metrics import rank_auc
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)            # rounded: plenty of ties
    pos = rng.random(300) < 0.3
    p, n = s[pos], s[~pos]
    pairwise = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n))
    assert abs(rank_auc(s, pos) - pairwise) < 1e-12
    assert rank_auc(s, np.zeros(300, bool)) is None
    assert rank_auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
