"""Average the weights of several fine-tuned checkpoints ("model soup", Wortsman et al. 2022).

Runs fine-tuned from the same starting weights usually sit in one basin, and their average
often scores better than any of them. The greedy recipe keeps this honest: ingredients are
sorted by their NME on the held-out training faces (the split training used for model
selection), and each is added only if the average does not get worse on those faces. The test
faces are never looked at.

    python train/soup.py runs/p4_soup.pt runs/p4a/last.pt runs/p4b/last.pt
"""
from __future__ import annotations

from pathlib import Path


import click
from runtime.errors import ConfigError, LandmarkError


def average(states: list[dict]) -> dict:
    """Mean of every floating-point tensor; integer buffers (BatchNorm step counts) from the first."""
    out = {}
    for k, v in states[0].items():
        out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype) \
            if v.dtype.is_floating_point else v.clone()
    return out


def _same(cks: list[dict], paths: list[str]) -> None:
    ref = cks[0]
    for ck, p in zip(cks[1:], paths[1:]):
        for key in ("arch", "scheme", "preprocess"):
            if ck[key] != ref[key]:
                raise ConfigError(f"{p}: {key} {ck[key]} differs from {paths[0]}'s {ref[key]}; "
                                 "only checkpoints of one architecture and input rule can be averaged")
        if set(ck["model"]) != set(ref["model"]):
            raise ConfigError(f"{p}: its weights have other tensor names than {paths[0]}'s")


def greedy_soup(paths: list[str], data_root: str | None = None, threads: int = 0,
                log=print) -> dict:
    """Returns the soup checkpoint (a dict save_checkpoint can write) with a "soup" record of
    every ingredient's held-out NME and whether it went in."""
    import torch

    from runtime.schemes import get_scheme
    from train.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
    from train.engine import SCHEME_OF, torch_predictor, training_faces
    from evaluation.metrics import evaluate

    if threads:
        torch.set_num_threads(threads)
    if not paths:
        raise ConfigError("no checkpoints to average")
    cks = [load_checkpoint(p) for p in paths]
    _same(cks, paths)
    cfgs = [ck.get("config") or {} for ck in cks]
    split = {(c.get("dataset"), c.get("train_split"), c.get("val_fraction"),
              c.get("limit_faces", 0)) for c in cfgs}
    if len(split) != 1 or None in next(iter(split)):
        raise ConfigError("the checkpoints do not record one common training set and hold-out "
                         f"(dataset, split, fraction, face limit): {sorted(map(str, split))}")
    dataset, train_split, fraction, limit = split.pop()
    if not fraction:
        raise ConfigError("the checkpoints were trained without a held-out split (val_fraction 0); "
                         "there are no faces to choose the soup on")
    faces = training_faces(dataset, train_split, data_root, limit, fraction)[1]
    first = Checkpoint.from_dict(cks[0], paths[0])
    pre, scheme = first.preprocess, get_scheme(first.scheme)
    ds_scheme = get_scheme(SCHEME_OF[dataset])

    def score(state: dict) -> float:
        ck = dict(cks[0], model=state)
        return evaluate(torch_predictor(model_from_checkpoint(ck)), faces, pre, scheme,
                        ds_scheme, "landmarks")["nme"]

    alone = [score(ck["model"]) for ck in cks]
    order = sorted(range(len(cks)), key=lambda i: alone[i])
    chosen, best = [order[0]], alone[order[0]]
    record = [{"checkpoint": paths[order[0]], "val_nme": alone[order[0]], "soup_val_nme": best,
               "kept": True}]
    log(f"{paths[order[0]]}: held-out NME {best:.5f} (start)")
    for i in order[1:]:
        trial = score(average([cks[j]["model"] for j in chosen + [i]]))
        kept = trial <= best
        record.append({"checkpoint": paths[i], "val_nme": alone[i], "soup_val_nme": trial,
                       "kept": kept})
        log(f"{paths[i]}: held-out NME {alone[i]:.5f} alone, {trial:.5f} in the soup -> "
            f"{'kept' if kept else 'left out'}")
        if kept:
            chosen.append(i)
            best = trial
    base = cks[chosen[0]]
    soup = {k: base[k] for k in ("arch", "scheme", "preprocess", "params", "config") if k in base}
    soup.update(model=average([cks[j]["model"] for j in chosen]),
                epoch=base.get("epoch"), step=base.get("step"), history=base.get("history", []),
                soup={"faces": f"{dataset}:{train_split} held-out {fraction}", "count": len(faces),
                      "val_nme": best, "ingredients": record})
    return soup


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data-root", default=None, help="training dataset folder [default: as in training]")
@click.option("--threads", default=0, show_default=True, help="torch threads (0: default)")
def main(out, checkpoints, data_root, threads):
    """Greedy soup of CHECKPOINTS, chosen on the held-out training faces, written to OUT."""
    from train.checkpoint import save_checkpoint
    try:
        soup = greedy_soup(list(checkpoints), data_root, threads, log=click.echo)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None
    save_checkpoint(Path(out), soup)
    kept = sum(r["kept"] for r in soup["soup"]["ingredients"])
    click.echo(f"{out}: {kept} of {len(checkpoints)} checkpoints averaged, held-out NME "
               f"{soup['soup']['val_nme']:.5f} on {soup['soup']['count']} faces")


if __name__ == "__main__":
    main()
