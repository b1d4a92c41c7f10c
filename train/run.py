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


import click

from train.augment import AugmentConfig
from train.engine import TrainConfig
from train.family import FAMILIES
from runtime.errors import LandmarkError

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
@click.option("--heads", default="", help="comma list of point schemes with a head each, e.g. 300w68,wflw98 [default: one head of the dataset's scheme]")
@click.option("--labels", "labels", multiple=True, help="teacher label file stem from `pseudo-label` (repeatable): for the training faces, or a pool of extra faces")
@click.option("--real", "real", multiple=True, help="a really labelled set mixed into training, with its own held-out part in the selection (repeatable; train.engine.REAL_SETS, e.g. wflw:train); pool faces that are one of its faces are dropped")
@click.option("--real-mapped", is_flag=True, help="also train the dataset's own head on the --real faces through the pool's 98 -> 68 map (default: only the head of their own scheme)")
@click.option("--real-repeat", default=DEFAULTS.real_repeat, show_default=True, help="each --real face appears this many times an epoch")
@click.option("--pool-68", type=click.Choice(["none", "index", "linear"]), default=DEFAULTS.pool_68, show_default=True, help="68-point targets of pool faces: none, the 98 -> 68 index map, or a linear map fitted on the training faces")
@click.option("--head-weights", default="", help="comma list of loss weights, one per head [default: 1 each]")
@click.option("--disagreement-tau", default=DEFAULTS.disagreement_tau, show_default=True, help="per-point weight 1/(1+(d/tau)^2) from the teacher's flip disagreement (0: off)")
@click.option("--max-disagreement", default=DEFAULTS.max_disagreement, show_default=True, help="drop pool faces whose mean flip disagreement (x eye distance) is larger")
@click.option("--select-on-boxes", is_flag=True, help="the held-out pool faces cropped from their detector boxes (logged as val_<labels>_box) join the held-out mean that chooses the epoch")
@click.option("--neck", default=DEFAULTS.neck, show_default=True, help="PFLD: channels of the last (7x7 -> 1x1) stage, whose features reach the heads with their spatial layout (0: 128 x width); an --init with a narrower neck is widened keeping its function")
@click.option("--tail", default=DEFAULTS.tail, show_default=True, help="PFLD: channels of the 14x14 stage's output, through which every spatial feature reaches the neck (0: 16 x width, 8 at width 0.5; the 7x7 stage gets twice as many); an --init with a narrower tail is widened keeping its function")
@click.option("--family", type=click.Choice(list(FAMILIES)), default=DEFAULTS.family, show_default=True, help="; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.values()))
@click.option("--hm-encoding", type=click.Choice(["continuous", "rounded"]), default=DEFAULTS.hm_encoding, show_default=True, help="heatmap targets centred at the exact location or rounded to a heatmap pixel")
@click.option("--hm-decoder", type=click.Choice(["local_soft_argmax", "argmax_quarter", "global_soft_argmax"]), default=DEFAULTS.hm_decoder, show_default=True)
@click.option("--hm-window", default=DEFAULTS.hm_window, show_default=True, help="local soft-argmax window (d x d)")
@click.option("--siamese", is_flag=True, help="heatmap: Siamese consistency training (two augmentations, warped back)")
def fit(aug_scale, aug_rotate, aug_occlude, heads, head_weights, **kw):
    """Train; each epoch writes last.pt (and best.pt on a better held-out NME) atomically."""
    kw["width"] = float(kw["width"])
    kw["eval_sets"] = tuple(kw["eval_sets"])
    kw["labels"] = tuple(kw["labels"])
    kw["real"] = tuple(kw["real"])
    kw["heads"] = tuple(h.strip() for h in heads.split(",") if h.strip())
    kw["head_weights"] = tuple(float(w) for w in head_weights.split(",") if w.strip())
    aug = AugmentConfig(scale=tuple(aug_scale), rotate=aug_rotate, occlude_p=aug_occlude)
    cfg = TrainConfig(augment=aug, **kw)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        from train.engine import train
        entry = train(cfg)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None
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
@click.option("--hm-decoder", default=None, type=click.Choice(["local_soft_argmax", "argmax_quarter", "global_soft_argmax"]), help="heatmap models: decode with this instead of the checkpoint's decoder")
@click.option("--hm-window", default=None, type=int, help="heatmap models: local soft-argmax window")
def evaluate(checkpoint, wflw, w300, w300_split, out, hm_decoder, hm_window):
    """NME / FR / AUC of a checkpoint on 300-W and WFLW (both crop protocols)."""
    from train.evaluate import evaluate_checkpoint
    dec = {k: v for k, v in (("decoder", hm_decoder), ("window", hm_window)) if v is not None}
    res = evaluate_checkpoint(checkpoint, wflw, w300, w300_split, out, decoder=dec)
    click.echo(json.dumps(res, indent=2))


ABLATION_SETS = ("300w:heldout/landmarks", "300w:helen_test/landmarks", "wflw:test/landmarks",
                 "wflw:test/rect")
ABLATION_DECODERS = {"argmax + 0.25": {"decoder": "argmax_quarter"},
                     "global soft-argmax": {"decoder": "global_soft_argmax"},
                     "local soft-argmax d=3": {"decoder": "local_soft_argmax", "window": 3},
                     "local soft-argmax d=5": {"decoder": "local_soft_argmax", "window": 5},
                     "local soft-argmax d=7": {"decoder": "local_soft_argmax", "window": 7}}


@cli.command("hm-ablation")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--checkpoint-name", default="best.pt", show_default=True,
              help="checkpoint inside each run folder (best.pt: chosen on the held-out faces)")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="also write the table and figures as JSON here")
def hm_ablation(runs, checkpoint_name, out):
    """The heatmap ablation table: every RUN's checkpoint decoded by every decoder, NME % on the
    300-W held-out training faces (where choices are made), HELEN and all 505 WFLW faces (68-
    point models score WFLW through the 98 -> 68 map; test faces are reported, never chosen on)."""
    from runtime.bundle import atomic_write_json
    from train.checkpoint import Checkpoint
    from train.evaluate import evaluate_checkpoint
    rows = []
    head = "| run | encoding | Siamese | epochs | decoder | " + " | ".join(ABLATION_SETS) + " |"
    click.echo(head + "\n" + "|---" * (5 + len(ABLATION_SETS)) + "|")
    for run in runs:
        ck = Path(run) / checkpoint_name
        if not ck.is_file():
            raise click.ClickException(f"{ck} does not exist (is {run} a training run folder?)")
        loaded = Checkpoint.load(ck)
        cfg = loaded.config
        hm = bool(loaded.family.decoder_settings)      # a heatmap run: decoders to compare
        decoders = ABLATION_DECODERS if hm else \
            {"direct regression (PFLD)": {}}       # a regression run: the same-budget baseline
        for name, dec in decoders.items():
            res = evaluate_checkpoint(ck, sets=ABLATION_SETS, decoder=dec)
            row = {"run": str(run), "encoding": cfg.get("hm_encoding") if hm else "-",
                   "siamese": cfg.get("siamese") if hm else "-",
                   "epochs": res.get("epochs"), "decoder": name,
                   "nme": {k: res[k]["nme"] for k in ABLATION_SETS if k in res}}
            rows.append(row)
            click.echo(f"| {Path(run).name} | {row['encoding']} | {row['siamese']} | {row['epochs']} | "
                       f"{name} | " + " | ".join(f"{row['nme'][k] * 100:.2f}" if k in row['nme']
                                                  else "-" for k in ABLATION_SETS) + " |")
    if out:
        atomic_write_json(out, {"sets": ABLATION_SETS, "rows": rows})


@cli.command("pseudo-label")
@click.option("--teacher", required=True, type=click.Path(exists=True),
              help="teacher: a bundle folder, or a model file with --teacher-spec")
@click.option("--teacher-spec", default=None, type=click.Path(exists=True, dir_okay=False),
              help="spec JSON of a teacher model file (e.g. specs/pfld_ghostone.json)")
@click.option("--engine", default=None, help="engine to run the teacher with [default: the bundle's / by suffix]")
@click.option("--images", required=True,
              help="a pool folder with faces.tsv (e.g. ../shared/wider_unlabeled) or DATASET:SPLIT (e.g. 300w:train)")
@click.option("--detector", default=None, type=click.Path(exists=True, dir_okay=False),
              help="the detector ONNX that made the pool's boxes (YuNet), for the box -> crop rule")
@click.option("--data-root", default=None, help="300-W root for the box-rule fit / a DATASET:SPLIT")
@click.option("--no-flip", is_flag=True, help="skip the flipped pass")
@click.option("--out", required=True, help="label file stem: writes OUT.npz and OUT.json (reused when the key matches)")
def pseudo_label_cmd(teacher, teacher_spec, engine, images, detector, data_root, no_flip, out):
    """98-point teacher labels (3 passes: box crop, own-points crop, flipped) with per-point
    disagreement, cached atomically and keyed by the teacher's sha256 and the settings."""
    import numpy as np
    from tqdm import tqdm

    from train.pseudo_label import load_teacher, pseudo_label
    try:
        t = load_teacher(teacher, teacher_spec, engine)
        with tqdm(desc="labelling", unit="face", file=sys.stderr) as bar:
            res = pseudo_label(t, images, out, detector, data_root, not no_flip,
                               progress=bar.update, log=click.echo)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None
    d = res["dis_flip"].mean(1)
    click.echo(json.dumps({"faces": len(res["paths"]), "reused": res["reused"], "out": out,
                           "flip_disagreement_median": float(np.median(d)),
                           "flip_disagreement_p95": float(np.percentile(d, 95))}))


@cli.command("point-map")
@click.option("--labels", required=True, help="teacher label file stem of the 300-W training faces (pseudo-label --images 300w:train)")
@click.option("--val-fraction", default=DEFAULTS.val_fraction, show_default=True)
@click.option("--ridge", default=1e-4, show_default=True)
def point_map_cmd(labels, val_fraction, ridge):
    """The teacher's 98 points mapped to 300-W's 68 on the held-out 300-W training faces: the
    standard index map against a linear map fitted on the other training faces."""
    import numpy as np

    from evaluation.metrics import nme_per_face
    from train.engine import training_faces
    from train.pointmap import PointMap
    from train.pseudo_label import read_labels
    lab = read_labels(labels)
    by_path = dict(zip(lab["paths"], lab["points"]))
    tr, ho = training_faces("300w", "train", None, 0, val_fraction)
    missing = [f for f in tr + ho if str(f.image_path) not in by_path]
    if missing:
        raise click.ClickException(f"{labels}: no label for {missing[0].image_path} (and "
                                   f"{len(missing) - 1} more); label 300w:train first")
    src = lambda fs: np.stack([by_path[str(f.image_path)] for f in fs])   # noqa: E731
    gt = lambda fs: np.stack([f.points for f in fs])                       # noqa: E731
    linear = PointMap.fit(src(tr), gt(tr), ridge)
    res = {"held_out_faces": len(ho), "fitted_on": len(tr),
           "index_map_nme": float(nme_per_face(PointMap.index()(src(ho)), gt(ho), (36, 45)).mean()),
           "linear_map_nme": float(nme_per_face(linear(src(ho)), gt(ho), (36, 45)).mean())}
    click.echo(json.dumps(res))


@cli.command("refit-head")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--head", required=True, help="the head to refit, e.g. 300w68 (the scheme of the labelled training faces)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint to write (atomically; may be --checkpoint)")
@click.option("--report", default=None, type=click.Path(dir_okay=False), help="also write the candidates' held-out NMEs to this JSON")
@click.option("--no-pool", is_flag=True, help="score candidates on the held-out labelled faces only (without the teacher's labels of the pool)")
@click.option("--pool-68", type=click.Choice(["index", "linear"]), default=None, help="the pool faces' 68-point targets for scoring [default: as the checkpoint trained]; e.g. linear for a run trained with --pool-68 none")
@click.option("--select-on-boxes/--no-select-on-boxes", default=None, help="also score candidates on the held-out pool faces cropped from their detector boxes [default: as the checkpoint trained]")
@click.option("--threads", default=1, show_default=True)
@click.option("--replace-shipped", is_flag=True, help="allow --out to be a shipped model (a checkpoint git tracks)")
def refit_head_cmd(checkpoint, head, out, report, no_pool, pool_68, select_on_boxes, threads,
                   replace_shipped):
    """Refit HEAD as a linear map of the heads' outputs (fitted on the training faces, chosen
    on the held-out ones, folded into the head's weights: same network, same latency)."""
    import torch

    from runtime.bundle import atomic_write_json
    from train.engine import save_checkpoint
    from train.refit import refit_head
    from train.ship import refuse_shipped
    torch.set_num_threads(threads)
    try:
        refuse_shipped(out, replace_shipped)
        ck, rep = refit_head(checkpoint, head, pool=not no_pool, pool_68=pool_68,
                             select_on_boxes=select_on_boxes)
    except (LandmarkError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for c in rep["candidates"]:
        ridge = "-" if c["ridge"] is None else f"{c['ridge']:g}"
        per = "  ".join(f"{k} {v * 100:.3f}" for k, v in c["sets"].items())
        click.echo(f"  {'+'.join(c['sources']):16s} ridge {ridge:6s} held-out NME "
                   f"{c['nme'] * 100:.3f} % ({per}){'   <- chosen' if c is rep['chosen'] else ''}")
    save_checkpoint(Path(out), ck)
    if report:
        atomic_write_json(Path(report), rep)
    ch = rep["chosen"]
    click.echo(f"{out}: head {head} = " + ("unchanged (native is best)" if ch["ridge"] is None
               else f"map of {'+'.join(ch['sources'])} (ridge {ch['ridge']:g})") +
               f"; {rep['criterion']}: {ch['nme'] * 100:.3f} %")


@cli.command("fit-report")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--teacher", default=None, type=click.Path(exists=True), help="the teacher (a bundle, or a model file with --teacher-spec): also its and the student's NME and their distance on the WFLW test faces")
@click.option("--teacher-spec", default=None, type=click.Path(exists=True, dir_okay=False), help="spec JSON of a teacher model file")
@click.option("--sample", default=600, show_default=True, help="training faces scored per held-out set (0: all)")
@click.option("--no-pool", is_flag=True, help="the labelled faces only (without the teacher's labels of the pool)")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="also write the figures to this JSON")
@click.option("--threads", default=1, show_default=True)
def fit_report_cmd(checkpoint, teacher, teacher_spec, sample, no_pool, out, threads):
    """How well a multi-head checkpoint fits its training faces (against its held-out faces),
    and, with --teacher, how far it is from the teacher (train/diagnose.py)."""
    import torch

    from runtime.bundle import atomic_write_json
    from train.diagnose import fit_report
    from train.pseudo_label import load_teacher
    torch.set_num_threads(threads)
    try:
        t = load_teacher(teacher, teacher_spec, threads=threads) if teacher else None
        rep = fit_report(checkpoint, sample, t, pool=not no_pool)
    except (LandmarkError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for name, r in rep["fit"].items():
        box = (f", from their detector boxes {r['heldout_box_nme'] * 100:.2f} %"
               if "heldout_box_nme" in r else "")
        click.echo(f"{name:12s} head {r['head']}, {r['targets']}: training faces "
                   f"{r['train_nme'] * 100:.2f} % ({r['train_faces']}), held-out "
                   f"{r['heldout_nme'] * 100:.2f} % ({r['heldout_faces']}){box}")
    if "teacher" in rep:
        t = rep["teacher"]
        for prot in ("landmarks", "rect"):
            r = t[prot]
            click.echo(f"{t['set']} ({t['faces']} faces, {prot} crops, {t['head']}): student "
                       f"{r['student_nme'] * 100:.2f} %, teacher {r['teacher_nme'] * 100:.2f} %, "
                       f"student to teacher {r['student_to_teacher'] * 100:.2f} %")
    if out:
        atomic_write_json(Path(out), rep)


if __name__ == "__main__":
    cli()
