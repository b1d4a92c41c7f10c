"""Quantize FP32 bundles to INT8 bundles and report what it cost in accuracy.

    python quantize/run.py                                   # every backend, default settings
    python quantize/run.py --backend onnxruntime --calib-samples 64 --budget 0.10

Exit status: 0 every requested backend is within the budget (bundles and report written);
1 a backend exceeded the budget even with layers kept in float (figures printed and in the
report, no bundle written for it); 2 bad input (bundle, data, option), nothing written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from common import defaults
from quantize.backends import BACKENDS, BIAS_CORRECTION, PRESETS
from quantize.core import DRIFT_FACES, MIN_CALIB_FACES, Settings, run
from runtime.errors import LandmarkError

D = Settings()


class CommandError(click.ClickException):
    """Printed as 'Error: ...' with no traceback; exit status 2 for bad input."""
    exit_code = 2


@click.command(context_settings={"show_default": True})
@click.option("--bundle-dir", default=defaults.BUNDLES,
              type=click.Path(file_okay=False, path_type=Path),
              help="model folder holding the FP32 bundles from `make export`")
@click.option("--backend", "backends", default=("all",), multiple=True,
              type=click.Choice([*BACKENDS, "all"]), help="repeatable")
@click.option("--calib-samples", type=int, default=None,
              help=f"calibration faces (>= {MIN_CALIB_FACES}); default: every face of the WFLW "
                   "calibration split (~162)")
@click.option("--method", default=D.method,
              type=click.Choice(["minmax", "percentile", "entropy", "histogram"]),
              help="activation range estimation; onnxruntime: all four, openvino: minmax, "
                   "percentile, histogram; tflite: minmax, histogram (histogram: per tensor "
                   "the range with the least 8-bit rounding + clipping error)")
@click.option("--per-channel/--no-per-channel", default=D.per_channel,
              help="per-output-channel weight scales")
@click.option("--preset", default=D.preset, type=click.Choice(list(PRESETS)),
              help="x86: " + PRESETS["x86"] + ". arm: " + PRESETS["arm"])
@click.option("--bias-correction", default=D.bias_correction, type=click.Choice(BIAS_CORRECTION),
              help="OpenVINO (NNCF) bias correction; off by default because NNCF's fast bias "
                   "correction added several NME points of drift to PFLD; onnxruntime and "
                   "tflite do none")
@click.option("--graph-fixes/--no-graph-fixes", default=D.graph_fixes,
              help="onnxruntime: average-pool outputs get their own range, concat inputs share "
                   "the concat's range, the model outputs stay float (the better PTQ step "
                   "turns them on)")
@click.option("--escalate/--no-escalate", default=D.escalate,
              help="when plain PTQ misses the budget, try the backend's better PTQ before "
                   "keeping ops in float (the report records each step)")
@click.option("--qat", type=click.Choice(["auto", "off", "force"]), default=D.qat,
              show_default=True,
              help="quantization-aware fine-tune of the bundle's checkpoint: auto, when the PTQ "
                   "steps miss the budget; force, also when they do not (the bundle keeps the "
                   "smaller worst drift of the two); off, never")
@click.option("--qat-steps", type=click.IntRange(min=1), default=D.qat_steps, show_default=True,
              help="QAT fine-tune steps (batches of 32 crops)")
@click.option("--qat-set", default=D.qat_set, show_default=True,
              help="evaluation.sets name of the faces QAT fine-tunes on (the float model's own "
                   "outputs are the target, so no labels are used); must not hold a scored face")
@click.option("--budget", type=float, default=D.budget,
              help="allowed |NME_int8 - NME_fp32| on the WFLW evaluation faces (rect and "
                   "landmark crops), in NME points: 0.10 means 4.50% may become 4.40..4.60%")
@click.option("--drift-faces", default=D.drift_faces, type=click.Choice(list(DRIFT_FACES)),
              help="faces the drift is averaged over; ok: " + DRIFT_FACES["ok"] + "; all: "
                   "every face (the difference of the set means, ruled by FP32 failures)")
@click.option("--max-float-layers", type=int, default=D.max_float_layers,
              help="most sensitive layers the search may keep in float to meet the budget")
@click.option("--rank-faces", type=int, default=D.rank_faces,
              help="calibration faces that score the layer-sensitivity ranking (default: all)")
@click.option("--latency-runs", type=int, default=D.latency_runs,
              help="batch-1 runs per model for the latency ratio (after warm-up)")
@click.option("--threads", type=int, default=D.threads, help="engine threads for latency")
@click.option("--calib-set", default=D.calib_set,
              help="evaluation.sets name of the calibration faces (e.g. wflw:calib, or "
                   "300w:FOLDER for your own .pts faces)")
@click.option("--eval-set", "eval_sets", default=D.eval_sets, multiple=True,
              help="scored set SET/PROTOCOL to report (repeatable), e.g. 300w:FOLDER/landmarks")
@click.option("--gate-set", "gate_sets", default=D.gate_sets, multiple=True,
              help="scored set the budget applies to (repeatable)")
@click.option("--wflw", "wflw_root", default=None, help="WFLW root (default ../shared/wflw)")
@click.option("--w300", "w300_root", default=None, help="300-W root (default ../shared/300w)")
def main(bundle_dir, backends, calib_samples, method, per_channel, preset, bias_correction,
         graph_fixes, escalate, qat, qat_steps, qat_set, budget, drift_faces, max_float_layers, rank_faces, latency_runs,
         threads, calib_set, eval_sets, gate_sets, wflw_root, w300_root):
    """Turn the FP32 bundles in --bundle-dir into INT8 bundles (onnx_int8, openvino_int8,
    tflite_int8) calibrated on real WFLW faces, and write quantize_report.json. A backend
    over the budget escalates: plain PTQ -> better PTQ -> ops kept in float -> QAT."""
    names = list(BACKENDS) if "all" in backends else list(dict.fromkeys(backends))
    settings = Settings(method=method, per_channel=per_channel, preset=preset,
                        bias_correction=bias_correction, graph_fixes=graph_fixes,
                        escalate=escalate, qat=qat, qat_steps=qat_steps, qat_set=qat_set,
                        calib_samples=calib_samples, budget=budget,
                        drift_faces=drift_faces,
                        max_float_layers=max_float_layers, rank_faces=rank_faces,
                        latency_runs=latency_runs, threads=threads, calib_set=calib_set,
                        eval_sets=tuple(eval_sets), gate_sets=tuple(gate_sets),
                        wflw_root=wflw_root, w300_root=w300_root)
    try:
        report, failed = run(bundle_dir, names, settings, log=click.echo,
                             skip_missing="all" in backends)
    except LandmarkError as e:
        raise CommandError(str(e)) from None
    if failed:
        click.echo(f"FAILED: {', '.join(failed)} (see {bundle_dir / 'quantize_report.json'})",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
