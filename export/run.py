"""Turn a training checkpoint, or an outside landmark model, into verified deployable bundles
(ONNX, OpenVINO, TFLite).

    python export/run.py                                     # models/pfld68_w05.pt, all targets
    python export/run.py --checkpoint models/pfld68_w05.pt --targets onnx_sim_fp32,tflite_fp32
    python export/run.py --import ghost.onnx --spec specs/pfld_ghostone.json --out artifacts/pfld_ghostone

Bad input (no checkpoint, another architecture, unwritable --out, unknown target) exits with
code 2; a conversion or parity failure exits with code 1; both print the reason, no traceback.
"""
from __future__ import annotations

from pathlib import Path

import click

from common import defaults
from export.stages import TARGETS, ExportInputError, export_all, import_model

from runtime.errors import LandmarkError
CHECKPOINT = defaults.MODEL
OPSET = 18


class Failed(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@click.command()
@click.option("--checkpoint", default=CHECKPOINT, show_default=True, type=click.Path(dir_okay=False),
              help="training checkpoint (train/ship.py output or a run's best.pt)")
@click.option("--import", "import_file", default=None, type=click.Path(dir_okay=False),
              help="an outside landmark model (.onnx or .tflite) to import instead of a checkpoint")
@click.option("--spec", default=None, type=click.Path(dir_okay=False),
              help="with --import: the spec JSON saying how to feed and read the model (e.g. "
                   "specs/pfld_ghostone.json)")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="bundle folder  [default: artifacts/<checkpoint or model stem>]")
@click.option("--opset", default=OPSET, show_default=True, type=click.IntRange(min=7),
              help="ONNX opset of the exported graph")
@click.option("--targets", default=",".join(TARGETS), show_default=True,
              help="comma list of targets; what they are converted from / checked against is "
                   "built too (or reused when already exported from this checkpoint)")
@click.option("--batch", type=click.Choice(["dynamic", "static"]), default="dynamic",
              show_default=True, help="batch axis of the ONNX/OpenVINO graphs (TFLite is batch 1)")
def main(checkpoint, import_file, spec, out, opset, targets, batch):
    """Export a checkpoint (or --import an outside model) to deployable bundles, each checked
    against its reference on real faces (report: <out>/export_report.json)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if spec and not import_file:
        raise Failed("--spec goes with --import", 2)
    try:
        if import_file:
            if not spec:
                raise ExportInputError("--import needs --spec SPEC.json (how to feed and read the "
                                       "model; see specs/pfld_ghostone.json)")
            out = out or str(Path("artifacts") / Path(import_file).stem)
            import_model(import_file, spec, out, targets=names, progress=click.echo)
            return
        out = out or str(Path("artifacts") / Path(checkpoint).stem)
        export_all(checkpoint, out, targets=names, opset=opset, dynamic_batch=batch == "dynamic",
                   progress=click.echo)
    except ExportInputError as e:
        raise Failed(str(e), 2) from None
    except LandmarkError as e:        # ExportError and the data/bundle errors below it
        raise Failed(str(e), 1) from None


if __name__ == "__main__":
    main()
