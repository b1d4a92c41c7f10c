"""quantize's escalation: plain PTQ -> the backend's better PTQ -> ops kept in float -> QAT (not
available yet), each step only when the one before misses the budget, every step recorded.

Fast: each registered backend names a better step; the histogram ranges (quantize.ranges) on
known distributions. Slow: PFLD-GhostOne imported from ../shared on onnxruntime, whose plain
INT8 drifts by a whole NME point because quantize_static gives the AveragePool outputs their
input's scale, escalates to the better step, which fixes that cause; the shipped student within
a loose budget stops at plain PTQ.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantize.backends import BACKENDS, OnnxRuntimeQuantizer, Options
from quantize.core import REPORT, Settings, run
from quantize.ranges import BINS, Histograms, best_range
from quantize.search import BETTER, FALLBACK, PLAIN, QAT

REPO = Path(__file__).resolve().parents[1]
GHOST = REPO.parent / "shared" / "teachers" / "pfld_ghostone" / "PFLD_GhostOne_112_1_opt_sim.onnx"
SPEC = REPO / "specs" / "pfld_ghostone.json"
GATES_ONLY = {"calib_samples": 64, "eval_sets": (), "latency_runs": 10, "warmup": 2}


# -- fast -----------------------------------------------------------------------------------------
def test_every_backend_names_a_better_step():
    for name, cls in BACKENDS.items():
        better = cls.better_options(Options())
        assert better is not None and better != Options(), name
        assert better.method in cls.methods and cls.better_note, name
    assert OnnxRuntimeQuantizer.better_options(Options()).graph_fixes
    # the step is skipped, not repeated, when the plain options already are the better ones
    for cls in BACKENDS.values():
        assert cls.better_options(cls.better_options(Options())) is None


def test_histogram_range_clips_a_long_tail_and_keeps_a_dense_range():
    rng = np.random.default_rng(0)
    tail = rng.laplace(0, 1, 200_000).astype(np.float32)     # long tails, as activations have
    h = Histograms({"a": (float(tail.min()), float(tail.max())), "b": (0.0, 6.0),
                    "c": (-4.0, 2.0)})
    h.add({"a": tail, "b": rng.uniform(0, 6, 50_000), "c": rng.uniform(-4, 2, 50_000)})
    r = h.ranges()
    p999 = float(np.percentile(np.abs(tail), 99.9))
    assert tail.min() < r["a"][0] < -p999 and p999 < r["a"][1] < tail.max()   # tails clipped
    assert r["b"] == pytest.approx((0.0, 6.0), abs=0.07)   # a uniform range is kept whole
    assert r["c"][0] == pytest.approx(-4.0, abs=0.07) and r["c"][1] == pytest.approx(2.0, abs=0.07)
    for lo, hi in r.values():
        assert lo <= 0.0 <= hi
    assert best_range(np.zeros(BINS, np.int64), -1.0, 1.0) == (-1.0, 1.0)


def test_cli_offers_the_histogram_method_and_the_escalation_switch():
    from quantize.run import main as cli
    opts = {p.name: p for p in cli.params}
    assert "histogram" in opts["method"].type.choices
    assert opts["escalate"].default is True and opts["graph_fixes"].default is False


# -- slow: real models, real faces ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ghost_onnx(tmp_path_factory):
    """PFLD-GhostOne imported (export.stages.import_model), its FP32 ONNX bundle alone."""
    import shutil

    from export.stages import import_model
    if not GHOST.is_file():
        pytest.fail(f"the teacher model is missing: {GHOST}")
    bundles = import_model(GHOST, SPEC, tmp_path_factory.mktemp("g1") / "import",
                           progress=lambda s: None)
    out = tmp_path_factory.mktemp("g1q") / "pfld_ghostone"
    shutil.copytree(bundles["onnx_sim_fp32"], out / "onnx_sim_fp32")
    return out


def _onnx(path: Path):
    import onnx
    from onnx import numpy_helper
    g = onnx.load(str(path)).graph
    return g, {i.name: numpy_helper.to_array(i) for i in g.initializer}, \
        {o: n for n in g.node for o in n.output}


@pytest.mark.slow
def test_ghostone_onnxruntime_escalates_to_the_better_step_that_fixes_the_pools(ghost_onnx):
    """Plain QDQ misses by a whole point (the cause: AveragePool outputs at their input's
    scale); the better step lands within a budget plain cannot meet, with no op kept float,
    and the report and meta.json say so."""
    from runtime.bundle import BundleMeta
    settings = Settings(budget=0.3, max_float_layers=0, **GATES_ONLY)
    report, failed = run(ghost_onnx, ["onnxruntime"], settings, log=lambda s: None)
    e = report["backends"]["onnxruntime"]
    assert not failed, e.get("reason")
    esc = e["escalation"]
    assert esc["path"] == f"{PLAIN} -> {BETTER}" and esc["taken"] == BETTER
    plain, better = esc["steps"]
    assert plain["step"] == PLAIN and not plain["within_budget"]
    assert min(plain["drift_points"].values()) > 0.5                # the pooled features
    assert better["within_budget"] and max(abs(v) for v in better["drift_points"].values()) <= 0.3
    assert better["options"]["method"] == "histogram" and better["options"]["graph_fixes"]
    assert plain["seconds"] > 0 and better["seconds"] > 0 and esc["seconds"] >= better["seconds"]
    assert e["layers_kept_float"] == [] and e["method"] == "histogram"
    # what the report says is what the bundle says
    on_disk = json.loads((ghost_onnx / REPORT).read_text())["backends"]["onnxruntime"]
    meta = BundleMeta.load(ghost_onnx / "onnx_int8")
    assert meta.quantization["escalation"] == on_disk["escalation"]
    assert meta.quantization["method"] == "histogram" and meta.quantization["graph_fixes"]
    assert e["nme"]["wflw:heldout/landmarks"]["drift_points"] == \
        pytest.approx(better["drift_points"]["wflw:heldout/landmarks"], abs=1e-9)
    s = meta.quantization["settings"]
    assert s["pools_own_range"] and s["float_outputs"] == [o.name for o in meta.outputs]
    # the written graph: no AveragePool output quantized at its input's scale, the outputs
    # float, the Concats copy int8 values (inputs of one scale); only the head's, where a Relu
    # output meets signed pooled features, requantizes that one input
    g, init, producer = _onnx(meta.model_file)
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    mixed = []
    for n in g.node:
        if n.op_type == "AveragePool":
            assert not any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))
        if n.op_type == "Concat":
            scales = {float(init[producer[i].input[1]].ravel()[0]) for i in n.input
                      if i in producer and producer[i].op_type == "DequantizeLinear"}
            if len(scales) > 1:
                mixed.append(n.name)
    assert sum(n.op_type == "Concat" for n in g.node) == 23 and len(mixed) <= 1, mixed
    for o in g.output:
        assert producer[o.name].op_type not in ("DequantizeLinear", "QuantizeLinear")


@pytest.mark.slow
def test_within_budget_stops_at_plain_ptq(shipped_checkpoint, tmp_path):
    """The better step runs only when plain PTQ misses: a loose budget keeps plain's bundle."""
    from export.stages import export_all
    out = tmp_path / "student"
    export_all(shipped_checkpoint, out, targets=["onnx_sim_fp32"], progress=lambda s: None)
    report, failed = run(out, ["onnxruntime"], Settings(budget=5.0, **GATES_ONLY),
                         log=lambda s: None)
    e = report["backends"]["onnxruntime"]
    assert not failed and e["escalation"]["path"] == PLAIN and e["escalation"]["taken"] == PLAIN
    assert [s["step"] for s in e["escalation"]["steps"]] == [PLAIN]
    assert e["method"] == "minmax" and not e["settings"]["graph_fixes"]
    assert FALLBACK not in e["escalation"]["path"] and QAT not in e["escalation"]["path"]
