"""INT8 latency of the two-head PFLD at each width against the teacher's FP32 latency, in one run.

    python tools/latency_by_width.py --teacher artifacts/pfld_ghostone/onnx_sim_fp32
    python tools/latency_by_width.py --teacher ... --widths 0.5 --necks 0,256   # neck widths
    python tools/latency_by_width.py --teacher ... --widths 0.5 --necks 256 --tails 0,16,32

Latency does not depend on the weights, so each width is a freshly initialised two-head
(68 + 98) PFLD, exported to ONNX and quantized by the onnxruntime backend on the real WFLW
calibration faces exactly as `make quantize` does; every model then runs batch 1 on one thread,
all of them interleaved call by call (common.time_interleaved) so that the machine's load hits
them alike. Prints a JSON line per model and writes --out.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from common import host_string, host_info, time_interleaved
from evaluation.metrics import face_batch
from evaluation.sets import scored_set
from quantize.backends import OnnxRuntimeQuantizer, Options
from runtime.bundle import BundleMeta, atomic_write_json
from runtime.decode import Landmarker
from runtime.engines import OnnxRuntimeEngine


def _int8_of_width(width: float, work: Path, calib: np.ndarray, neck: int = 0, tail: int = 0) -> Path:
    import torch

    from export.stages import export_all
    from runtime.preprocess import Preprocess
    from train.engine import save_checkpoint
    from train.model import PFLD
    torch.manual_seed(0)
    m = PFLD(0, width, heads={"300w68": 68, "wflw98": 98}, neck=neck or None, tail=tail or None).eval()
    tag = f"{width}_n{neck}_t{tail}"
    ck = work / f"w{tag}.pt"
    save_checkpoint(ck, {"arch": m.arch, "scheme": "300w68", "preprocess": Preprocess().to_meta(),
                         "model": m.state_dict()})
    bundles = export_all(ck, work / f"w{tag}", targets=["onnx_sim_fp32"], progress=lambda s: None)
    q = OnnxRuntimeQuantizer(BundleMeta.load(bundles["onnx_sim_fp32"]), work / f"q{tag}")
    q.quantize(calib, Options(), work / f"int8_{tag}")
    return work / f"int8_{tag}" / "model.onnx"


@click.command()
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False),
              help="the teacher's FP32 bundle (e.g. artifacts/pfld_ghostone/onnx_sim_fp32)")
@click.option("--widths", default="0.5,0.75,1.0", show_default=True)
@click.option("--necks", default="0", show_default=True,
              help="last-stage channels to try at each width (0: 128 x width)")
@click.option("--tails", default="0", show_default=True,
              help="14 x 14 output channels to try (0: 16 x width; the 7 x 7 stage gets twice)")
@click.option("--runs", default=300, show_default=True)
@click.option("--also", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="other bundles to time in the same run (e.g. artifacts/pfld68_w05/onnx_int8)")
@click.option("--out", default="artifacts/latency_by_width.json", show_default=True)
def main(teacher, widths, necks, tails, runs, also, out):
    calib_faces = scored_set("wflw:calib").faces()
    lm = Landmarker.open(teacher, threads=1)
    calib = face_batch(calib_faces, lm.pre, "rect")
    x1 = calib[:1]
    fns = {f"{Path(teacher).parent.name} {lm.meta.precision} ({lm.meta.stage})": lm.engine}
    for b in also:
        other = Landmarker.open(b, threads=1)
        fns[f"{Path(b).parent.name}/{Path(b).name}"] = other.engine
    with tempfile.TemporaryDirectory() as tmp:
        for w in (float(v) for v in widths.split(",")):
            for n in (int(v) for v in necks.split(",")):
                for tl in (int(v) for v in tails.split(",")):
                    path = _int8_of_width(w, Path(tmp), calib, n, tl)
                    name = f"width {w}{f' neck {n}' if n else ''}{f' tail {tl}' if tl else ''}"
                    fns[f"two-head PFLD {name} int8"] = OnnxRuntimeEngine(path, threads=1)
        t = time_interleaved(fns, x1, warmup=30, runs=runs)
    ref = next(iter(t.values()))["median_ms"]
    rows = [{"model": k, **v, "ratio_to_teacher": v["median_ms"] / ref} for k, v in t.items()]
    for r in rows:
        click.echo(json.dumps(r))
    atomic_write_json(Path(out), {"runs": runs, "threads": 1, "engine": "onnxruntime",
                                  "host": host_string(host_info()), "rows": rows})


if __name__ == "__main__":
    main()
