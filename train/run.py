"""Train a PFLD landmark model, or evaluate a checkpoint.

    python train/run.py fit --dataset 300w --epochs 80 --out runs/w300
    torchrun --nproc-per-node 2 train/run.py fit ...       # data-parallel (gloo on CPU)
    python train/run.py evaluate --checkpoint models/pfld68.pt
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from train.augment import AugmentConfig  # noqa: E402
from train.engine import TrainConfig  # noqa: E402

DEFAULTS = TrainConfig()


@click.group()
def cli():
    """Train and evaluate PFLD landmark models."""


@cli.command()
@click.option("--dataset", type=click.Choice(["300w", "wflw"]), default=DEFAULTS.dataset, show_default=True)
@click.option("--data-root", default=None, help="dataset folder [default: $LANDMARK_300W / $LANDMARK_WFLW or ../shared/<dataset>]")
@click.option("--train-split", default=DEFAULTS.train_split, show_default=True)
@click.option("--val-fraction", default=DEFAULTS.val_fraction, show_default=True, help="share of training faces held out for model selection")
@click.option("--eval-set", "eval_sets", multiple=True, help="extra DATASET:SPLIT scored each epoch, e.g. 300w:helen_test")
@click.option("--width", type=click.Choice(["0.25", "0.5", "0.75", "1.0"]), default=str(DEFAULTS.width), show_default=True)
@click.option("--epochs", default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True)
@click.option("--lr", default=DEFAULTS.lr, show_default=True)
@click.option("--weight-decay", default=DEFAULTS.weight_decay, show_default=True)
@click.option("--loss", type=click.Choice(["wing", "pfld", "l2", "l1"]), default=DEFAULTS.loss, show_default=True)
@click.option("--pose-weight", default=DEFAULTS.pose_weight, show_default=True, help="weight of the auxiliary pose L1 loss (not used by --loss pfld)")
@click.option("--seed", default=DEFAULTS.seed, show_default=True)
@click.option("--out", default=DEFAULTS.out, show_default=True, help="run folder; resumes from its last.pt")
@click.option("--threads", default=DEFAULTS.threads, show_default=True, help="torch threads (0: default)")
@click.option("--max-steps", default=DEFAULTS.max_steps, show_default=True, help="stop after N steps (0: no limit)")
@click.option("--limit-faces", default=DEFAULTS.limit_faces, show_default=True, help="train on the first N faces only (0: all)")
@click.option("--init", default=None, type=click.Path(exists=True, dir_okay=False), help="start from these weights (fine-tuning)")
@click.option("--ema", default=DEFAULTS.ema, show_default=True, help="decay of an exponential moving average of the weights, evaluated and saved instead of the raw weights (0: off; e.g. 0.998)")
@click.option("--aug-scale", nargs=2, type=float, default=DEFAULTS.augment.scale, show_default=True, help="crop side / landmark-extent side, min max")
@click.option("--aug-rotate", default=DEFAULTS.augment.rotate, show_default=True, help="max rotation, degrees")
@click.option("--aug-occlude", default=DEFAULTS.augment.occlude_p, show_default=True, help="probability of a random occluder")
def fit(aug_scale, aug_rotate, aug_occlude, **kw):
    """Train; each epoch writes last.pt (and best.pt on a better held-out NME) atomically."""
    kw["width"] = float(kw["width"])
    kw["eval_sets"] = tuple(kw["eval_sets"])
    aug = AugmentConfig(scale=tuple(aug_scale), rotate=aug_rotate, occlude_p=aug_occlude)
    cfg = TrainConfig(augment=aug, **kw)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        from train.engine import train
        entry = train(cfg)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(entry))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--wflw", default=None, help="WFLW root [default: $LANDMARK_WFLW or ../shared/wflw]")
@click.option("--w300", default=None, help="300-W root [default: $LANDMARK_300W or ../shared/300w]")
@click.option("--w300-split", default="helen_test", show_default=True)
@click.option("--out", default=None, help="write the results JSON and CED plot to this folder")
def evaluate(checkpoint, wflw, w300, w300_split, out):
    """NME / FR / AUC of a checkpoint on 300-W and WFLW (both crop protocols)."""
    from train.evaluate import evaluate_checkpoint
    res = evaluate_checkpoint(checkpoint, wflw, w300, w300_split, out)
    click.echo(json.dumps(res, indent=2))


if __name__ == "__main__":
    cli()
