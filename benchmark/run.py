"""Compare deployment targets: latency, throughput, size, load time, memory, accuracy and drift.

    python benchmark/run.py --backend openvino
    python benchmark/run.py --backend all --threads 1,2
    python benchmark/run.py --backend onnxruntime --external their.onnx --external-spec spec.json
    python benchmark/run.py --report-only          # re-render results.md and plots

Writes records/*.json, results.md and plots under --out; `python benchmark/gate.py` checks them.
"""
from __future__ import annotations

import click

from benchmark.core import BenchConfig, run
from benchmark.measure import EVAL_SETS
from benchmark.torch_engine import bench_engines
from evaluation.data import default_root
from runtime.bundle import PRECISIONS
from runtime.errors import LandmarkError

D = BenchConfig()


def _csv(choices=None, cast=str):
    def parse(ctx, param, value):
        items = [cast(v.strip()) for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("give at least one value")
        if choices is not None:
            allowed = choices() if callable(choices) else choices   # read the registry when parsing
            bad = [v for v in items if v not in allowed]
            if bad:
                raise click.BadParameter(f"{', '.join(map(str, bad))} not in {', '.join(allowed)}")
        return tuple(items)
    return parse


@click.command(context_settings={"show_default": True})
@click.option("--backend", default="all", callback=_csv(lambda: list(bench_engines()) + ["all"]),
              help=f"comma list of: {', '.join(bench_engines())}, all (runtime.engines.ENGINES + "
                   "the torch reference)")
@click.option("--precision", default=",".join(D.precisions), callback=_csv(PRECISIONS),
              help="comma list of bundle precisions")
@click.option("--threads", default=",".join(map(str, D.threads)), callback=_csv(cast=int),
              help="comma list of thread counts; one row each")
@click.option("--device", default=",".join(D.devices), callback=_csv(),
              help="comma list: OpenVINO device names (CPU, GPU, NPU, AUTO), an onnxruntime "
                   "execution provider, or a TFLite delegate library path (NPU/GPU); "
                   "a device an engine cannot use is a skipped row")
@click.option("--exec-precision", default=",".join(D.exec_precisions), callback=_csv(),
              help="execution-precision rows for engines that take a hint (OpenVINO): 'default' "
                   "= the device's choice (bf16 on this CPU), or e.g. f32, bf16, f16")
@click.option("--bundles", default=D.bundles, multiple=True, type=click.Path(file_okay=False),
              help="folder of one model's bundles (artifacts/<model>); repeat it to put several "
                   "models (ours, imported) in one table")
@click.option("--checkpoint", default=D.checkpoint, type=click.Path(dir_okay=False),
              help="torch checkpoint: the FP32 reference of the model exported from it (other "
                   "models are measured against their own FP32 bundle); '' for none")
@click.option("--eval-set", "eval_sets", default=EVAL_SETS, multiple=True,
              help="scored set SET/PROTOCOL from evaluation.sets (e.g. wflw:eval/rect, "
                   "300w:helen_test/landmarks), or 300w:FOLDER/landmarks for your own .pts faces; "
                   "repeatable")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output folder  [default: <first bundles folder>/benchmark]")
@click.option("--wflw", default=None, type=click.Path(file_okay=False),
              help=f"WFLW root  [default: {default_root('wflw')}]")
@click.option("--w300", default=None, type=click.Path(file_okay=False),
              help=f"300-W root  [default: {default_root('300w')}]")
@click.option("--max-faces", default=D.max_faces, help="first N faces of each evaluation set (0: all)")
@click.option("--warmup", default=D.warmup, help="untimed runs before timing")
@click.option("--runs", default=D.runs, help="timed batch-1 runs per row")
@click.option("--batch", default=D.batch, help="throughput batch size")
@click.option("--max-seconds", default=D.max_seconds,
              help="time cap per timing loop; a slower row keeps the runs done so far (>= 10)")
@click.option("--external", "externals", multiple=True, type=click.Path(dir_okay=False),
              help="an external landmark model to score too (repeatable; pair with --external-spec)")
@click.option("--external-spec", "external_specs", multiple=True, type=click.Path(dir_okay=False),
              help="its spec JSON, e.g. benchmark/specs/example_pfld_external.json")
@click.option("--accuracy-all-threads", is_flag=True,
              help="score accuracy in every row, not only at the first thread count of each model")
@click.option("--timeout", "timeout_s", default=D.timeout_s, help="seconds per row")
@click.option("--plots/--no-plots", default=True, help="write PNG plots")
@click.option("--report-only", is_flag=True, help="only re-render results.md and plots of the last run in --out")
def main(externals, external_specs, report_only, plots, **kw):
    """Benchmark every deployment target of a model on this machine, one row per
    (bundle, device, execution precision, threads), each in a fresh process."""
    if len(externals) != len(external_specs):
        raise click.UsageError("give one --external-spec per --external")
    kw["checkpoint"] = kw["checkpoint"] or None
    kw["bundles"], kw["eval_sets"] = tuple(kw["bundles"]), tuple(kw["eval_sets"])
    cfg = BenchConfig(backends=kw.pop("backend"), precisions=kw.pop("precision"),
                      devices=kw.pop("device"), exec_precisions=kw.pop("exec_precision"),
                      externals=tuple(zip(externals, external_specs)), plots=plots, **kw)
    if report_only:
        from benchmark.report import render
        try:
            for p in render(cfg.out_dir, plots=plots):
                click.echo(p)
        except LandmarkError as e:
            raise click.ClickException(str(e)) from None
        return
    try:
        records = run(cfg, echo=click.echo)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None
    bad = [r for r in records if r["status"] == "error"]
    if bad:
        click.echo(f"{len(bad)} row(s) failed; see the reasons above and in {cfg.out_dir}/results.md",
                   err=True)


if __name__ == "__main__":
    main()
