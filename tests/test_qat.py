"""Quantization-aware training (quantize.qat), the escalation's last step.

Fast: the fake quantization is the backends' grid (a BatchNorm folded in first, so per-tensor
weights are quantized as the exported, folded convolution's are); every convolution of a PFLD
finds its BatchNorm. A short fine-tune of the tiny checkpoint on real face crops writes a new,
exportable checkpoint and leaves the original alone; QAT runs only from the checkpoint the
bundle came from and never on a face that scores it. Slow: a budget nothing meets runs every
step (plain, better, float fallback, QAT, fallback from QAT) on the tiny bundle; and the
shipped student with per-tensor weights, where plain PTQ drifts by well over a point on
onnxruntime: QAT (fine-tuned on WFLW training faces, never a scored one) takes the drift down
to a fraction, and the report and the bundle record the step.
"""
from __future__ import annotations

import json

import pytest
import torch

from evaluation.metrics import face_batch
from evaluation.sets import set_info
from quantize.core import REPORT, Settings, run
from quantize.qat import QatOptions, _conv_bn_pairs, _Fake, qat_checkpoint
from quantize.search import PLAIN, QAT
from runtime.bundle import BundleMeta, sha256
from train.checkpoint import Checkpoint


def test_folded_per_tensor_weights_land_on_the_int8_grid():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6).eval()
    bn.running_var.uniform_(0.01, 4.0)
    bn.weight.data.uniform_(-2.0, 2.0)
    fake = _Fake(torch, conv, per_channel=False, bn=bn)
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    folded = (conv.weight * f).detach()
    raw = conv.parametrizations.weight.original.detach() * f
    scale = raw.abs().max() / 127
    levels = folded / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)          # on the int8 grid
    assert levels.abs().max() <= 127 + 1e-3
    assert not torch.allclose(folded, raw)                             # and it did round
    fake.enabled = False
    assert torch.equal(conv.weight, conv.parametrizations.weight.original)
    fake.remove()
    assert not hasattr(conv, "parametrizations")


def test_every_convolution_of_a_pfld_finds_its_batchnorm(tiny_checkpoint):
    m = Checkpoint.load(tiny_checkpoint).build()
    convs = [x for x in m.modules() if type(x) is torch.nn.Conv2d]
    assert len(_conv_bn_pairs(torch, m)) == len(convs) > 10


def test_a_short_fine_tune_writes_an_exportable_checkpoint(tiny_checkpoint, tmp_path):
    from export.stages import export_all
    before = sha256(tiny_checkpoint)
    ck = Checkpoint.load(tiny_checkpoint)
    faces = set_info("wflw:calib").load(None)[:48]
    x = face_batch(faces, ck_pre(ck), "landmarks")
    out = tmp_path / "qat.pt"
    logs = []
    rec = qat_checkpoint(tiny_checkpoint, x, out, QatOptions(steps=30, batch=16, lr=1e-3),
                         log=logs.append)
    assert sha256(tiny_checkpoint) == before                    # the original is untouched
    assert rec["faces"] == 48 and rec["layers_fake_quantized"] >= rec["batchnorms_folded"] > 10
    assert rec["loss_last"] < rec["loss_first"]
    assert len(logs) >= 5 and "distillation loss" in logs[-1]
    new = Checkpoint.load(out)
    assert new.raw["qat"]["options"]["steps"] == 30
    a, b = ck.raw["model"], new.raw["model"]
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    bundles = export_all(out, tmp_path / "bundle", targets=["onnx_fp32"], progress=lambda s: None)
    assert BundleMeta.load(bundles["onnx_fp32"]).lineage.source_checkpoint["sha256"] == sha256(out)


def ck_pre(ck):
    from runtime.preprocess import Preprocess
    return Preprocess.from_dict(ck.raw["preprocess"])


@pytest.mark.slow
def test_qat_takes_the_per_tensor_drift_plain_ptq_cannot_hold(shipped_checkpoint, tmp_path):
    """Per-tensor weights on the student: plain PTQ drifts by over a point (depthwise
    convolutions with a BatchNorm folded in do not share one range); 60 QAT steps on the
    calibration faces bring it to a third or less, within a budget plain misses by three times,
    and the bundle is QAT's."""
    from export.stages import export_all
    out = tmp_path / "student"
    export_all(shipped_checkpoint, out, targets=["onnx_sim_fp32"], progress=lambda s: None)
    settings = Settings(per_channel=False, qat="force", qat_steps=60, qat_set="wflw:calib",
                        budget=0.6, escalate=False, max_float_layers=0, eval_sets=(),
                        latency_runs=10, warmup=2)
    report, failed = run(out, ["onnxruntime"], settings, log=lambda s: None)
    e = report["backends"]["onnxruntime"]
    steps = {s["step"]: s for s in e["escalation"]["steps"]}
    assert list(steps) == [PLAIN, QAT]
    plain = max(abs(v) for v in steps[PLAIN]["drift_points"].values())
    qat = max(abs(v) for v in steps[QAT]["drift_points"].values())
    assert plain > 1.0 and qat < plain / 3, (plain, qat)
    assert steps[QAT]["qat"]["set"] == "wflw:calib" and steps[QAT]["seconds"] > 0
    assert e["escalation"]["taken"] == QAT
    meta = BundleMeta.load(out / "onnx_int8")
    assert meta.quantization["qat"]["qat_parent_sha256"] != meta.lineage.parent["sha256"]
    assert meta.quantization["escalation"] == json.loads((out / REPORT).read_text())[
        "backends"]["onnxruntime"]["escalation"]
    assert e["nme"]["wflw:heldout/landmarks"]["drift_points"] == pytest.approx(
        steps[QAT]["drift_points"]["wflw:heldout/landmarks"], abs=1e-9)


def test_qat_needs_the_checkpoint_the_bundle_was_exported_from(tiny_checkpoint, tmp_path):
    """No checkpoint (an imported model), a missing one or a changed one: no QAT step, and the
    reason names the file; the checkpoint it was exported from: a step to run."""
    import shutil
    from types import SimpleNamespace

    from quantize.qat import qat_source

    def job(src):
        lineage = SimpleNamespace(source_checkpoint=src)
        return SimpleNamespace(meta=SimpleNamespace(lineage=lineage), parent_dir=tmp_path / "b")
    fn, why = qat_source(job(None))
    assert fn is None and "imported model" in why
    fn, why = qat_source(job({"path": str(tmp_path / "gone.pt"), "sha256": "0" * 64}))
    assert fn is None and "gone.pt" in why and "not here" in why
    copy = tmp_path / "ck.pt"
    shutil.copy(tiny_checkpoint, copy)
    fn, why = qat_source(job({"path": str(copy), "sha256": "0" * 64}))
    assert fn is None and "ck.pt has changed" in why
    fn, why = qat_source(job({"path": str(copy), "sha256": sha256(copy)}))
    assert callable(fn) and why == ""


def test_qat_refuses_faces_that_score_the_bundle():
    from types import SimpleNamespace

    from quantize.backends import QuantizeError
    from quantize.qat import qat_faces
    held = set_info("wflw:heldout").load(None)

    def job(name):
        return SimpleNamespace(settings=Settings(qat_set=name),
                               figures=[SimpleNamespace(key="wflw:heldout/landmarks", faces=held)])
    shares = r"--qat-set wflw:train shares \d+ face\(s\) with wflw:heldout"
    with pytest.raises(QuantizeError, match=shares):
        qat_faces(job("wflw:train"))
    with pytest.raises(QuantizeError, match="--qat-set wflw:nope"):
        qat_faces(job("wflw:nope"))
    fit = qat_faces(job("wflw:fit"))
    assert len(fit) + len(held) == len(set_info("wflw:train").load(None))


@pytest.mark.slow
def test_a_budget_nothing_meets_runs_every_step_then_writes_nothing(tiny_bundle, tmp_path):
    """Budget 0: plain PTQ, better PTQ, the float fallback, QAT, and the float fallback from the
    QAT model all run, in that order, each recorded; no INT8 bundle is written."""
    import shutil

    from quantize.search import BETTER, FALLBACK
    out = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, out / "onnx_fp32")
    settings = Settings(budget=0.0, qat_steps=5, qat_set="wflw:calib", calib_samples=32,
                        max_float_layers=1, rank_faces=16, eval_sets=(), latency_runs=5,
                        warmup=1)
    report, failed = run(out, ["onnxruntime"], settings, log=lambda s: None)
    e = report["backends"]["onnxruntime"]
    assert failed == ["onnxruntime"] and e["status"] == "failed"
    esc = e["escalation"]["steps"]
    assert [s["step"] for s in esc] == [PLAIN, BETTER, FALLBACK, QAT, FALLBACK]
    assert esc[4]["from_step"] == QAT and esc[3]["qat"]["options"]["steps"] == 5
    assert all(s["seconds"] > 0 and not s["within_budget"] for s in esc)
    assert e["escalation"]["path"] == " -> ".join(s["step"] for s in esc)
    assert not (out / "onnx_int8").exists()
