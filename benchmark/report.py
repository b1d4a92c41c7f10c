"""Render a benchmark run's records to results.md, report.html and PNG plots (matplotlib Agg,
atomic writes); the page and its charts: benchmark/report_html.py, benchmark/charts.py.

    from benchmark.report import render
    render("artifacts/pfld68_w05/benchmark")     # also: python benchmark/run.py --report-only

Everything here reads the records (and their per-face NME .npz), never a model, so a report
can be re-rendered from a finished run at any time.
"""
from __future__ import annotations

import io
from pathlib import Path

from benchmark.charts import figure as _figure
from benchmark.charts import scored_sets as _sets
from benchmark.records import label as row_label
from benchmark.records import load_arrays, load_run
from evaluation.sets import short_of, title_of
from runtime.bundle import atomic_write_bytes, atomic_write_text


def _labeler(records: list[dict]):
    """label(row): the row's label, prefixed with its model when the run has several."""
    multi = len({r["model"] for r in records}) > 1
    return lambda r: (f"{r['model']}/" if multi else "") + row_label(r)


def _f(v, fmt="{:.2f}", scale=1.0):
    return "-" if v is None else fmt.format(v * scale if scale != 1.0 else v)


def _distinct(records: list[dict]) -> list[dict]:
    """One ok row per (model, bundle, device, exec hint): accuracy does not depend on threads."""
    seen, out = set(), []
    for r in records:
        key = (r["model"], r["bundle"], r["device"], r["exec_precision"]["hint"])
        if r["status"] == "ok" and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def markdown(man: dict, records: list[dict]) -> str:
    label = _labeler(records)
    cfg = man.get("config", {})
    sets = _sets(records, man)
    models = list(dict.fromkeys(r["model"] for r in records))
    lines = [f"# Benchmark of {', '.join(models) or '?'}", "",
             f"Run `{man['run_id']}` started {man['started']}, finished {man.get('finished')}"
             f" ({man.get('wall_s', '?')} s).  ",
             f"Command: `{man.get('command', '')}`  ",
             f"Host: {man['host']}", "",
             "How to read it:",
             f"- **median / p90 ms**: engine call on one real face crop (batch 1), {cfg.get('runs')} timed "
             f"runs after {cfg.get('warmup')} warm-up runs (`*`: fewer, stopped by the {cfg.get('max_seconds')} s time cap; the record has the count); preprocessing excluded. **pipeline ms**: "
             "crop + normalise + inference + decode for one face (runtime code). **faces/s**: batch "
             f"{cfg.get('batch')} throughput (\"-\" when the model has a static batch).",
             "- **exec**: execution precision the latency was measured with. OpenVINO rows come in "
             "pairs: `default` = the device's own choice (bf16 on CPUs with AVX512-bf16/AMX), `f32` = "
             "INFERENCE_PRECISION_HINT f32; the column shows what the device reported. Other engines "
             "run the model's own precision (\"-\").",
             "- **size**: all files of the bundle (model, side files, meta.json). **load s**: building "
             "the engine a second time in the process (cold first-load time is in the record). "
             "**peak RSS MB**: kernel peak resident set over load + inference minus the resident set "
             "before the engine was built, in a fresh process per row (engine library included).",
             "- **NME** (%): mean point error / outer-eye-corner distance, each set scored with the "
             "model's native output for it (all 98 points on WFLW where the model has them). A 68-point "
             "output is scored on WFLW, and a 98-point-only model on 300-W, through the standard "
             "98 -> 68 index map. Columns `... 68` (`@68` keys): the 68-point figure on WFLW (the "
             "68-point head, or the 98 points mapped), comparable with a 68-point model's. WFLW = "
             "test faces (INT8 calibrates on WFLW train faces: `wflw:calib`); `held` = held-out training "
             "faces (selection only, never trained on); `rect` = crop "
             "from the official face rectangle (what a detector gives), `lmk` = crop from the "
             "ground-truth landmark extent. FR / AUC at NME 0.10.",
             "- **drift**: against the model's reference row (`(ref)`: the torch FP32 checkpoint, or "
             "for an imported model its FP32 ONNX bundle) on the same faces and crops: largest |NME "
             "difference| over the sets (percentage points) and mean point shift in image pixels "
             "(largest over the sets).",
             "- Absolute times depend on the machine and its load; compare rows of one run, and "
             "gate on ratios (benchmark/gate.py).", "",
             "## Results", ""]
    head = (["model"] if len(models) > 1 else []) + ["bundle", "backend", "prec", "device", "exec", "thr", "status", "median ms", "p90 ms",
            "faces/s", "pipeline ms", "size KB", "load s", "peak RSS MB"] + \
        [f"NME {short_of(s)}" for s in sets] + ["drift NME pp", "shift px"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ok = r["status"] == "ok"
        lat, thr = r.get("latency") or {}, r.get("throughput") or {}
        ex = r["exec_precision"]
        exec_s = (ex.get("actual") or ex["hint"]) if ex.get("actual") or ex["hint"] != "default" else "-"
        if ex.get("actual") and ex["hint"] != "default":
            exec_s = f"{ex['actual']} (hint {ex['hint']})"
        elif ex.get("actual"):
            exec_s = f"{ex['actual']} (default)"
        d = r.get("drift") or {}
        acc = r.get("accuracy") or {}
        row = ([r["model"]] if len(models) > 1 else []) + [
               r["bundle"] + (" (ref)" if r.get("role") == "reference" else ""), r["backend"],
               r["precision"], r["device"], exec_s, _f(r.get("threads"), "{}"),
               r["status"] if ok else f"**{r['status']}**",
               _f(lat.get("median_ms")) + ("*" if lat.get("capped_by_time") else ""), _f(lat.get("p90_ms")), _f(thr.get("faces_per_s"), "{:.0f}"),
               _f((r.get("pipeline_latency") or {}).get("median_ms")),
               _f(r.get("size_bytes"), "{:.0f}", 1 / 1024), _f(r.get("load_s"), "{:.3f}"),
               _f(r.get("peak_rss_mb"), "{:.1f}")]
        row += [_f(_figure(acc, s).get("nme"), "{:.2f}", 100) for s in sets]
        row += [_f(d.get("max_abs_nme_delta"), "{:.3f}", 100), _f(d.get("max_shift_px"), "{:.3f}")]
        lines.append("| " + " | ".join(row) + " |")

    distinct = _distinct(records)
    if distinct:
        lines += ["", "## Accuracy per evaluation set", "",
                  "One row per model and execution precision (accuracy does not depend on threads).", "",
                  "Shift: distance of each point from the reference row's point on the same face, in image "
                  "pixels (mean over faces; worst face) and in NME units (% of the outer-eye distance).", "",
                  "| row | set | faces | NME % | FR % | AUC | NME diff vs ref (pp) | mean shift px | worst face shift px | shift % iod |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in distinct:
            for key, a in r["accuracy"].items():
                ds = ((r.get("drift") or {}).get("sets") or {}).get(key, {})
                lines.append(f"| {label(r)} | {title_of(key)} | {a['count']} | "
                             f"{a['nme'] * 100:.2f} | {a['fr'] * 100:.1f} | {a['auc']:.3f} | "
                             f"{_f(ds.get('nme_delta'), '{:+.3f}', 100)} | {_f(ds.get('shift_px'), '{:.3f}')} | "
                             f"{_f(ds.get('shift_px_max'), '{:.3f}')} | {_f(ds.get('shift_iod'), '{:.3f}', 100)} |")
        attrs = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
        lines += ["", "## WFLW attribute subsets (NME %, evaluation faces)", "",
                  "| row | protocol | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs)]
        for r in distinct:
            for key, a in r["accuracy"].items():
                if "subsets" in a:
                    sub = a["subsets"]
                    cells = [f"{sub[k]['nme'] * 100:.2f} ({sub[k]['count']})" if k in sub else "-" for k in attrs]
                    lines.append(f"| {label(r)} | {a.get('protocol')} | " + " | ".join(cells) + " |")
        conf = [(r, key, a["confidence"]) for r in distinct for key, a in r["accuracy"].items()
                if a.get("confidence")]
        if conf:
            lines += ["", "## Per-point confidence (heatmap outputs)", "",
                      "How well the runtime's per-point p (heatmap peak) flags points off by more than "
                      "0.10 of the outer-eye distance: ROC AUC of 1 - p (0.5: no information, 1.0: every "
                      "bad point below every good one), over all faces and the WFLW occlusion faces.", "",
                      "| row | set | points | bad points | AUC | mean p good / bad | occlusion: bad points | occlusion AUC |",
                      "|---|---|---|---|---|---|---|---|"]
            for r, key, c in conf:
                occ = c.get("occlusion") or {}
                lines.append(f"| {label(r)} | {title_of(key)} | {c['points']} | {c['bad_points']} | "
                             f"{_f(c.get('auc_flag_bad'), '{:.3f}')} | {_f(c.get('mean_p_good'), '{:.3f}')} / "
                             f"{_f(c.get('mean_p_bad'), '{:.3f}')} | {occ.get('bad_points', '-')} | "
                             f"{_f(occ.get('auc_flag_bad'), '{:.3f}')} |")
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        lines += ["", "## Skipped and failed rows", "", "| row | status | reason |", "|---|---|---|"]
        for r in bad:
            lines.append(f"| {label(r)} ({r['backend']} {r['precision']}) | {r['status']} | "
                         f"{str(r['reason']).replace('|', '/')} |")
    lines += ["", ("Records: `records/*.json` (one per row). Page: report.html (deploy table and charts). "
                   "Plots: latency_vs_nme.png, size_vs_nme.png, int8_drift.png, ced.png, sizes.png, ced_*.png."),
              ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_sizes(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = {}
    for r in records:
        if r.get("size_bytes") and (r["model"], r["bundle"]) not in sizes:
            sizes[(r["model"], r["bundle"])] = (r["size_bytes"], r["backend"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(sizes)) + 1), dpi=100)
    backends = sorted({b for _, b in sizes.values()})
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    names = [f"{m}/{b}" if m != records[0]["model"] else b for m, b in sizes]
    vals = [v / 1024 for v, _ in sizes.values()]
    ax.barh(names, vals, color=[colors[b] for _, b in sizes.values()])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.0f} KB", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("size on disk, all files of the bundle (KB)")
    ax.set_xlim(0, max(vals + [1]) * 1.25)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends], labels=backends,
              fontsize=8, loc="lower right")
    ax.set_title("Model size")
    _save(fig, path)


def plot_ceds(records: list[dict], rec_dir: Path, out: Path) -> list[Path]:
    label = _labeler(records)
    from evaluation.metrics import plot_ced
    written = []
    # one curve per model file, at the execution precision a deployment gets by default
    # (the f32-pinned OpenVINO rows are in the tables), so the colours stay distinguishable
    seen, distinct = set(), []
    for r in _distinct(records):
        if r.get("nme_file") and (r["model"], r["bundle"]) not in seen:
            seen.add((r["model"], r["bundle"]))
            distinct.append(r)
    arrays = {r["id"]: load_arrays(rec_dir / r["nme_file"]) for r in distinct}
    for key in _sets(records):
        curves = {label(r): arrays[r["id"]][f"{key}|nme"] for r in distinct if f"{key}|nme" in arrays[r["id"]]}
        if curves:
            path = out / f"ced_{key.replace(':', '_').replace('/', '_').replace('@', '_at')}.png"
            plot_ced(curves, path, title=f"CED: {title_of(key)}")
            written.append(path)
    return written


def render(out: str | Path, plots: bool = True) -> list[Path]:
    """Write results.md, report.html (and the plots) for the finished run in `out`; returns the
    paths. Without plots report.html still has the deploy table."""
    from benchmark.report_html import build_charts, page
    out = Path(out)
    man, records = load_run(out)
    atomic_write_text(out / "results.md", markdown(man, records))
    written = [out / "results.md"]
    charts = build_charts(man, records, out / "records") if plots else []
    for c in charts:
        atomic_write_bytes(out / c.file, c.png)
        written.append(out / c.file)
    if plots and any(r.get("size_bytes") for r in records):
        plot_sizes(records, out / "sizes.png")
        written.append(out / "sizes.png")
    if plots:
        written += plot_ceds(records, out / "records", out)
    atomic_write_text(out / "report.html", page(man, records, charts))
    return written + [out / "report.html"]
