"""Strip a training checkpoint to what inference and export need (no optimizer state).

    python train/ship.py runs/w300_w1/best.pt models/pfld68_w1.pt
"""
from __future__ import annotations

import json
from pathlib import Path


import click

KEEP = ("arch", "scheme", "preprocess", "model", "epoch", "step", "history", "config", "params",
        "soup", "head_map")


def ship(src, dst, arch_set: dict | None = None) -> dict:
    from train.engine import load_checkpoint, save_checkpoint
    ck = load_checkpoint(src)
    slim = {k: ck[k] for k in KEEP if k in ck}
    slim["model"] = {k: v for k, v in ck["model"].items()}
    if arch_set:
        bad = [k for k in arch_set if k not in ck["arch"]]
        if bad:
            raise ValueError(f"{src}: arch has no {', '.join(bad)} (keys: {', '.join(ck['arch'])})")
        slim["arch"] = {**ck["arch"], **arch_set}
    save_checkpoint(Path(dst), slim)
    return slim


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--arch-set", multiple=True, metavar="KEY=VALUE",
              help="change an inference setting of the architecture, e.g. window=7 (a heatmap "
                   "model's decoder window, chosen on held-out faces)")
def main(src, dst, arch_set):
    """Write SRC without optimizer/scheduler/RNG state to DST (atomically)."""
    sets = {}
    for a in arch_set:
        k, sep, v = a.partition("=")
        if not sep:
            raise click.BadParameter(f"{a!r}: expected KEY=VALUE", param_hint="--arch-set")
        sets[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
    try:
        ck = ship(src, dst, sets)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{dst}: epoch {ck.get('epoch')}, {ck.get('params')} inference parameters")


if __name__ == "__main__":
    main()
