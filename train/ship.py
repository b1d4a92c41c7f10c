"""Strip a training checkpoint to what inference and export need (no optimizer state).

    python train/ship.py runs/w300_w1/best.pt models/pfld68_w1.pt
"""
from __future__ import annotations

from pathlib import Path


import click

KEEP = ("arch", "scheme", "preprocess", "model", "epoch", "step", "history", "config", "params",
        "soup")


def ship(src, dst) -> dict:
    from train.engine import load_checkpoint, save_checkpoint
    ck = load_checkpoint(src)
    slim = {k: ck[k] for k in KEEP if k in ck}
    slim["model"] = {k: v for k, v in ck["model"].items()}
    save_checkpoint(Path(dst), slim)
    return slim


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def main(src, dst):
    """Write SRC without optimizer/scheduler/RNG state to DST (atomically)."""
    ck = ship(src, dst)
    click.echo(f"{dst}: epoch {ck.get('epoch')}, {ck.get('params')} inference parameters")


if __name__ == "__main__":
    main()
