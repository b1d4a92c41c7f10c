"""NME against latency for every candidate model and the peers, from ONE benchmark run (issue
#22's curve): a markdown table and a PNG (one panel per evaluation set, linear ms axis, one
marker per model and precision, a legend instead of labels on the points).

    make compare CANDIDATES=artifacts/student_wflw_w05
    python tools/curve.py artifacts/compare --out docs/curve.png

Rows: per model, its FP32 reference bundle (onnx_sim_fp32 or the checkpoint's ONNX) and each INT8
bundle, 1 thread, OpenVINO at the f32 hint. Team tool.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = ("wflw:test/rect", "wflw:test/landmarks", "300w:helen_test/landmarks")
BUNDLES = ("onnx_sim_fp32", "onnx_int8", "openvino_int8", "tflite_int8")


def rows_of(recs):
    out = []
    for r in recs:
        if r["status"] != "ok" or r["bundle"] not in BUNDLES or r.get("threads") != 1:
            continue
        if r["backend"] == "openvino" and r["exec_precision"]["hint"] != "f32":
            continue
        acc = r.get("accuracy") or {}
        out.append({"model": r["model"], "bundle": r["bundle"], "precision": r["precision"],
                    "ms": r["latency"]["median_ms"], "size": r.get("size_bytes"),
                    **{k: acc[k]["nme"] * 100 for k in SETS if k in acc}})
    return out


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="docs/curve.png", type=click.Path(dir_okay=False))
def main(run_dir, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmark.records import load_run
    man, recs = load_run(run_dir)
    rows = rows_of(recs)
    click.echo(f"Run {man['run_id']}: `{man['command']}`; host {man['host'].split(';')[0]}.\n")
    click.echo("| model | bundle | ms (1 thread) | " + " | ".join(SETS) + " |")
    click.echo("|---" * (3 + len(SETS)) + "|")
    for r in sorted(rows, key=lambda r: (r["model"], r["ms"])):
        click.echo(f"| {r['model']} | {r['bundle']} | {r['ms']:.2f} | "
                   + " | ".join(f"{r[k]:.2f}" if k in r else "" for k in SETS) + " |")
    models = sorted({r["model"] for r in rows})
    colours = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = {"onnx_sim_fp32": "o", "onnx_int8": "s", "openvino_int8": "^", "tflite_int8": "D"}
    fig, axes = plt.subplots(1, len(SETS), figsize=(5 * len(SETS), 4.2))
    for ax, k in zip(axes, SETS):
        for r in rows:
            if k in r:
                ax.scatter(r["ms"], r[k], color=colours[r["model"]], marker=markers[r["bundle"]], s=55)
        ax.set_title(k)
        ax.set_xlabel("median batch-1 latency, ms (1 thread)")
        ax.set_ylabel("NME %")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=mk, ls="", label=b) for b, mk in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    click.echo(f"\n{out}")


if __name__ == "__main__":
    main()
