"""The README's "results at a glance" table, rendered from the records of ONE benchmark run, so
every figure in it comes from the same command on the same machine.

    python tools/glance.py artifacts/student_w05/benchmark          # after `make benchmark`

One row per FP32/INT8 bundle of the run's first model (torch reference first): NME per scored
set (native head), INT8 drift against the reference (NME points), median batch-1 ms per thread
count, size on disk. Team tool.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINE = {"torch": "torch (reference)", "onnxruntime": "onnxruntime", "openvino": "OpenVINO",
          "tflite": "TFLite (XNNPACK)"}
ORDER = ("checkpoint", "onnx_sim_fp32", "onnx_int8", "openvino_fp32", "openvino_int8",
         "tflite_fp32", "tflite_int8")


def _mb(n):
    return f"{n / 1e6:.2f} MB" if n else ""


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def main(run_dir):
    from benchmark.records import load_run
    man, recs = load_run(run_dir)
    model = next(r["model"] for r in recs if r.get("role") == "reference")
    sets = [k for k in man["config"]["eval_sets"]]
    ok = [r for r in recs if r["model"] == model and r["status"] == "ok"]
    threads = sorted({r["threads"] for r in ok if r["threads"]})
    click.echo(f"Run {man['run_id']} ({man['started'][:10]}), `{man['command']}`; host: {man['host'].split(';')[0]}.\n")
    click.echo("| backend | bundle | " + " | ".join(sets) + " | INT8 drift (points, per set) | "
               + " | ".join(f"ms, {t} thread{'s' if t > 1 else ''}" for t in threads) + " | size |")
    click.echo("|---" * (len(sets) + 4 + len(threads)) + "|")
    for name in ORDER:
        rows = [r for r in ok if r["bundle"] == name and r["exec_precision"]["hint"] in ("default", "f32")]
        if name.startswith("openvino"):
            rows = [r for r in rows if r["exec_precision"]["hint"] == "f32"] or rows
        if not rows:
            continue
        first = rows[0]
        acc = next((r["accuracy"] for r in rows if r["accuracy"]), {})
        nme = [f"{acc[k]['nme'] * 100:.2f}" if k in acc else "" for k in sets]
        d = next((r["drift"] for r in rows if r.get("drift")), None)
        drift = " / ".join(f"{d['sets'][k]['nme_delta'] * 100:+.3f}" for k in sets
                           if d and k in d["sets"]) if first["precision"] == "int8" else ""
        ms = []
        for t in threads:
            r = next((r for r in rows if r["threads"] == t and r.get("latency")), None)
            ms.append(f"{r['latency']['median_ms']:.2f}" if r else "")
        eng = ENGINE.get(first["backend"], first["backend"]) + (" (f32)" if first["backend"] == "openvino" else "")
        click.echo(f"| {eng} | {name} | " + " | ".join(nme) + f" | {drift} | " + " | ".join(ms)
                   + f" | {_mb(first.get('size_bytes'))} |")


if __name__ == "__main__":
    main()
