"""Latency of several bundles of one engine against one FP32 bundle, timed together: each round
runs CALLS batch-1 calls of every bundle in turn (order reversed every other round, one real
face crop, 1 thread), and the ratio of a bundle is the median of its per-round ratios to the
FP32 bundle. For comparing INT8 bundles made two ways (before/after a quantizer change) in one
run, where two separate benchmark rows would pair two moments of a shared machine.

    python tools/int8_latency.py --fp32 artifacts/student_w05/onnx_sim_fp32 \
        --int8 before=/tmp/before/onnx_int8 --int8 after=artifacts/student_w05/onnx_int8

Team tool; nothing is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.option("--fp32", "fp32_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--int8", "int8_dirs", multiple=True, required=True,
              help="LABEL=BUNDLE_DIR, repeatable")
@click.option("--rounds", default=20, show_default=True)
@click.option("--calls", default=30, show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(fp32_dir, int8_dirs, rounds, calls, threads):
    from common import time_rounds
    from evaluation.metrics import face_batch
    from evaluation.sets import scored_set
    from runtime.bundle import BundleMeta
    from runtime.engines import get_engine
    meta = BundleMeta.load(fp32_dir)
    precision = "f32" if meta.engine == "openvino" else None
    s = scored_set("wflw:heldout/landmarks")
    x = face_batch(s.faces()[:1], meta.preprocess, s.protocol)
    bundles = {"fp32": meta}
    for item in int8_dirs:
        label, _, d = item.partition("=")
        bundles[label] = BundleMeta.load(d)
    fns = {k: get_engine(m.engine)(m.model_file, threads=threads, precision=precision)
           for k, m in bundles.items()}
    t = time_rounds(fns, x, rounds, calls)
    fp = np.asarray(t["fp32"])
    click.echo(f"{meta.engine}, {threads} thread(s), {rounds} rounds x {calls} calls "
               f"(precision hint {precision or 'none'})")
    for k, v in t.items():
        v = np.asarray(v)
        r = v / fp
        click.echo(f"  {k:10s} median {np.median(v):.3f} ms  ratio to fp32 {np.median(r):.3f} "
                   f"(rounds' IQR/2 {(np.percentile(r, 75) - np.percentile(r, 25)) / 2:.3f})")


if __name__ == "__main__":
    main()
