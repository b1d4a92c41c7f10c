"""Strip a training checkpoint to what inference and export need (no optimizer state).

    python train/ship.py runs/w300_w1/best.pt runs/pfld68_w1.pt
    python train/ship.py runs/w300_w1/best.pt models/pfld68_w05.pt --replace-shipped

A shipped model is a checkpoint file git tracks (models/*.pt): writing over one needs
--replace-shipped, here and in `train/run.py refit-head`, so no recipe replaces it by accident.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


import click
from runtime.errors import ConfigError, LandmarkError

KEEP = ("arch", "scheme", "preprocess", "model", "epoch", "step", "history", "config", "params",
        "soup", "head_map")


class ShippedModelError(LandmarkError, ValueError):
    """A write would replace a shipped (git-tracked) model without --replace-shipped."""


def is_shipped(path: str | Path) -> bool:
    """True when `path` exists and git tracks it (a committed model)."""
    path = Path(path).resolve()
    if not path.is_file():
        return False
    try:
        p = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                           capture_output=True)
    except OSError:              # no git: a file under the repository's models/ counts as shipped
        return path.parent == Path(__file__).resolve().parents[1] / "models"
    return p.returncode == 0


def refuse_shipped(dst: str | Path, replace: bool) -> None:
    if not replace and is_shipped(dst):
        raise ShippedModelError(f"{dst} is a shipped model (tracked by git); write elsewhere "
                                "(e.g. runs/) or pass --replace-shipped to replace it")


def ship(src, dst, arch_set: dict | None = None, replace_shipped: bool = False) -> dict:
    from train.checkpoint import Checkpoint, save_checkpoint
    refuse_shipped(dst, replace_shipped)
    ck = Checkpoint.load(src)
    slim = {k: ck.raw[k] for k in KEEP if k in ck.raw}
    slim["model"] = {k: v for k, v in ck.weights.items()}
    if arch_set:
        bad = [k for k in arch_set if k not in ck.arch]
        if bad:
            raise ConfigError(f"{src}: arch has no {', '.join(bad)} (keys: {', '.join(ck.arch)})")
        slim["arch"] = {**ck.arch, **arch_set}
    save_checkpoint(Path(dst), slim)
    return slim


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--arch-set", multiple=True, metavar="KEY=VALUE",
              help="change an inference setting of the architecture, e.g. window=7 (a heatmap "
                   "model's decoder window, chosen on held-out faces)")
@click.option("--replace-shipped", is_flag=True,
              help="allow DST to be a shipped model (a checkpoint git tracks)")
def main(src, dst, arch_set, replace_shipped):
    """Write SRC without optimizer/scheduler/RNG state to DST (atomically)."""
    sets = {}
    for a in arch_set:
        k, sep, v = a.partition("=")
        if not sep:
            raise click.BadParameter(f"{a!r}: expected KEY=VALUE", param_hint="--arch-set")
        sets[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
    try:
        ck = ship(src, dst, sets, replace_shipped)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{dst}: epoch {ck.get('epoch')}, {ck.get('params')} inference parameters")


if __name__ == "__main__":
    main()
