"""Charts of one benchmark run that answer "which bundle do I deploy on this CPU": latency and
size against NME per evaluation set, the INT8 drift per backend against its budget, and CED
curves; each a PNG (matplotlib Agg) drawn from the records alone.

    from benchmark.charts import dots_of, panels_of, scatter_chart
    dots = dots_of(records)
    png = scatter_chart(dots, panels_of(dots), "ms", "median batch-1 latency (ms)", "...")

One dot per bundle (model, bundle, device) at the run's first thread count and at the execution
precision a deployment gets by default (the f32-pinned OpenVINO rows are in the tables); the
torch checkpoint is the reference the drift is measured against, not a bundle, and is left out.
Colour is the engine, the marker the precision, a hollow marker a peer (an imported or external
model). Models are named once per panel in its right margin, spread so that no two names
overlap; no point carries a label. Both axes are linear and start at zero, so a 0.03-point
difference never fills an axis. A panel shows one kind of figure: where a 68-point-only model
sits beside 98-point models, a WFLW set gets a 98-point panel and a 68-point one.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from benchmark.measure import EVAL_SETS
from evaluation.sets import title_of

ENGINE_ORDER = ("onnxruntime", "openvino", "tflite", "torch")   # fixed colours across runs
MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
DPI = 100


def figure(acc: dict, key: str) -> dict:
    """A row's figure for a column; a 68-point-only model's WFLW figure is its "@68" one."""
    if key in acc or not key.endswith("@68"):
        return acc.get(key, {})
    base = acc.get(key[:-3], {})
    return base if base.get("output") == "300w68" else {}


def scored_sets(records: list[dict], man: dict | None = None) -> list[str]:
    """The scored-set keys of a run, in the configured order, each followed by its "@68"
    figure where some row has one."""
    base = list((man or {}).get("config", {}).get("eval_sets") or EVAL_SETS)
    seen = [k for r in records for k in (r.get("accuracy") or {})]
    out = []
    for b in base + [k.split("@")[0] for k in seen]:
        for k in (b, b + "@68"):
            if k in seen and k not in out:
                out.append(k)
    return out


def points_of(entry: dict) -> int:
    """How many points a figure is scored on: 68 for a 68-point output or the 98 -> 68 map."""
    return 68 if entry.get("output") == "300w68" or entry.get("through_98_to_68") else 98


def is_peer(rec: dict) -> bool:
    """An imported model (its bundles name an outside source model) or an external file."""
    return rec.get("kind") == "external" or bool((rec.get("source") or {}).get("source_model"))


@dataclass
class Dot:
    """One bundle as the charts draw it (see the module docstring for which record)."""
    rec: dict
    model: str
    bundle: str
    backend: str
    precision: str
    peer: bool
    ms: float | None
    size_mb: float | None
    threads: int | None
    accuracy: dict = field(default_factory=dict)
    drift: dict = field(default_factory=dict)      # the record's drift["sets"]

    @classmethod
    def of(cls, r: dict) -> Dot:
        return cls(r, r["model"], r["bundle"], r["backend"], r["precision"], is_peer(r),
                   (r.get("latency") or {}).get("median_ms"),
                   r["size_bytes"] / 1e6 if r.get("size_bytes") else None, r.get("threads"),
                   r.get("accuracy") or {}, (r.get("drift") or {}).get("sets") or {})


def dots_of(records: list[dict]) -> list[Dot]:
    ok = [r for r in records if r["status"] == "ok" and r.get("latency") and r.get("kind") != "checkpoint"]
    first = min((r["threads"] for r in ok if r.get("threads")), default=None)
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["model"], r["bundle"], r["device"]), []).append(r)
    return [Dot.of(min(rows, key=lambda r: (r.get("threads") != first,
                                            r["exec_precision"]["hint"] != "default")))
            for rows in groups.values()]


@dataclass
class Panel:
    """One evaluation set's panel: the figure `key` of every dot (of 98 points only if `only98`)."""
    key: str
    title: str
    only98: bool = False

    def entry(self, dot: Dot) -> dict:
        e = figure(dot.accuracy, self.key)
        return e if e and not (self.only98 and points_of(e) != 98) else {}

    def nme(self, dot: Dot) -> float | None:
        e = self.entry(dot)
        return e["nme"] * 100 if e else None


def panels_of(dots: list[Dot], sets: list[str] | None = None) -> list[Panel]:
    """One panel per scored set; a set some dots score on 98 points and others on 68 gets two."""
    keys = sets or scored_sets([d.rec for d in dots])
    out = []
    for k in [k for k in keys if "@" not in k]:
        counts = {points_of(d.accuracy[k]) for d in dots if k in d.accuracy}
        if counts == {68, 98}:
            out += [Panel(k, f"{title_of(k)}, 98 points", only98=True), Panel(k + "@68", title_of(k + "@68"))]
        elif counts:
            out.append(Panel(k, title_of(k)))
    return out


def spread(ys: list[float], gap: float, lo: float, hi: float) -> list[float]:
    """Positions as close to `ys` as possible, in the same order, at least `gap` apart and within
    [lo, hi] (the gap shrinks when they do not fit): where the model names go."""
    if not ys:
        return []
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    gap = min(gap, (hi - lo) / max(1, len(ys) - 1))
    p = [min(max(ys[i], lo), hi) for i in order]
    for i in range(1, len(p)):
        p[i] = max(p[i], p[i - 1] + gap)
    if p[-1] > hi:
        p[-1] = hi
        for i in range(len(p) - 2, -1, -1):
            p[i] = min(p[i], p[i + 1] - gap)
    out = [0.0] * len(ys)
    for rank, i in enumerate(order):
        out[i] = p[rank]
    return out


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig, tight: bool = False) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, **({"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}))
    _plt().close(fig)
    return buf.getvalue()


def colours(engines) -> dict:
    plt = _plt()
    known = list(ENGINE_ORDER) + sorted(set(engines) - set(ENGINE_ORDER))
    return {e: plt.cm.tab10(i % 10) for i, e in enumerate(known) if e in set(engines)}


def _grid(n: int, cols: int, ax_w: float, ax_h: float, right: float, top: float):
    """A figure of n panels with fixed margins in inches (room for the names right of each)."""
    plt = _plt()
    rows = math.ceil(n / cols)
    left, gap_w, gap_h, bottom = 0.65, right + 0.75, 0.85, 0.55
    w = left + cols * ax_w + (cols - 1) * gap_w + right
    h = top + rows * ax_h + (rows - 1) * gap_h + bottom
    fig = plt.figure(figsize=(w, h), dpi=DPI)
    axes = []
    for i in range(n):
        r, c = divmod(i, cols)
        x0 = left + c * (ax_w + gap_w)
        y0 = h - top - (r + 1) * ax_h - r * gap_h
        axes.append(fig.add_axes((x0 / w, y0 / h, ax_w / w, ax_h / h)))
    return fig, axes


def _name_models(ax, levels: dict[str, float], peers: set[str], fontsize: float = 7.5) -> None:
    """Each model's name right of the panel at its median height, never overlapping another."""
    if not levels:
        return
    names = list(levels)
    to_px = ax.transData.transform
    ys = [to_px((0, levels[m]))[1] for m in names]
    (_, lo), (_, hi) = ax.transAxes.transform((0, 0)), ax.transAxes.transform((0, 1))
    gap = fontsize * DPI / 72 * 1.35
    placed = spread(ys, gap, lo + gap / 2, hi - gap / 2)
    inv = ax.transAxes.inverted().transform
    for m, y, p in zip(names, ys, placed):
        ax.annotate(m + (" (peer)" if m in peers else ""), xy=(1.0, inv((0, y))[1]), xycoords="axes fraction",
                    xytext=(1.04, inv((0, p))[1]), textcoords="axes fraction", va="center",
                    fontsize=fontsize, annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 0})


def _legend(fig, dots: list[Dot], extra: list | None = None) -> None:
    plt = _plt()
    col = colours({d.backend for d in dots})
    hs = [plt.Line2D([], [], color=c, marker="o", ls="", ms=7, label=e) for e, c in col.items()]
    precs = sorted({d.precision for d in dots}, key=lambda p: list(MARKERS).index(p) if p in MARKERS else 9)
    hs += [plt.Line2D([], [], color="0.35", marker=MARKERS.get(p, "D"), ls="", ms=7, label=p) for p in precs]
    if any(d.peer for d in dots):
        hs.append(plt.Line2D([], [], color="0.2", marker="o", mfc="white", ls="", ms=7, mew=1.5,
                             label="hollow: peer (imported model)"))
    hs += extra or []
    fig.legend(handles=hs, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
               ncol=len(hs), fontsize=8.5, frameon=False, handletextpad=0.3, columnspacing=1.2)


def scatter_chart(dots: list[Dot], panels: list[Panel], x: str, xlabel: str, title: str,
                  noise: dict[str, tuple[float, int]] | None = None) -> bytes:
    """NME against `x` ("ms" or "size_mb") per panel, as PNG bytes; `noise`: panel key -> (95 %
    half-width of a set mean in NME points, faces), drawn to scale in the panel."""
    return _png(scatter_figure(dots, panels, x, xlabel, title, noise))


def scatter_figure(dots, panels, x, xlabel, title, noise=None):
    """scatter_chart's matplotlib figure (the tests measure its labels)."""
    cols = min(3, len(panels))
    multi = len({d.model for d in dots}) > 1
    fig, axes = _grid(len(panels), cols, 3.3, 2.7, 1.35 if multi else 0.2, 0.95)
    col = colours({d.backend for d in dots})
    peers = {d.model for d in dots if d.peer}
    for ax, p in zip(axes, panels):
        pts = [(d, getattr(d, x), p.nme(d)) for d in dots]
        pts = [(d, xv, y) for d, xv, y in pts if xv is not None and y is not None]
        for d, xv, y in sorted(pts, key=lambda t: t[0].peer):
            c = col[d.backend]
            ax.scatter(xv, y, marker=MARKERS.get(d.precision, "D"), s=42, zorder=3,
                       facecolor="white" if d.peer else c, edgecolor=c if d.peer else "0.15",
                       linewidth=1.6 if d.peer else 0.5)
        xs, ys = [t[1] for t in pts] or [1.0], [t[2] for t in pts] or [1.0]
        ax.set_xlim(0, max(xs) * 1.1)
        ax.set_ylim(0, max(ys) * 1.12)
        ax.set_title(p.title, fontsize=9.5)
        ax.set_xlabel(xlabel, fontsize=8.5)
        ax.set_ylabel("NME (%)", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if noise and p.key in noise:    # the noise drawn to scale: a bar of 2 x the half-width
            hw, n = noise[p.key]
            y0 = ax.get_ylim()[1] * 0.04
            ax.errorbar(0.03, y0 + hw, yerr=hw, transform=ax.get_yaxis_transform(), color="0.35",
                        capsize=2.5, lw=1.1, zorder=2)
            ax.text(0.055, y0 + hw, f"\u00b1{hw:.2f}: 95 % interval of a set mean ({n} faces);\n"
                    "closer bundles are not ranked by this set", transform=ax.get_yaxis_transform(),
                    fontsize=6.8, color="0.3", va="center")
        if multi:
            levels = {}
            for m in dict.fromkeys(d.model for d, _, _ in pts):
                v = sorted(y for d, _, y in pts if d.model == m)
                levels[m] = v[len(v) // 2]
            _name_models(ax, levels, peers)
    fig.suptitle(title, fontsize=11.5, y=1 - 0.12 / fig.get_figheight(), va="top")
    _legend(fig, dots)
    return fig


def drift_chart(dots: list[Dot], keys: list[str], budget: float, budget_note: str) -> bytes | None:
    """INT8 NME minus its FP32 reference's NME (points), per INT8 bundle and set, with the budget."""
    plt = _plt()
    rows = [d for d in dots if d.precision == "int8" and d.drift]
    keys = [k for k in keys if any(k in d.drift and "nme_delta" in d.drift[k] for d in rows)]
    if not rows or not keys:
        return None
    multi = len({d.model for d in rows}) > 1
    w = max(4.5, 1.0 + len(rows) * (0.28 * len(keys) + 0.5))
    fig, ax = plt.subplots(figsize=(min(w, 11.5), 3.6), dpi=DPI)
    bw = 0.8 / len(keys)
    pal = plt.cm.viridis([i / max(1, len(keys) - 1) * 0.85 for i in range(len(keys))])
    vals = []
    for j, k in enumerate(keys):
        ys = [d.drift.get(k, {}).get("nme_delta") for d in rows]
        ys = [y * 100 if y is not None else math.nan for y in ys]
        vals += [y for y in ys if not math.isnan(y)]
        ax.bar([i - 0.4 + bw * (j + 0.5) for i in range(len(rows))], ys, bw, color=pal[j],
               label=title_of(k), edgecolor="white", linewidth=0.4)
    lim = max([abs(v) for v in vals] + [budget]) * 1.25
    ax.set_ylim(-lim, lim)
    for s in (1, -1):
        ax.axhline(s * budget, color="crimson", ls="--", lw=1.2,
                   label=f"budget \u00b1{budget:.2f} points" if s > 0 else None)
    ax.axhline(0, color="0.2", lw=0.7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([(f"{d.model}{' (peer)' if d.peer else ''}\n" if multi else "") + d.bundle
                        for d in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("INT8 NME \u2212 FP32 NME (points)", fontsize=8.5)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("INT8 drift against each model's FP32 reference, per backend and set\n"
                 f"(dashed: the budget, \u00b1{budget:.2f} points, {budget_note})", fontsize=10.5)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig, tight=True)


def ced_chart(panels: list[Panel], curves: list[tuple[str, bool, object]], threshold: float = 0.10) -> bytes:
    """CED per panel; `curves`: (model, is_int8, {panel key: per-face NME}) in draw order. Colour
    is the model; solid its FP32 reference, dashed each INT8 bundle."""
    plt = _plt()
    import numpy as np
    cols = min(3, len(panels))
    fig, axes = _grid(len(panels), cols, 3.3, 2.5, 0.2, 0.95)
    models = list(dict.fromkeys(m for m, _, _ in curves))
    pal = {m: plt.cm.Dark2(i % 8) for i, m in enumerate(models)}
    xs = np.linspace(0, threshold, 101)
    for ax, p in zip(axes, panels):
        for m, int8, per_set in curves:
            nme = per_set.get(p.key)
            if nme is None or not len(nme):
                continue
            ax.plot(xs * 100, [(nme <= x).mean() for x in xs], color=pal[m],
                    ls="--" if int8 else "-", lw=0.9 if int8 else 1.6, alpha=0.8 if int8 else 1)
        ax.set_xlim(0, threshold * 100)
        ax.set_ylim(0, 1)
        ax.set_title(p.title, fontsize=9.5)
        ax.set_xlabel("NME (%)", fontsize=8.5)
        ax.set_ylabel("fraction of faces", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    hs = [plt.Line2D([], [], color=pal[m], lw=2, label=m) for m in models]
    hs += [plt.Line2D([], [], color="0.3", lw=1.6, label="FP32 reference"),
           plt.Line2D([], [], color="0.3", lw=0.9, ls="--", label="INT8 bundles")]
    fig.legend(handles=hs, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
               ncol=len(hs), fontsize=8.5, frameon=False)
    fig.suptitle("Cumulative error distribution (higher is better)", fontsize=11.5,
                 y=1 - 0.12 / fig.get_figheight(), va="top")
    return _png(fig)
