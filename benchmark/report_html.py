"""report.html of a benchmark run: one self-contained page a person reads first (no network;
charts are PNG data URIs), written next to results.md by benchmark/report.py's render().

    from benchmark.report_html import build_charts, page
    charts = build_charts(man, records, out / "records")      # [] for --no-plots
    html = page(man, records, charts)

Top to bottom: host, command and versions; which bundle to deploy per model (the fastest within
the INT8 drift budget); the deploy table (one row per bundle and execution precision, median /
p90 ms per thread count, size, NME per set with the drift against the model's FP32 reference,
status with the skip or error reason, links to the JSON records); the charts of
benchmark/charts.py. An inline script checks the page once it has loaded (script errors, every
chart image decoded) and writes the result into #report-check, which tests/test_report_html.py
reads through headless Chromium.
"""
from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark import charts as C
from benchmark.records import load_arrays
from evaluation.sets import short_of
from runtime.bundle import BundleMeta
from runtime.errors import LandmarkError

REPO = Path(__file__).resolve().parents[1]
# quantize's default budget (quantize/data.py Settings.budget), used only when no INT8 bundle of
# the run can be read for the budget it was quantized under
DEFAULT_BUDGET = 0.10


@dataclass
class Chart:
    file: str          # also written next to results.md
    title: str
    png: bytes
    caption: str


@dataclass
class Budget:
    points: float      # allowed |INT8 NME - FP32 NME| in NME points
    gated: list[str]   # the sets it applies to (all sets when unknown)
    source: str


def budget_of(records: list[dict], sets: list[str]) -> Budget:
    """The INT8 drift budget the run's INT8 bundles were quantized under (their meta.json)."""
    for r in records:
        path = (r.get("source") or {}).get("path")
        if r["precision"] != "int8" or r.get("kind") != "bundle" or not path:
            continue
        for folder in (Path(path).parent, (REPO / path).parent):    # source.path: the model file
            try:
                v = BundleMeta.load(folder, verify=False).validation
            except (LandmarkError, OSError, ValueError):
                continue
            if "budget_points" in v:
                gated = [k for k in v.get("gated", []) if k in sets] or list(sets)
                return Budget(float(v["budget_points"]), gated, f"{r['model']}/{r['bundle']}/meta.json")
    return Budget(DEFAULT_BUDGET, list(sets), "quantize's default; no INT8 meta.json was readable")


def within(dot: C.Dot, budget: Budget) -> bool:
    """Within the budget on every gated set (a row without drift there is its own reference)."""
    return all(abs(dot.drift[k]["nme_delta"] * 100) <= budget.points + 1e-9
               for k in budget.gated if "nme_delta" in dot.drift.get(k, {}))


def _arrays(rec: dict, rec_dir: Path, cache: dict) -> dict:
    f = rec.get("nme_file")
    if f not in cache:
        cache[f] = load_arrays(rec_dir / f) if f else {}
    return cache[f]


def _per_face(dot: C.Dot, p: C.Panel, rec_dir: Path, cache: dict):
    if not p.entry(dot):
        return None
    a = _arrays(dot.rec, rec_dir, cache)
    return a.get(f"{p.key}|nme", a.get(f"{p.key.split('@')[0]}|nme"))


def noise_of(dots, panels, rec_dir: Path, cache: dict) -> dict[str, tuple[float, int]]:
    """Panel key -> (95 % half-width of a set mean NME in points, faces), median over the dots."""
    out = {}
    for p in panels:
        per = [x for x in (_per_face(d, p, rec_dir, cache) for d in dots) if x is not None and len(x) > 1]
        if per:
            out[p.key] = (statistics.median(1.96 * float(np.std(x, ddof=1)) / len(x) ** 0.5 * 100 for x in per),
                          len(per[0]))
    return out


def build_charts(man: dict, records: list[dict], rec_dir: Path) -> list[Chart]:
    """Every chart of the page, drawn from the records (and their per-face NME files)."""
    dots = C.dots_of(records)
    sets = C.scored_sets(records, man)
    panels = C.panels_of(dots, sets)
    if not dots or not panels:
        return []
    cache: dict = {}
    noise = noise_of(dots, panels, rec_dir, cache)
    thr = dots[0].threads
    at = f"{thr} thread{'s' if thr != 1 else ''}" if thr else "batch 1"
    out = [Chart("latency_vs_nme.png", "Latency against NME", C.scatter_chart(
        dots, panels, "ms", f"median batch-1 latency (ms, {at})",
        "Latency against accuracy, one dot per bundle (lower left is better)", noise),
        f"Linear axes from zero, median batch-1 engine latency at {at}. The \u00b1 figure in each "
        "panel is the 95 % interval of a set mean: bundles closer than that are not ranked by the set.")]
    if any(d.size_mb for d in dots):
        out.append(Chart("size_vs_nme.png", "Size against NME", C.scatter_chart(
            dots, panels, "size_mb", "size on disk, all files of the bundle (MB)",
            "Size against accuracy, one dot per bundle (lower left is better)", noise),
            "Size: every file of the bundle folder, meta.json included."))
    budget = budget_of(records, [k for k in sets if "@" not in k])
    note = ", ".join(short_of(k) for k in budget.gated)
    png = C.drift_chart(dots, [k for k in sets if "@" not in k], budget.points, f"applies to {note}")
    if png:
        out.append(Chart("int8_drift.png", "INT8 drift per backend", png,
                         f"Budget from {budget.source}. Drift on a set the budget does not name is "
                         "reported, not gated."))
    curves = _ced_curves(records, dots, panels, rec_dir, cache)
    if any(c[2] for c in curves):
        out.append(Chart("ced.png", "Cumulative error distribution", C.ced_chart(panels, curves),
                         "Per model: its FP32 reference (solid) and each INT8 bundle (dashed). Every row's "
                         "curve: ced_*.png next to this page."))
    return out


def _ced_curves(records, dots, panels, rec_dir: Path, cache: dict) -> list[tuple[str, bool, dict]]:
    """Per model: its reference row (else its first FP32 bundle), then each INT8 bundle, as
    (name, is INT8, {panel key: per-face NME})."""
    curves = []
    for model in dict.fromkeys(d.model for d in dots):
        ref = next((r for r in records if r["model"] == model and r.get("role") == "reference"
                    and r["status"] == "ok"), None)
        mine = [d for d in dots if d.model == model]
        first = C.Dot.of(ref) if ref else next((d for d in mine if d.precision == "fp32"), None)
        for d, int8 in [(first, False)] + [(d, True) for d in mine if d.precision == "int8"]:
            if d is not None:
                per = {p.key: _per_face(d, p, rec_dir, cache) for p in panels}
                curves.append((model + (" (peer)" if d.peer else ""), int8,
                               {k: v for k, v in per.items() if v is not None}))
    return curves


@dataclass
class Row:
    """One line of the deploy table: a bundle at one device and execution precision, every
    thread count's record."""
    recs: list[dict]

    @property
    def first(self) -> dict:
        return next((r for r in self.recs if r["status"] == "ok"), self.recs[0])

    @property
    def ok(self) -> bool:
        return self.first["status"] == "ok"

    def at(self, threads) -> dict | None:
        return next((r for r in self.recs if r.get("threads") == threads and r.get("latency")), None)


def deploy_rows(records: list[dict]) -> tuple[list[Row], list]:
    """(rows, thread counts): per model in run order its reference, then the ok rows by median ms
    at the first thread count; every skipped or failed row after all of them."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["bundle"], r["device"], r["exec_precision"]["hint"]), []).append(r)
    rows = [Row(v) for v in groups.values()]
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    t0 = threads[0] if threads else None
    models = list(dict.fromkeys(r["model"] for r in records))

    def key(row):
        lat = (row.at(t0) or {}).get("latency") or {}
        return (not row.ok, models.index(row.first["model"]) if row.ok else 0,
                row.first.get("role") != "reference", lat.get("median_ms", float("inf")))
    return sorted(rows, key=key), threads


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _exec(rec: dict) -> str:
    ex = rec["exec_precision"]
    if ex.get("actual"):
        return f"{ex['actual']}" + (" (default)" if ex["hint"] == "default" else "")
    return ex["hint"] if ex["hint"] != "default" else ""


def _link(rec: dict, text: str) -> str:
    return f'<a href="records/{_e(rec["id"])}.json">{text}</a>'


def _nme_cell(a: dict | None, drift: dict, k: str, mark68: bool, budget: Budget) -> str:
    """NME % of one set, a 68 mark where the column is otherwise 98 points, and the drift."""
    if not a:
        return ""
    pts = '<sup title="68 points: this model has no 98-point output">68</sup>' \
        if mark68 and C.points_of(a) == 68 else ""
    d = drift.get(k, {}).get("nme_delta")
    if d is None:
        return f"{a['nme'] * 100:.2f}{pts}"
    over = " over" if k in budget.gated and abs(d * 100) > budget.points + 1e-9 else ""
    v = f"{d * 100:+.2f}" if abs(d * 100) >= 0.005 else "0.00"
    return (f'{a["nme"] * 100:.2f}{pts} <small class="d{over}" '
            f'title="NME minus the FP32 reference\'s, points">{v}</small>')


def _table(records: list[dict], sets: list[str], budget: Budget) -> str:
    rows, threads = deploy_rows(records)
    mark68 = {k: any(C.points_of(r["accuracy"][k]) == 98 for r in records if k in (r.get("accuracy") or {}))
              for k in sets}
    head = (["model", "bundle", "engine", "precision", "exec"]
            + [f"ms, {t} thread{'s' if t > 1 else ''}<br><small>median / p90</small>" for t in threads]
            + ["size MB"] + [f"{_e(short_of(k))}<br><small>NME % / drift</small>" for k in sets]
            + ["shift px", "status"])
    out = ['<table id="deploy"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        r = row.first
        tags = ' <span class="tag peer">peer</span>' if C.is_peer(r) else ""
        ref = ' <span class="tag">ref</span>' if r.get("role") == "reference" else ""
        cells = [f"<td>{_e(r['model'])}{tags}</td>", f"<td>{_link(r, _e(r['bundle']))}{ref}</td>",
                 f"<td>{_e(r['backend'])}</td>", f"<td>{_e(r['precision'])}</td>"]
        if not row.ok:     # the reason spans the figures it has none of
            out.append(f'<tr class="{_e(r["status"])}">' + "".join(cells)
                       + f'<td class="st" colspan="{len(head) - 4}"><b>{_e(r["status"])}</b>: '
                       f'{_e(r.get("reason") or "")}</td></tr>')
            continue
        cells.append(f"<td>{_e(_exec(r))}</td>")
        for t in threads:
            x = row.at(t)
            ms = f"{x['latency']['median_ms']:.2f} / {x['latency']['p90_ms']:.2f}" if x else ""
            cells.append(f"<td>{_link(x, ms)}</td>" if x else "<td></td>")
        cells.append(f"<td>{r['size_bytes'] / 1e6:.2f}</td>" if r.get("size_bytes") else "<td></td>")
        acc, drift = r.get("accuracy") or {}, (r.get("drift") or {}).get("sets") or {}
        cells += [f"<td>{_nme_cell(acc.get(k), drift, k, mark68[k], budget)}</td>" for k in sets]
        shift = (r.get("drift") or {}).get("max_shift_px")
        cells.append("<td>ref</td>" if r.get("role") == "reference"
                     else f"<td>{shift:.3f}</td>" if shift is not None else "<td></td>")
        out.append("<tr>" + "".join(cells) + "<td>ok</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _pick(records: list[dict], sets: list[str], budget: Budget) -> str:
    """Per model: the fastest bundle within the budget, beside its fastest FP32 bundle."""
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    dots = [C.Dot.of(r) for r in records if r["status"] == "ok" and r.get("latency")
            and r.get("kind") != "checkpoint" and r.get("threads") == (threads[0] if threads else None)]
    lines = []
    head = sets[0] if sets else None
    for model in dict.fromkeys(d.model for d in dots):
        mine = sorted((d for d in dots if d.model == model), key=lambda d: d.ms)
        ok = [d for d in mine if within(d, budget)]
        if not ok:
            continue
        d = ok[0]
        a = C.figure(d.accuracy, head) if head else {}
        ex = d.rec["exec_precision"].get("actual")
        s = (f"<b>{_e(model)}</b>{' (peer)' if d.peer else ''}: <b>{_e(d.bundle)}</b> "
             f"({_e(d.backend)} {_e(d.precision)}{', exec ' + _e(ex) if ex else ''}), {d.ms:.2f} ms")
        s += f", {d.size_mb:.2f} MB" if d.size_mb else ""
        s += f", NME {a['nme'] * 100:.2f} % on {_e(short_of(head))}" if a else ""
        fp32 = next((x for x in mine if x.precision == "fp32"), None)
        if fp32 is not None and fp32 is not d:
            fx = fp32.rec["exec_precision"].get("actual")
            s += (f"; fastest FP32: {_e(fp32.bundle)}{' (exec ' + _e(fx) + ')' if fx else ''} "
                  f"{fp32.ms:.2f} ms ({fp32.ms / d.ms:.1f} x slower)")
        lines.append(f"<li>{s}</li>")
    if not lines:
        return ""
    thr = dots[0].threads
    return (f'<section id="pick"><h2>Fastest bundle within the INT8 drift budget, per model '
            f'<small>({f"{thr} thread" + ("s" if thr != 1 else "") if thr else "batch 1"}, '
            f"|drift| \u2264 {budget.points:.2f} NME points on "
            f"{_e(', '.join(short_of(k) for k in budget.gated))})</small></h2><ul>"
            + "".join(lines) + "</ul></section>")


def _header(man: dict, records: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in records))
    peers = {r["model"] for r in records if C.is_peer(r)}
    names = ", ".join(_e(m) + (" (peer)" if m in peers else "") for m in models) or "?"
    hi = man.get("host_info") or {}
    cpu = (f"{hi.get('cpu', '?')} [{' '.join(hi.get('cpu_flags', []))}], {hi.get('cores', '?')} cores"
           if hi else man.get("host", "?").split(";")[0])
    load = hi.get("load_avg")
    pk = hi.get("packages") or {}
    versions = "; ".join(f"{_e(k)} {_e(v)}" for k, v in pk.items()) or _e(man.get("host", ""))
    return (f"<header><h1>Benchmark of {names}</h1><p class=meta>run <code>{_e(man.get('run_id'))}</code> "
            f"&middot; {_e(man.get('started', '')[:16].replace('T', ' '))} &middot; {_e(man.get('wall_s', '?'))} s "
            f"&middot; {_e(cpu)}{f' &middot; load {load[0]:.2f}' if load else ''} &middot; "
            f"Python {_e(hi.get('python', '?'))}, {_e(hi.get('os', ''))}</p>"
            f"<details><summary>command and versions</summary><p><code>{_e(man.get('command', ''))}</code></p>"
            f"<p>{versions}</p></details></header>")


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:12px 18px;color:#1d1d1f}
h1{font-size:19px;margin:0 0 2px}h2{font-size:15px;margin:12px 0 4px}h2 small{font-weight:normal;color:#555}
.meta{margin:0;color:#444;font-size:12.5px}details{font-size:12px;color:#444}summary{cursor:pointer}
#pick ul{margin:2px 0;padding-left:20px}#pick li{margin:1px 0}
.scroll{max-height:max(200px,calc(100vh - 470px));overflow:auto;border:1px solid #ddd}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th{position:sticky;top:0;background:#f2f2f4;text-align:left;font-weight:600;z-index:1}
th,td{padding:2px 6px;border-bottom:1px solid #eee;white-space:nowrap;vertical-align:top}
td.st{white-space:normal}tr.skipped td{color:#777}tr.error td{color:#a40000}
small.d{color:#666}small.d.over{color:#c00;font-weight:600}sup{color:#06c}
.tag{font-size:10.5px;border:1px solid #999;border-radius:3px;padding:0 3px;color:#444}
.tag.peer{border-color:#c60;color:#c60}
img.chart{max-width:100%;height:auto;display:block;margin:4px 0}
.note{font-size:12.5px;color:#444;margin:2px 0 10px}a{color:#05a}
#report-check{display:none}
"""

# first in <head>: collects script errors and failed resources from then on
HOOK = """<script>(function(){var e=window.__reportErrors=[];
window.addEventListener('error',function(ev){var t=ev.target;
if(t&&t!==window&&t.tagName){e.push('failed to load '+t.tagName.toLowerCase()+(t.id?' #'+t.id:''));}
else{e.push((ev.message||'script error')+(ev.lineno?' (line '+ev.lineno+')':''));}},true);
window.addEventListener('unhandledrejection',function(ev){e.push('unhandled rejection: '+ev.reason);});})();
</script>"""

# last in <body>: after load, every chart image decoded, no error: #report-check[data-ok=1]
CHECK = """<script>window.addEventListener('load',function(){
var box=document.getElementById('report-check'),errs=window.__reportErrors||['error hook missing'];
var loaded=0,broken=[];document.querySelectorAll('img.chart').forEach(function(i){
if(i.complete&&i.naturalWidth>0&&i.naturalHeight>0){loaded++;}else{broken.push(i.id||'?');}});
var expected=parseInt(box.getAttribute('data-expected'),10);
var top=function(el){return el?Math.round(el.getBoundingClientRect().top+window.scrollY):-1;};
box.setAttribute('data-images',String(loaded));box.setAttribute('data-broken',broken.join(' '));
box.setAttribute('data-errors',errs.join(' | '));
box.setAttribute('data-table-top',String(top(document.getElementById('deploy'))));
box.setAttribute('data-chart-top',String(top(document.querySelector('.chart'))));
box.setAttribute('data-viewport',window.innerWidth+'x'+window.innerHeight);
box.setAttribute('data-ok',errs.length===0&&broken.length===0&&loaded===expected?'1':'0');});
</script>"""


def page(man: dict, records: list[dict], charts: list[Chart]) -> str:
    sets = [k for k in C.scored_sets(records, man) if "@" not in k]
    budget = budget_of(records, sets)
    body = [_header(man, records), _pick(records, sets, budget),
            ('<section><h2>Deploy table <small>(one row per bundle and execution precision; NME % '
             'per set with the drift against the model\'s FP32 reference in points, red: over the '
             'budget; shift: mean point shift from the reference, px)</small></h2>'),
            f'<div class="scroll">{_table(records, sets, budget)}</div></section>']
    if charts:
        for i, c in enumerate(charts):
            src = "data:image/png;base64," + base64.b64encode(c.png).decode("ascii")
            body.append(f'<section><h2>{_e(c.title)}</h2><img class="chart" id="chart-{i}" '
                        f'alt="{_e(c.title)}" src="{src}"><p class="note">{_e(c.caption)}</p></section>')
    else:
        body.append('<p class="note">No charts: the run was rendered without plots (--no-plots), '
                    'or no row has both a latency and an accuracy.</p>')
    recs = " ".join(_link(r, _e(r["id"])) for r in records)
    body.append(f'<section id="records"><h2>Records</h2><p class="note"><a href="run.json">run.json</a> '
                f'&middot; <a href="results.md">results.md</a> (every figure, per set and subset) &middot; '
                f"one JSON per row: {recs}</p></section>")
    body.append(f'<div id="report-check" data-expected="{len(charts)}"></div>')
    title = f"Benchmark {man.get('run_id', '')}"
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width'><title>{_e(title)}</title>{HOOK}"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + f"\n{CHECK}</body></html>\n")


__all__ = ["DEFAULT_BUDGET", "Budget", "Chart", "budget_of", "build_charts", "deploy_rows", "page", "within"]
