"""benchmark/: a real (tiny) run over every available backend, skipped and failing rows, the
external-model path, the gate, and the CLI's registry-driven choices.

The tiny width-0.25 checkpoint is exported through export/ (parity-checked on real faces) and
quantized to INT8; the benchmark then runs it on a few real WFLW and HELEN faces.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from common import defaults
from runtime.engines import ENGINES, Engine, EngineUnavailable, register

FACES = 6
QUICK = dict(threads=(1,), max_faces=FACES, warmup=2, runs=5, batch=4)
EXPORTED = ("onnx_sim_fp32", "openvino_fp32", "tflite_fp32")


# -- engines defined here run in the worker too (it imports them from this file) -------------------
class FakeNPUEngine(Engine):
    """An engine whose package is not installed: available() is False."""
    name, package = "fake_npu", "fake-npu-sdk"

    @classmethod
    def available(cls):
        return False, "fake_npu needs the Python package 'fake-npu-sdk' (pip install fake-npu-sdk)"


class BrokenEngine(Engine):
    """Loads fine, fails on inference: the row must become an error row with the message."""
    name = "broken"

    def run(self, batch):
        raise RuntimeError("simulated driver crash in broken engine")


@pytest.fixture
def registered():
    added = []

    def add(cls):
        assert cls.name not in ENGINES
        register(cls)
        added.append(cls.name)
    yield add
    for name in added:
        ENGINES.pop(name, None)


# -- tiny bundles ----------------------------------------------------------------------------------
def _int8_onnx(fp32_bundle: Path, dst: Path, faces, ck_meta: dict) -> None:
    """An ORT QDQ INT8 bundle of the tiny model, calibrated on real faces."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from dataclasses import replace

    from evaluation.metrics import face_batch
    from runtime.bundle import BundleMeta
    from runtime.preprocess import Preprocess
    x = face_batch(faces, Preprocess.from_dict(ck_meta["preprocess"]), "rect")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)
    dst.mkdir(parents=True)
    quantize_static(str(fp32_bundle / "model.onnx"), str(dst / "model.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    meta = BundleMeta.load(fp32_bundle)
    meta.precision, meta.files = "int8", BundleMeta.files_of("model.onnx")
    meta.lineage = replace(meta.lineage, stage="onnx_int8")
    meta.write(dst)


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoint, tmp_path_factory, wflw_faces):
    from export.stages import export_all
    from evaluation.data import calibration_split
    from train.engine import load_checkpoint
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    targets = [t for t in EXPORTED if ENGINES[{"onnx": "onnxruntime"}.get(t.split("_")[0],
                                                                       t.split("_")[0])].available()[0]]
    export_all(tiny_checkpoint, out, targets=targets, progress=lambda s: None)
    if ENGINES["onnxruntime"].available()[0]:
        _int8_onnx(out / "onnx_sim_fp32", out / "onnx_int8", calibration_split(wflw_faces)[0][:16],
                   load_checkpoint(tiny_checkpoint))
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_bundles, tiny_checkpoint, tmp_path_factory):
    """One benchmark of every registered backend on the tiny bundles."""
    from benchmark.core import BenchConfig, run
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(backends=("all",), precisions=("fp32", "int8"), bundles=str(tiny_bundles),
                      checkpoint=str(tiny_checkpoint), out=str(out), **QUICK)
    lines = []
    records = run(cfg, echo=lines.append)
    return out, records, lines


def _ok(records, **kw):
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in kw.items())]


# -- the run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_available_backend_is_measured(tiny_run, tiny_bundles):
    out, records, lines = tiny_run
    backends = {r["backend"] for r in records}
    assert set(ENGINES) <= backends | {"fake_npu", "broken"}, "a registered engine has no row"
    for name, cls in ENGINES.items():
        if name in ("fake_npu", "broken"):
            continue
        rows = [r for r in records if r["backend"] == name]
        if cls.available()[0]:
            assert _ok(records, backend=name), f"{name} is available but no row ran: {rows}"
        else:
            assert all(r["status"] == "skipped" and r["reason"] for r in rows)
    for r in _ok(records):
        lat = r["latency"]
        assert 0 < lat["median_ms"] <= lat["p90_ms"] and lat["runs"] == QUICK["runs"]
        assert r["load_s"] > 0 and r["peak_rss_mb"] is not None and r["memory"]["rss_peak_mb"] > 0
        assert set(r["accuracy"]) == {"wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks",
                                      "wflw:heldout/landmarks", "300w:heldout/landmarks"}
        for a in r["accuracy"].values():
            assert a["count"] == FACES and np.isfinite(a["nme"]) and 0 <= a["auc"] <= 1
        assert "pose" in r["accuracy"]["wflw:test/rect"]["subsets"]
        assert "cores" in r["host"] and "Python" in r["host"]
        if r["kind"] == "bundle":   # every file of the bundle, meta.json included
            folder = tiny_bundles / r["bundle"]
            assert r["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    # numbered progress lines, one per row
    assert sum(1 for ln in lines if ln.startswith("[")) == len(records)


@pytest.mark.slow
def test_fp32_rows_match_the_torch_reference(tiny_run):
    _, records, _ = tiny_run
    ref = [r for r in records if r["role"] == "reference"]
    assert len(ref) == 1 and ref[0]["status"] == "ok" and ref[0]["backend"] == "torch"
    fp32 = [r for r in _ok(records, precision="fp32") if r["role"] != "reference"]
    assert fp32
    for r in fp32:
        d = r["drift"]
        assert d is not None, r["drift_reason"]
        if r["exec_precision"]["actual"] in (None, "f32"):
            assert d["max_shift_px"] < 0.05 and d["max_abs_nme_delta"] < 1e-4, r["id"]
    ov = [r for r in _ok(records, backend="openvino")]
    if ov:   # both execution precisions are rows, and each says what it ran in
        assert {r["exec_precision"]["hint"] for r in ov} == {"default", "f32"}
        assert {r["exec_precision"]["actual"] for r in ov if r["exec_precision"]["hint"] == "f32"} == {"f32"}
    int8 = _ok(records, precision="int8")
    if ENGINES["onnxruntime"].available()[0]:
        assert int8 and all(r["drift"]["max_shift_px"] > 0 for r in int8)   # quantized: not identical


@pytest.mark.slow
def test_missing_bundles_are_skipped_rows_and_outputs_written(tiny_run):
    out, records, _ = tiny_run
    skipped = [r for r in records if r["status"] == "skipped"]
    assert any(r["backend"] == "openvino" and r["precision"] == "int8" for r in skipped)
    assert all("bundle" in r["reason"] for r in skipped if r["kind"] == "missing")
    from benchmark.records import load_run
    man, recs = load_run(out)
    assert man["finished"] and len(recs) == len(records)
    assert sorted(p.name for p in (out / "records").glob("*.json")) == sorted(man["records"])
    md = (out / "results.md").read_text()
    for r in records:
        assert r["bundle"] in md
    assert "Skipped and failed rows" in md and "Host:" in md
    for png in ("latency_vs_nme.png", "sizes.png", "ced_wflw_test_rect.png",
                "ced_300w_helen_test_landmarks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


# -- skipped and failing rows -------------------------------------------------------------------------
def _bundle_for_engine(src: Path, dst: Path, engine: str) -> None:
    from runtime.bundle import BundleMeta
    shutil.copytree(src, dst)
    meta = BundleMeta.load(dst)
    meta.engine, meta.files = engine, BundleMeta.files_of(*meta.files)
    meta.write(dst)


@pytest.mark.slow
def test_unavailable_engine_device_and_failing_engine_do_not_stop_the_run(
        tiny_bundles, tmp_path, registered):
    from benchmark.core import BenchConfig, run
    registered(FakeNPUEngine)
    registered(BrokenEngine)
    bundles = tmp_path / "tiny"
    bundles.mkdir()
    _bundle_for_engine(tiny_bundles / "onnx_sim_fp32", bundles / "npu_fp32", "fake_npu")
    _bundle_for_engine(tiny_bundles / "onnx_sim_fp32", bundles / "broken_fp32", "broken")
    shutil.copytree(tiny_bundles / "onnx_sim_fp32", bundles / "onnx_sim_fp32")
    cfg = BenchConfig(backends=("fake_npu", "broken", "onnxruntime", "openvino"), precisions=("fp32",),
                      devices=("CPU", "NPU"), exec_precisions=("default",), bundles=str(bundles),
                      checkpoint=str(tmp_path / "no_such.pt"), out=str(tmp_path / "out"), **QUICK)
    records = run(cfg, echo=lambda s: None)
    by = {(r["backend"], r["device"]): r for r in records}
    assert by[("fake_npu", "CPU")]["status"] == "skipped"
    assert "pip install fake-npu-sdk" in by[("fake_npu", "CPU")]["reason"]
    broken = [r for r in records if r["backend"] == "broken"]
    assert broken and all(r["status"] == "error" and "simulated driver crash" in r["reason"] for r in broken)
    ort = by[("onnxruntime", "CPU")]
    assert ort["status"] == "ok" and ort["accuracy"]
    assert ort["drift"] is None and "reference" in ort["drift_reason"]   # checkpoint missing
    ref = [r for r in records if r["role"] == "reference"][0]
    assert ref["status"] == "skipped" and "no_such.pt" in ref["reason"]
    npu = by[("onnxruntime", "NPU")]   # not an onnxruntime provider here
    assert npu["status"] == "skipped" and "provider" in npu["reason"]
    assert by[("openvino", "CPU")]["status"] == "skipped"   # no openvino bundle in this folder
    md = (tmp_path / "out" / "results.md").read_text()
    assert "simulated driver crash" in md and "fake-npu-sdk" in md


def test_nothing_to_run_still_reports_every_row(tmp_path):
    from benchmark.core import BenchConfig, run
    out = tmp_path / "out"
    records = run(BenchConfig(bundles=str(tmp_path / "no_bundles"), checkpoint=str(tmp_path / "no.pt"),
                              out=str(out), **QUICK), echo=lambda s: None)
    assert records and all(r["status"] == "skipped" and r["reason"] for r in records)
    assert {r["backend"] for r in records} >= {n for n, c in ENGINES.items() if c.available()[0]}
    assert "Skipped and failed rows" in (out / "results.md").read_text()


# -- external models --------------------------------------------------------------------------------
class _Foreign:
    """Our tiny model dressed as someone else's: NHWC input, pixel outputs, all x then all y."""

    @staticmethod
    def export(checkpoint, path: Path):
        import torch

        from train.engine import load_checkpoint, model_from_checkpoint
        model = model_from_checkpoint(load_checkpoint(checkpoint))

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, x):                       # x: N, H, W, C
                y = self.m(x.permute(0, 3, 1, 2)) * 112.0
                n = y.shape[0]
                return y.reshape(n, -1, 2).permute(0, 2, 1).reshape(n, -1)
        x = torch.zeros(2, 112, 112, 3)
        torch.onnx.export(Wrapped().eval(), (x,), str(path), dynamo=True, external_data=False,
                          input_names=["input"], dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))


@pytest.mark.slow
def test_external_models_score_like_our_own_bundle(tiny_bundles, tiny_checkpoint, tmp_path):
    if not ENGINES["onnxruntime"].available()[0]:
        pytest.skip("onnxruntime is not installed")
    from benchmark.core import BenchConfig, run
    from benchmark.targets import REPO_SPEC
    foreign = tmp_path / "foreign.onnx"
    _Foreign.export(tiny_checkpoint, foreign)
    spec = json.loads(REPO_SPEC.read_text())
    spec.update(name="foreign", layout="NHWC", output_units="pixels", output_order="xxyy")
    spec_path = tmp_path / "foreign.json"
    spec_path.write_text(json.dumps(spec))
    cfg = BenchConfig(backends=("onnxruntime",), precisions=("fp32",), bundles=str(tiny_bundles),
                      checkpoint=str(tmp_path / "none.pt"), out=str(tmp_path / "out"),
                      externals=((str(tiny_bundles / "onnx_sim_fp32" / "model.onnx"), str(REPO_SPEC)),
                                 (str(foreign), str(spec_path))), **QUICK)
    records = run(cfg, echo=lambda s: None)
    ours = _ok(records, bundle="onnx_sim_fp32")[0]
    for name in ("pfld_as_external", "foreign"):
        ext = _ok(records, bundle=name)
        assert ext, [(r["bundle"], r["status"], r["reason"]) for r in records]
        ext = ext[0]
        assert ext["kind"] == "external" and ext["drift"] is None
        for key, a in ours["accuracy"].items():
            assert ext["accuracy"][key]["nme"] == pytest.approx(a["nme"], rel=1e-4, abs=1e-6), (name, key)
    assert "foreign" in (tmp_path / "out" / "results.md").read_text()


def test_bad_spec_is_a_clear_error(tmp_path):
    from benchmark.targets import REPO_SPEC, SpecError, load_spec
    assert load_spec(REPO_SPEC)["scheme"] == "300w68"
    spec = json.loads(REPO_SPEC.read_text())
    spec["output_units"] = "furlongs"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="output_units"):
        load_spec(p)
    del spec["mean"]
    p.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="'mean'"):
        load_spec(p)


# -- the gate ---------------------------------------------------------------------------------------
def _gates(records, model, **over) -> dict:
    ok = [r for r in records if r["status"] == "ok" and r["kind"] == "bundle"]
    sizes = {r["bundle"]: r["size_bytes"] for r in ok}
    g = {"model": model, "min_faces": FACES,
         "bundles": {b: {"max_bytes": int(s * 1.5)} for b, s in sizes.items()},
         "nme_max": {"wflw:test/rect": 10.0, "300w:helen_test/landmarks": 10.0},
         "drift_max": {"fp32": {"nme_delta": 1e-4, "shift_px": 0.05},
                       "bf16": {"shift_px": 5.0}, "int8": {"shift_px": 50.0}},
         "speed_ratio_max": [{"int8": "onnx_int8", "fp32": "onnx_sim_fp32", "max": 100.0}]
         if "onnx_int8" in sizes else []}
    g.update(over)
    return g


@pytest.mark.slow
def test_gate_passes_within_limits_and_fails_with_a_table(tiny_run, tmp_path):
    from benchmark import gate
    out, records, _ = tiny_run
    model = records[0]["model"]
    runner = CliRunner()

    def run_gate(g):
        p = tmp_path / "gates.json"
        p.write_text(json.dumps(g))
        return runner.invoke(gate.main, ["--run", str(out), "--gates", str(p)])

    if _ok(records, bundle="onnx_int8"):     # without the paired timing, a speed ratio is missing
        res = run_gate(_gates(records, model))
        assert res.exit_code == 1 and "no paired timing" in res.output
        from benchmark.pairs import measure_pairs
        p = tmp_path / "gates.json"
        p.write_text(json.dumps(_gates(records, model)))
        pairs = measure_pairs(out, p, rounds=3, calls=3, processes=2, warmup=1, echo=lambda s: None)
        assert [(q["fast"], q["base"], q["status"]) for q in pairs] == [("onnx_int8", "onnx_sim_fp32", "ok")]
        assert pairs[0]["rounds"] == 6 and len(pairs[0]["ratio_per_process"]) == 2
        assert pairs[0]["fast_ms"] > 0 and pairs[0]["base_ms"] > 0 and pairs[0]["spread"] >= 0

    res = run_gate(_gates(records, model))
    assert res.exit_code == 0, res.output
    assert "gate passed" in res.output and "size bytes" in res.output

    g = _gates(records, model)
    first = next(iter(g["bundles"]))
    g["bundles"][first]["max_bytes"] = 100          # smaller than any model
    res = run_gate(g)
    assert res.exit_code == 1
    assert "gate FAILED" in res.output and "limit" in res.output and "measured" in res.output
    failed = [ln for ln in res.output.splitlines() if ln.rstrip().endswith("FAIL")]
    assert any(first in ln and "size bytes" in ln for ln in failed)

    res = run_gate(_gates(records, model, drift_max={"fp32": {"shift_px": 0.0}, "int8": {"shift_px": 1e-9}}))
    if _ok(records, precision="int8"):
        assert res.exit_code == 1 and "drift shift (int8)" in res.output

    g = _gates(records, model)
    g["bundles"]["tflite_int8_not_built"] = {"max_bytes": 10**9}   # a gated row that never ran
    res = run_gate(g)
    assert res.exit_code == 1 and "missing" in res.output

    g = _gates(records, model, min_faces=FACES + 1)   # NME on too few faces is not a pass
    res = run_gate(g)
    assert res.exit_code == 1 and "faces" in res.output

    if "onnx_int8" in g["bundles"]:
        g = _gates(records, model, speed_ratio_max=[{"int8": "onnx_int8", "fp32": "onnx_sim_fp32", "max": 1e-6}])
        res = run_gate(g)
        assert res.exit_code == 1 and "speed int8/fp32" in res.output


def _pair(ratio, spread, **kw):
    return {"model": "m", "fast": "onnx_int8", "base": "onnx_sim_fp32", "exec_hint": "default",
            "threads": 1, "status": "ok", "ratio": ratio, "spread": spread, "fast_ms": ratio,
            "base_ms": 1.0, "rounds": 36, **kw}


@pytest.mark.parametrize("ratio, spread, ok, why", [
    (0.70, 0.02, True, ""),                 # under the limit
    (0.81, 0.02, True, ""),                 # over it, but within the run's own spread
    (0.85, 0.02, False, ""),                # over it by more than the spread
    (1.00, 0.01, False, "not faster"),      # an INT8 bundle no faster than FP32
    (0.50, 0.20, False, "too noisy"),       # a spread that cannot tell pass from fail
    (0.93, 0.08, False, "not faster"),      # under max 0.95 + spread, but not surely faster at all
])
def test_speed_ratio_is_judged_against_its_own_spread(ratio, spread, ok, why):
    from benchmark.gate import evaluate_gates
    g = {"model": "m", "bundles": {},
         "speed_ratio_max": [{"int8": "onnx_int8", "fp32": "onnx_sim_fp32",
                              "max": 0.95 if ratio > 0.9 and spread > 0.05 else 0.8}]}
    rows = [{"model": "m", "bundle": "x", "status": "ok"}]
    checks = [c for c in evaluate_gates(g, rows, [_pair(ratio, spread)]) if c.check == "speed int8/fp32"]
    assert len(checks) == 1 and checks[0].ok is ok and why in checks[0].measured
    # no pair record, or a pair of another exec hint, is a failure, never a pass
    g["speed_ratio_max"][0]["exec"] = "f32"
    checks = [c for c in evaluate_gates(g, rows, [_pair(0.5, 0.0)]) if c.check == "speed int8/fp32"]
    assert len(checks) == 1 and not checks[0].ok and "missing" in checks[0].measured


def test_paired_rounds_alternate_and_summarize():
    from benchmark.pairs import summarize
    from common import time_rounds
    order = []
    ms = time_rounds({"a": lambda _: order.append("a"), "b": lambda _: order.append("b")}, None,
                     rounds=4, calls=2, warmup=0)
    assert order == list("aabb" "bbaa" "aabb" "bbaa") and len(ms["a"]) == len(ms["b"]) == 4
    s = summarize([{"fast": [1.0, 1.0, 2.0], "base": [2.0, 2.0, 2.0]},
                   {"fast": [1.2, 1.0, 1.0], "base": [2.0, 2.0, 2.0]}])
    assert s["ratio"] == pytest.approx(0.5) and s["rounds"] == 6
    assert s["ratio_max"] == pytest.approx(1.0) and s["ratio_per_process"] == pytest.approx([0.5, 0.5])
    assert s["spread"] == pytest.approx((0.575 - 0.5) / 2)


def test_gate_without_a_finished_run_fails(tmp_path):
    from benchmark import gate
    res = CliRunner().invoke(gate.main, ["--run", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "run.json" in res.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text(json.dumps({"run_id": "x", "finished": None, "records": []}))
    res = CliRunner().invoke(gate.main, ["--run", str(tmp_path / "half")])
    assert res.exit_code == 1 and "did not finish" in res.output


def test_committed_gates_file_is_valid():
    from benchmark.gate import DEFAULT_GATES, load_gates
    g = load_gates(DEFAULT_GATES)
    assert g["model"] == Path(defaults.BUNDLES).name and g["bundles"]
    for pair in g.get("speed_ratio_max", []):
        assert pair["int8"] in g["bundles"] and pair["fp32"] in g["bundles"]


def test_timing_loop_is_capped_by_time_but_keeps_a_minimum():
    import time

    from common.util import MIN_RUNS, time_calls
    t = time_calls(lambda _: time.sleep(0.01), None, warmup=1, runs=1000, max_s=0.05)
    assert t["capped_by_time"] and MIN_RUNS <= t["runs"] < 1000 and t["runs_requested"] == 1000
    assert 10 <= t["median_ms"] <= t["p90_ms"]
    t = time_calls(lambda _: None, None, warmup=0, runs=7, max_s=10)
    assert t["runs"] == 7 and not t["capped_by_time"]


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_choices_come_from_the_registry(registered):
    from benchmark.run import main
    runner = CliRunner()
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    for name in ENGINES:
        assert name in res.output
    res = runner.invoke(main, ["--backend", "no_such_engine"])
    assert res.exit_code == 2 and "no_such_engine" in res.output
    # the benchmark's torch reference is one of its engines, but importing the benchmark leaves
    # the device registry (runtime.engines.ENGINES) alone
    from benchmark.torch_engine import bench_engines
    assert "torch" in bench_engines() and "torch" not in ENGINES and "torch" in res.output
    registered(FakeNPUEngine)   # a newly registered engine is a valid choice at once
    res = runner.invoke(main, ["--backend", "fake_npu", "--bundles", "/nonexistent/x",
                               "--wflw", "/nonexistent/wflw"])
    assert "not in" not in res.output and "nonexistent" in res.output


def test_engine_unavailable_is_the_registry_contract():
    ok, why = FakeNPUEngine.available()
    assert not ok and "pip install" in why
    with pytest.raises(EngineUnavailable):
        FakeNPUEngine(__file__)
