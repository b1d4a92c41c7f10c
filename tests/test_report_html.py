"""report.html as a person sees it: a real (tiny) benchmark run writes the page, headless
Chromium (Debian's `chromium`) opens it offline, and the page's own check (#report-check, see
benchmark/report_html.py) must report no script error and every chart decoded, with the deploy
table and the first chart on the first screen. The same check is shown to fail on a page with a
broken chart, a missing chart and a script error. Fast checks of the charts: 40 rows, linear
axes from zero, no label on a point, model names that never overlap.

Without Chromium the browser tests skip, unless LANDMARK_REQUIRE_BROWSER=1 (CI) makes them fail.
"""
from __future__ import annotations

import html
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from benchmark import charts as C

BROWSERS = ("chromium", "chromium-browser")
# without the networking flags headless Chromium waits on refused connections
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1440,900")
SETS = ("wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks")


def _chromium() -> str:
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        why = "headless Chromium is not installed (apt-get install chromium)"
        if os.environ.get("LANDMARK_REQUIRE_BROWSER") == "1":
            pytest.fail(why + "; LANDMARK_REQUIRE_BROWSER=1 requires it")
        pytest.skip(why + "; set LANDMARK_REQUIRE_BROWSER=1 to fail instead")
    return exe


def browser_check(page: Path) -> dict:
    """Open the page in headless Chromium; the attributes #report-check got after load."""
    exe = _chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        p = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                            page.resolve().as_uri()], check=False, capture_output=True, text=True,
                           timeout=120)
    m = re.search(r'<div id="report-check"([^>]*)>', p.stdout)
    assert m, f"no #report-check in the page Chromium rendered (exit {p.returncode}): {p.stderr[-600:]}"
    return {k: html.unescape(v) for k, v in re.findall(r'data-([\w-]+)="([^"]*)"', m.group(1))}


# -- a real run: the tiny model's torch reference, ONNX FP32 and INT8 bundles, a missing FP16
# -- bundle (a skipped row) and a peer (the same network as an external model file) ------------
def _int8(fp32: Path, dst: Path, faces) -> None:
    from dataclasses import replace

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from evaluation.metrics import face_batch
    from runtime.bundle import BundleMeta
    meta = BundleMeta.load(fp32)
    x = face_batch(faces, meta.preprocess, "rect")
    feed = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feed, None)
    dst.mkdir(parents=True)
    quantize_static(str(fp32 / "model.onnx"), str(dst / "model.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    meta.precision, meta.files = "int8", BundleMeta.files_of("model.onnx")
    meta.lineage = replace(meta.lineage, stage="onnx_int8")
    meta.write(dst)


@pytest.fixture(scope="module")
def tiny_report(tiny_checkpoint, wflw_faces, tmp_path_factory):
    from benchmark.core import BenchConfig, run
    from benchmark.targets import REPO_SPEC
    from evaluation.data import calibration_split
    from export.stages import export_all
    from runtime.engines import ENGINES
    if not ENGINES["onnxruntime"].available()[0]:
        pytest.skip("onnxruntime is not installed")
    root = tmp_path_factory.mktemp("report")
    bundles = root / "tiny"
    export_all(tiny_checkpoint, bundles, targets=["onnx_sim_fp32"], progress=lambda s: None)
    _int8(bundles / "onnx_sim_fp32", bundles / "onnx_int8", calibration_split(wflw_faces)[0][:16])
    cfg = BenchConfig(backends=("torch", "onnxruntime"), precisions=("fp32", "fp16", "int8"),
                      bundles=str(bundles), checkpoint=str(tiny_checkpoint), out=str(root / "bench"),
                      externals=((str(bundles / "onnx_sim_fp32" / "model.onnx"), str(REPO_SPEC)),),
                      threads=(1,), max_faces=6, warmup=2, runs=5, batch=4)
    records = run(cfg, echo=lambda s: None)
    return root / "bench", records


@pytest.mark.slow
def test_every_run_writes_a_page_that_loads_offline_with_every_chart(tiny_report):
    out, records = tiny_report
    page = out / "report.html"
    text = page.read_text()
    # self-contained: every image inline, nothing fetched
    assert re.findall(r'src="(?!data:)', text) == [] and "http://" not in text and "https://" not in text
    titles = re.findall(r'<img class="chart" id="[^"]+" alt="([^"]+)"', text)
    assert titles == ["Latency against NME", "Size against NME", "INT8 drift per backend",
                      "Cumulative error distribution"]
    for r in records:        # every row is in the deploy table, and its record link resolves
        assert f'href="records/{r["id"]}.json"' in text and (out / "records" / f"{r['id']}.json").is_file()
    skipped = [r for r in records if r["status"] == "skipped"]
    assert skipped and all(html.escape(r["reason"], quote=True) in text for r in skipped)
    assert 'class="tag peer"' in text and "pfld_as_external" in text
    assert "Fastest bundle within the INT8 drift budget" in text
    for name in ("latency_vs_nme.png", "size_vs_nme.png", "int8_drift.png", "ced.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    check = browser_check(page)
    assert check["errors"] == "" and check["broken"] == "", check
    assert check["images"] == check["expected"] == str(len(titles)) and check["ok"] == "1", check
    height = int(check["viewport"].split("x")[1])
    assert 0 <= int(check["table-top"]) < int(check["chart-top"]) < height, \
        f"the deploy table and the first chart are not both on the first screen: {check}"


@pytest.mark.slow
def test_the_check_fails_on_a_broken_or_missing_chart_and_a_script_error(tiny_report, tmp_path):
    from benchmark.records import load_run
    from benchmark.report_html import Chart, page
    out, _ = tiny_report
    man, records = load_run(out)
    good = (out / "latency_vs_nme.png").read_bytes()
    broken = tmp_path / "broken.html"
    broken.write_text(page(man, records, [Chart("a.png", "fine", good, ""),
                                          Chart("b.png", "not a PNG", b"<html>oops</html>", "")]))
    check = browser_check(broken)
    assert check["ok"] == "0" and check["broken"] == "chart-1" and check["images"] == "1", check

    text = (out / "report.html").read_text()
    missing = tmp_path / "missing.html"
    missing.write_text(re.sub(r'<img class="chart" id="chart-2"[^>]*>', "", text, count=1))
    check = browser_check(missing)
    assert check["ok"] == "0" and check["images"] == str(int(check["expected"]) - 1), check

    thrown = tmp_path / "thrown.html"
    thrown.write_text(text.replace("</header>", "</header><script>null.boom();</script>", 1))
    check = browser_check(thrown)
    assert check["ok"] == "0" and "null" in check["errors"], check


@pytest.mark.slow
def test_a_run_without_plots_still_has_the_deploy_table(tiny_report, tmp_path):
    from benchmark.report import render
    out, _ = tiny_report
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png", "report.html", "logs"))
    written = render(copy, plots=False)
    assert [p.name for p in written] == ["results.md", "report.html"]
    text = (copy / "report.html").read_text()
    assert '<table id="deploy">' in text and 'data-expected="0"' in text and "<img" not in text


# -- the charts themselves, on 40 rows ----------------------------------------------------------------
def _records(models=4, per_model=10) -> list[dict]:
    """40 ok rows shaped like records: four models with close NMEs (two of them 0.03 apart),
    the last one a peer; every engine and precision."""
    rng = np.random.default_rng(0)
    kinds = list(itertools.product(("onnxruntime", "openvino", "tflite"), ("fp32", "fp16", "int8")))
    out = []
    for m in range(models):
        base = [7.50, 9.60, 9.63, 12.0][m % 4]
        for b in range(per_model):
            backend, prec = kinds[b % len(kinds)]
            acc = {k: {"nme": (base + rng.normal(0, 0.05) - 3 * ("300w" in k)) / 100, "output": "wflw98",
                       "through_98_to_68": "300w" in k, "count": 100} for k in SETS}
            out.append({"id": f"m{m}_b{b}", "model": f"model_{m}", "bundle": f"{backend}_{prec}_{b}",
                        "backend": backend, "precision": prec, "device": "CPU", "threads": 1,
                        "kind": "external" if m == models - 1 else "bundle", "role": "", "status": "ok",
                        "exec_precision": {"hint": "default", "actual": None},
                        "latency": {"median_ms": float(rng.uniform(0.4, 2.5)), "p90_ms": 3.0},
                        "size_bytes": int(rng.uniform(5e5, 3e6)), "accuracy": acc, "drift": None,
                        "source": {}})
    return out


def test_forty_rows_draw_linear_axes_from_zero_without_overlapping_labels():
    from matplotlib.text import Text
    records = _records()
    dots = C.dots_of(records)
    panels = C.panels_of(dots, list(SETS))
    assert len(records) == 40 and len(dots) == 40 and [p.key for p in panels] == list(SETS)
    fig = C.scatter_figure(dots, panels, "ms", "ms", "t", {k: (0.3, 100) for k in SETS})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
        assert ax.get_ylim()[1] - ax.get_ylim()[0] > 5, "the NME axis is zoomed onto noise"
        names = [t.get_text() for t in ax.texts if t.get_text().startswith("model_")]
        assert sorted(names) == ["model_0", "model_1", "model_2", "model_3 (peer)"], names
        assert len(ax.texts) == 4 + 1       # a name per model and the noise note: no point labels
        boxes += [Text.get_window_extent(t, renderer) for t in ax.texts]   # the text, not its leader
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    C._plt().close(fig)


@pytest.mark.parametrize("ys", [[5.0] * 12, [0.0, 0.1, 0.2, 9.9, 10.0], list(np.linspace(3, 3.5, 30))])
def test_spread_keeps_order_bounds_and_gap(ys):
    lo, hi, gap = 0.0, 10.0, 0.3
    p = C.spread(ys, gap, lo, hi)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    q = [p[i] for i in order]
    need = min(gap, (hi - lo) / (len(ys) - 1))
    assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in p)
    assert all(b - a >= need - 1e-9 for a, b in itertools.pairwise(q))


def test_a_68_point_model_beside_98_point_ones_gets_its_own_panel():
    records = _records(models=2, per_model=2)
    for r in records[:2]:
        for k in SETS:
            r["accuracy"][k]["output"] = "300w68"
    for r in records[2:]:
        r["accuracy"]["wflw:test/rect@68"] = dict(r["accuracy"]["wflw:test/rect"], through_98_to_68=True)
    panels = C.panels_of(C.dots_of(records), ["wflw:test/rect"])
    assert [(p.key, p.only98) for p in panels] == [("wflw:test/rect", True), ("wflw:test/rect@68", False)]
    dots = C.dots_of(records)
    assert [p.nme(dots[0]) is None for p in panels] == [True, False]     # the 68-point model
    assert all(p.nme(dots[3]) is not None for p in panels)               # a 98-point one


def test_fallback_budget_is_quantizes_default():
    """report_html's budget when no INT8 meta.json is readable (benchmark/ does not import quantize/)."""
    from benchmark.report_html import DEFAULT_BUDGET
    from quantize.data import Settings
    assert DEFAULT_BUDGET == Settings().budget
