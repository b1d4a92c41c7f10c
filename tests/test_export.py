"""Export stage: every target's parity on real faces, meta.json round trips, the failure path
(nothing half-written) and the CLI's answers to bad input.

One session-scoped export of the tiny width-0.25 network feeds the parity, meta and report tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from export import stages
from export.run import main as cli
from export.stages import TARGETS, ExportError, ExportInputError, export_all
from runtime.bundle import META, BundleError, BundleMeta, sha256
from runtime.decode import Landmarker
from runtime.engines import load_bundle
from runtime.preprocess import Preprocess
from evaluation.metrics import face_batch

# Written out by hand, not derived from TARGETS: a new target without a case here fails
# test_every_target_has_a_parity_case. Values: (lineage parent, what it is checked against).
PARITY_CASES = {
    "onnx_fp32": ("source", "source"),
    "onnx_sim_fp32": ("onnx_fp32", "onnx_fp32"),
    "openvino_fp32": ("onnx_sim_fp32", "onnx_sim_fp32"),
    "openvino_fp16": ("onnx_sim_fp32", "onnx_sim_fp32"),
    "tflite_fp32": ("source", "onnx_sim_fp32"),
    "tflite_fp16": ("tflite_fp32", "onnx_sim_fp32"),
}
CONTRACT_KEYS = {"name", "engine", "precision", "files", "preprocess", "outputs", "input", "opset",
                 "lineage", "validation", "conversion", "quantization", "export", "schema_version"}


@pytest.fixture(scope="session")
def fresh_faces(wflw_faces, helen_faces):
    """Real faces the export's own check did not use (it takes every 15th WFLW face from 0)."""
    pre = Preprocess()
    return np.concatenate([face_batch(wflw_faces[7::60][:8], pre, "rect"),
                           face_batch(helen_faces[3::80][:4], pre, "landmarks")])


def _reference_output(name, exported_bundles, tiny_checkpoint, x):
    if name == "source":
        import torch

        from train.engine import load_checkpoint, model_from_checkpoint
        model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return Landmarker.open(exported_bundles[name], precision="f32")(x)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(PARITY_CASES))
def test_parity_on_real_faces(target, exported, tiny_checkpoint, fresh_faces):
    bundles, _ = exported
    parent, reference = PARITY_CASES[target]
    lm = Landmarker.open(bundles[target], precision="f32")
    meta = lm.meta
    spec = TARGETS[target]
    assert (meta.stage, meta.engine, meta.precision) == (target, spec.engine, spec.precision)
    assert meta.lineage.parent["target"] == parent
    assert meta.validation["checked_against"]["target"] == reference
    assert meta.validation["passed"] and meta.validation["faces"] == 40
    assert meta.validation["max_abs_diff"] <= spec.tolerance

    # recompute on faces the export never saw, through the runtime engines and decoders
    out = lm(fresh_faces)
    ref = _reference_output(reference, bundles, tiny_checkpoint, fresh_faces)
    assert out.shape == ref.shape == (len(fresh_faces), 2 * meta.outputs[0].num_points)
    assert np.abs(out - ref).max() <= spec.tolerance
    assert 0.0 < out.min() and out.max() < 1.0        # crop-normalised points, inside the crop


def test_every_target_has_a_parity_case():
    ids = {p for m in test_parity_on_real_faces.pytestmark if m.name == "parametrize"
           for p in m.args[1]}
    assert ids == set(TARGETS), f"targets without a parity case: {set(TARGETS) - ids}"


def test_plan_adds_what_a_target_is_built_from_and_checked_against():
    assert stages.plan(["tflite_fp16"]) == ["onnx_fp32", "onnx_sim_fp32", "tflite_fp32", "tflite_fp16"]
    assert stages.plan(["onnx_fp32"]) == ["onnx_fp32"]
    with pytest.raises(ExportInputError, match="unknown export target"):
        stages.plan(["onnx_fp64"])


@pytest.mark.slow
def test_progress_and_report(exported):
    bundles, lines = exported
    steps = [ln for ln in lines if ln.startswith("[")]
    assert steps == [f"[{i}/6] {t} ..." for i, t in enumerate(TARGETS, 1)]
    out_dir = next(iter(bundles.values())).parent
    report = json.loads((out_dir / stages.REPORT).read_text())
    assert report["status"] == "ok" and list(report["targets"]) == list(TARGETS)
    for name, row in report["targets"].items():
        meta = BundleMeta.load(bundles[name])
        assert row["bytes"] == meta.bytes
        assert row["max_abs_diff"] <= row["tolerance"] == TARGETS[name].tolerance
        assert row["faces"] == 40 and row["seconds"] > 0 and not row["reused"]


@pytest.mark.slow
def test_meta_round_trip_and_corruption(exported, tmp_path):
    bundles, _ = exported
    for name, folder in bundles.items():
        written = json.loads((folder / META).read_text())
        meta = BundleMeta.load(folder)
        assert meta.to_dict() == written                 # every written bundle round-trips
        assert CONTRACT_KEYS <= set(written), f"{name}: missing {CONTRACT_KEYS - set(written)}"
        for fname, info in written["files"].items():
            assert info == {"sha256": sha256(folder / fname), "bytes": (folder / fname).stat().st_size}

    # write -> load gives back exactly what was written (two-file bundle)
    copy = tmp_path / "openvino_fp32"
    shutil.copytree(bundles["openvino_fp32"], copy)
    src = BundleMeta.load(copy)
    src.files = BundleMeta.files_of(*src.files)        # write() fills in sha256 and size again
    returned = src.write(copy)
    assert BundleMeta.load(copy) == returned
    assert list(returned.files) == ["model.xml", "model.bin"]     # primary file first

    data = bytearray((copy / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.bin does not match the sha256"):
        BundleMeta.load(copy)
    with pytest.raises(BundleError):
        load_bundle(copy)
    (copy / "model.bin").unlink()
    with pytest.raises(BundleError, match="model.bin is missing"):
        BundleMeta.load(copy)


@pytest.mark.slow
def test_failed_check_leaves_no_artifact(exported, tiny_checkpoint, tmp_path, monkeypatch):
    """An impossible tolerance makes the simplify stage fail: typed error with the figures, no
    folder (not even a staging one) left behind, the parent bundle reused, report says failed."""
    bundles, _ = exported
    out = tmp_path / "tiny"
    shutil.copytree(bundles["onnx_fp32"], out / "onnx_fp32")
    monkeypatch.setitem(TARGETS, "onnx_sim_fp32",
                        dataclasses.replace(TARGETS["onnx_sim_fp32"], tolerance=-1.0))
    lines = []
    with pytest.raises(ExportError) as err:
        export_all(tiny_checkpoint, out, targets=["onnx_sim_fp32"], progress=lines.append)
    msg = str(err.value)
    assert "onnx_sim_fp32" in msg and "output 'points': max |diff|" in msg and "tolerance -1e+00" in msg
    assert "reused" in lines[1] and lines[2] == "[2/2] onnx_sim_fp32 ..."
    assert sorted(os.listdir(out)) == ["export_report.json", "onnx_fp32"]
    report = json.loads((out / stages.REPORT).read_text())
    assert report["status"] == "failed" and "onnx_sim_fp32" in report["error"]


@pytest.mark.slow
def test_static_batch_onnx(tiny_checkpoint, tmp_path):
    bundles = export_all(tiny_checkpoint, tmp_path / "static", targets=["onnx_fp32"],
                         dynamic_batch=False, progress=lambda s: None)
    meta = BundleMeta.load(bundles["onnx_fp32"])
    assert meta.input.shape == [1, 3, 112, 112] and meta.export["batch"] == "static"
    assert meta.validation["faces"] == 40     # 40 faces through a batch-1 model


# -- bad input: exit code 2, a message, no traceback ------------------------------------------
def _run_cli(*args):
    res = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in res.output
    return res


def test_cli_missing_checkpoint(tmp_path):
    res = _run_cli("--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "nope.pt does not exist" in res.output


def test_cli_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("not a checkpoint\n")
    res = _run_cli("--checkpoint", str(p), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "notes.pt is not a readable checkpoint" in res.output


def test_cli_other_architecture(tmp_path):
    import torch

    from train.engine import save_checkpoint
    from train.model import PFLD
    p = tmp_path / "wflw98_as_68.pt"          # 98-point weights under a 68-point arch
    save_checkpoint(p, {"arch": {"num_points": 68, "width": 0.25, "input_size": 112},
                        "scheme": "300w68", "preprocess": Preprocess().to_meta(),
                        "model": PFLD(98, 0.25).state_dict()})
    res = _run_cli("--checkpoint", str(p), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "fc.weight has shape (196, 48), expected (136, 48)" in res.output

    q = tmp_path / "classifier.pt"            # some other network's bare state_dict
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, q)
    res = _run_cli("--checkpoint", str(q), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "not a landmark checkpoint" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_output(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = _run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(blocker / "bundles"))
    assert res.exit_code == 2 and "is not writable" in res.output
    if os.geteuid() != 0:                     # root ignores mode bits
        ro = tmp_path / "read_only"
        ro.mkdir(mode=0o500)
        res = _run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(ro / "x"))
        assert res.exit_code == 2 and "is not writable" in res.output


def test_cli_unknown_target(tiny_checkpoint, tmp_path):
    res = _run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                   "--targets", "onnx_fp32,coreml_fp16")
    assert res.exit_code == 2 and "coreml_fp16" in res.output and "tflite_fp16" in res.output
