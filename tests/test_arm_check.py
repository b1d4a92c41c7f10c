"""The ARM check's fast part (CI always): its plan, the Pi-like CPU files it plants, the shell
quoting of commands run in the root, and the comparison of ARM and x86 outputs on real faces
(fed x86 outputs as if from ARM: zero shift, zero drift; a bundle that failed there is a row
that says so). The emulated run itself is `make arm-check` (README: ARM)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def test_dry_run_names_the_plan(tmp_path, tiny_bundle):
    p = subprocess.run([sys.executable, str(REPO / "benchmark" / "arm" / "check.py"), "--dry-run",
                        "--bundles", str(tiny_bundle.parent), "--cache", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["cpu"].startswith("cortex-a76") and plan["venvs"] == {
        "onnxruntime": "runtime/requirements-onnxruntime.txt"}
    assert plan["faces"] == {"wflw:test/rect": 127, "300w:helen_test/landmarks": 83}
    assert not (tmp_path / "c").exists()                 # a dry run builds nothing


def test_pi_like_cpu_files_and_quoting(tmp_path):
    from benchmark.arm.check import _q, fake_cpu
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    info = fake_cpu(root, "cortex-a72").read_text()
    assert info.count("processor") == 4 and "CPU part\t: 0xd08" in info and "sve" not in info
    midr = root / "sys/devices/system/cpu/cpu0/regs/identification/midr_el1"
    assert midr.read_text().strip() == "0x00000000410fd083"
    out = subprocess.run(["sh", "-c", "echo " + _q("it's $HOME; `x`")], capture_output=True, text=True)
    assert out.stdout.strip() == "it's $HOME; `x`"


def test_compare_scores_arm_outputs_against_x86(tiny_bundle):
    from benchmark.arm.check import compare, crops_for, face_sample
    from runtime.bundle import BundleMeta
    from runtime.decode import Landmarker
    meta = BundleMeta.load(tiny_bundle)
    sample = [(s, faces[:10]) for s, faces in face_sample()]
    x, mats = crops_for(meta, sample)
    name = f"{tiny_bundle.parent.name}__{tiny_bundle.name}"
    y = Landmarker.open(tiny_bundle, precision="f32")(x)
    arm = {name: {"status": "ok", "outputs": {"300w68": y.tolist()}, "exec_precision": None}}
    rep = compare({tiny_bundle: meta}, {tiny_bundle: mats}, {name: x}, arm, sample,
                  "cortex-a76", 0.10, ["aarch64"])
    (row,) = rep["rows"]
    assert row["status"] == "ok" and row["device"] == "aarch64, emulated cortex-a76"
    assert row["latency"] is None and "not meaningful" in row["latency_note"]
    assert set(row["accuracy"]) == {"wflw:test/rect", "300w:helen_test/landmarks"}
    assert row["max_shift_vs_x86_px"] < 1e-4
    assert all(abs(row["accuracy"][k]["nme"] - row["nme_x86"][k]) < 1e-6 for k in row["nme_x86"])
    failed = compare({tiny_bundle: meta}, {tiny_bundle: mats}, {name: x},
                     {name: {"status": "error", "reason": "RuntimeError: scale size"}}, sample,
                     "cortex-a76", 0.10, ["aarch64"])["rows"][0]
    assert failed["status"] == "error" and "scale size" in failed["reason"]
    assert row["verdict"] == "pass" and failed["verdict"] == "fail"
    # a bundle declared for x86_64 only that fails on ARM is what it said it would be
    meta.architectures = ["x86_64"]
    declared = compare({tiny_bundle: meta}, {tiny_bundle: mats}, {name: x},
                       {name: {"status": "error", "reason": "RuntimeError: scale size"}}, sample,
                       "cortex-a76", 0.10, ["aarch64"])["rows"][0]
    assert declared["verdict"] == "x86_64 only, as declared"


def test_arm_drift_is_the_x86_drift_plus_what_arm_changes(tiny_bundle, tmp_path):
    """An INT8 bundle's drift on ARM = its drift on x86 over all evaluation faces (the quantize
    report beside it) + the NME change ARM makes in the same bundle, paired on the sample; the
    budget applies to that sum, and the noisier INT8-vs-FP32 figure on the sample is kept."""
    import shutil

    from benchmark.arm.check import compare, crops_for, face_sample
    from runtime.bundle import BundleMeta
    from runtime.decode import Landmarker
    model = tmp_path / "m"
    fp32, int8 = model / "onnx_sim_fp32", model / "onnx_int8"
    shutil.copytree(tiny_bundle, fp32)
    shutil.copytree(tiny_bundle, int8)
    metas = {b: BundleMeta.load(b) for b in (fp32, int8)}
    metas[int8].precision = "int8"
    (model / "quantize_report.json").write_text(json.dumps({"backends": {"onnxruntime": {
        "status": "ok", "int8_bundle": "artifacts/m/onnx_int8", "nme": {
            "wflw:test/rect": {"fp32": {"nme": 0.0900}, "int8": {"nme": 0.0905}},
            "wflw:test/landmarks": {"fp32": {"nme": 0.0700}, "int8": {"nme": 0.0708}},
            "300w:helen_test/landmarks": {"fp32": {"nme": 0.05}, "int8": {"nme": 0.06}}}}}}))
    sample = [(s, faces[:10]) for s, faces in face_sample()]
    x, mats = crops_for(metas[fp32], sample)
    y = Landmarker.open(fp32, precision="f32")(x)
    arm = {"m__onnx_sim_fp32": {"status": "ok", "outputs": {"300w68": y.tolist()}},
           "m__onnx_int8": {"status": "ok", "outputs": {"300w68": (y + 0.004).tolist()}}}
    rep = compare(metas, {b: mats for b in metas}, {n: x for n in arm}, arm, sample,
                  "cortex-a76", 0.10, ["aarch64"])
    row = next(r for r in rep["rows"] if r["bundle"] == "onnx_int8")
    effect = row["arm_effect_points"]["wflw:test/rect"]
    assert effect == pytest.approx((row["accuracy"]["wflw:test/rect"]["nme"]
                                    - row["nme_x86"]["wflw:test/rect"]) * 100) and effect != 0
    assert row["drift_x86_points"] == pytest.approx({"wflw:test/rect": 0.05,
                                                     "wflw:test/landmarks": 0.08})
    assert row["drift_arm_points"] == pytest.approx({"wflw:test/rect": 0.05 + effect,
                                                     "wflw:test/landmarks": 0.08 + effect})
    assert row["drift_arm_sample_points"]["wflw:test/rect"] == pytest.approx(effect, abs=1e-6)
    assert row["verdict"] == ("pass" if abs(0.08 + effect) <= 0.10 else "fail")
