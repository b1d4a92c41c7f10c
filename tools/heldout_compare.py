"""Score checkpoints on the held-out sets of one training run, side by side: the figure
candidates are chosen by (train/engine._selection_metric: the mean over the run's held-out sets).

    python tools/heldout_compare.py --run runs/student_wflw_w05/best.pt models/student_w05.pt runs/x.pt

The held-out sets are rebuilt from --run's saved config (train.refit.checkpoint_data): e.g. the
held-out 300-W, WFLW-train and pool faces. No test face is scored. Team tool.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.option("--run", "run_ck", required=True, type=click.Path(exists=True, dir_okay=False),
              help="checkpoint whose run defines the held-out sets")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--threads", default=1, show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="also write JSON here")
@click.option("--boxes", is_flag=True, help="also the held-out pool faces cropped from their detector boxes (val_<labels>_box)")
def main(run_ck, checkpoints, threads, out, boxes):
    import numpy as np
    import torch

    from train.checkpoint import Checkpoint, load_checkpoint
    from train.engine import _evaluate
    from train.refit import checkpoint_data
    torch.set_num_threads(threads)
    data = checkpoint_data(load_checkpoint(run_ck), run_ck)
    data.extra = {k: v for k, v in data.extra.items() if boxes and k.endswith("_box")}
    rows = {}
    for path in checkpoints:
        ck = Checkpoint.load(path)
        res = _evaluate(ck.build(), data, ck.preprocess)
        rows[path] = {k: v["nme"] for k, v in res.items()}
        rows[path]["mean"] = float(np.mean([v["nme"] for k, v in res.items() if k in data.val]))
        if boxes:
            rows[path]["mean_with_boxes"] = float(np.mean([v["nme"] for v in res.values()]))
    every = {**data.val, **data.extra}
    sets = [k for k in next(iter(rows.values())) if not k.startswith("mean")]
    extra = " | mean with boxes" if boxes else ""
    click.echo("| checkpoint | " + " | ".join(f"{s} ({len(every[s][0])})" for s in sets) + f" | mean{extra} |")
    click.echo("|---" * (len(sets) + 2 + bool(boxes)) + "|")
    for path, r in rows.items():
        click.echo(f"| {path} | " + " | ".join(f"{r[s] * 100:.2f}" for s in sets) + f" | {r['mean'] * 100:.3f}"
                   + (f" | {r['mean_with_boxes'] * 100:.3f}" if boxes else "") + " |")
    if out:
        from runtime.bundle import atomic_write_json
        atomic_write_json(out, {"run": run_ck, "sets": {s: len(every[s][0]) for s in sets},
                                "nme": rows})


if __name__ == "__main__":
    main()
