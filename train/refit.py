"""Refit one head of a multi-head PFLD as a linear map of the heads' outputs, folded into it.

A two-head student's 98-point head learns from ~8,700 faces (teacher labels), its 68-point head
from ~1,900 real labels plus mapped teacher points; measured on the held-out 300-W training
faces, the 98 head's points carried to 68 by a fitted linear map beat the 68 head's own. Every
head is a fully-connected layer on the same features, so a linear map of head outputs is again a
fully-connected layer: the map is folded into the head's weights, and the network, its export,
INT8 and latency stay exactly as they were.

Candidates (sources x ridge, and "native": no change) are fitted on the checkpoint's training
faces and chosen by NME on its held-out faces (the same hash split training selected on); test
faces take no part.

    python train/run.py refit-head --checkpoint models/student_w05.pt --head 300w68 \
        --out models/student_w05.pt
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from evaluation.metrics import nme_per_face, predict_faces
from runtime.schemes import get_scheme
from train.checkpoint import Checkpoint
from train.engine import torch_predictor
from train.pointmap import PointMap
from runtime.errors import ConfigError

RIDGES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def fold(state: dict, head: str, sources: list[str], pmap: PointMap) -> dict:
    """A state dict whose `head` outputs pmap(concatenated `sources` outputs): the heads are
    Linear layers with (x0, y0, x1, y1, ...) outputs, so the map is kron(A, I2) on them."""
    a2 = torch.from_numpy(np.kron(pmap.matrix(), np.eye(2)))
    w = torch.cat([state[f"heads.{s}.weight"].double() for s in sources])
    b = torch.cat([state[f"heads.{s}.bias"].double() for s in sources])
    if a2.shape[1] != w.shape[0]:
        raise ConfigError(f"map takes {a2.shape[1] // 2} points, the sources "
                         f"{'+'.join(sources)} give {w.shape[0] // 2}")
    out = dict(state)
    dtype = state[f"heads.{head}.weight"].dtype
    out[f"heads.{head}.weight"] = (a2 @ w).to(dtype)
    out[f"heads.{head}.bias"] = (a2 @ b).to(dtype)
    return out


def checkpoint_data(ck: dict, checkpoint, data_root=None, pool: bool = True,
                    pool_68: str | None = None, select_on_boxes: bool | None = None):
    """The RunData (training faces, held-out sets) a checkpoint trained on, rebuilt from its
    saved config; `pool` False leaves the teacher's pool faces out, `pool_68` overrides how the
    pool faces' 68-point targets are made, `select_on_boxes` whether the held-out pool faces
    cropped from their detector boxes are a held-out set."""
    from train.engine import TrainConfig, prepare_data
    c = ck.get("config") or {}
    keep = ("dataset", "train_split", "val_fraction", "limit_faces", "heads", "pool_68",
            "disagreement_tau", "max_disagreement", "select_on_boxes", "real", "real_repeat")
    over = {k: v for k, v in (("pool_68", pool_68), ("select_on_boxes", select_on_boxes))
            if v is not None}
    saved = {k: tuple(c[k]) if isinstance(c[k], list) else c[k] for k in keep if k in c}
    cfg = TrainConfig(**{**saved, **over}, data_root=data_root,
                      labels=tuple(c.get("labels", ())) if pool else ())
    for stem in cfg.labels:
        if not Path(f"{stem}.npz").is_file():
            raise ConfigError(f"{checkpoint} was trained with teacher labels {stem}.npz, which do "
                             "not exist here: make them (`make labels`)"
                             + (" or leave the pool out (--no-pool)" if pool else ""))
    return prepare_data(cfg)


def refit_head(checkpoint, head: str, ridges=RIDGES, data_root=None, progress=None,
               sources: list[list[str]] | None = None, pool: bool = True,
               pool_68: str | None = None, select_on_boxes: bool | None = None
               ) -> tuple[dict, dict]:
    """(new checkpoint, report). The report lists every candidate's held-out NMEs and the choice.

    Candidates are scored as training selected epochs: the mean NME over the run's held-out
    sets, i.e. the held-out 300-W faces (real labels) and, with `pool`, the held-out pool faces
    against the teacher's points carried to `head` by the map training used (so a map that fits
    300-W crops but amplifies errors on in-the-wild faces loses).
    sources: the head lists to try (default: every subset of the other heads, alone and with
    `head`, and `head` alone). pool_68: how the pool faces' targets of `head` are made for
    scoring ("linear" / "index"; default: as the checkpoint trained), e.g. to score a run
    trained with `--pool-68 none` on the same pool set as the others. select_on_boxes: also
    score on the held-out pool faces cropped from their detector boxes (default: as the
    checkpoint trained)."""
    ck = Checkpoint.load(checkpoint)
    heads = ck.named_heads
    if not ck.family.multi_head or len(heads) < 2:
        raise ConfigError(f"{checkpoint}: refit-head needs a multi-head PFLD (heads: "
                         f"{', '.join(heads) or 'one'})")
    if head not in heads:
        raise ConfigError(f"{checkpoint}: no head {head!r} (heads: {', '.join(heads)})")
    if head != ck.scheme:
        raise ConfigError(f"{checkpoint}: head {head} is not the scheme of its labelled training "
                         f"faces ({ck.scheme}); only that head can be refitted on them")
    data = checkpoint_data(ck.raw, checkpoint, data_root, pool, pool_68, select_on_boxes)
    tr = data.labelled
    sets = {"heldout": (data.val["val"][0], None)}
    if pool and data.pool_map is not None:
        sets.update({k: (faces, data.pool_map) for k, (faces, scheme) in data.val.items()
                     if k != "val" and scheme != head})
    if len(tr) < 10 or not sets["heldout"][0]:
        raise ConfigError(f"{checkpoint}: {len(tr)} training / {len(sets['heldout'][0])} held-out "
                         "faces; need >= 10 and >= 1")
    model = ck.build()
    pre = ck.preprocess
    parts = {"train": tr, **{k: v[0] for k, v in sets.items()}}
    pts = {(name, h): predict_faces(torch_predictor(model, h), faces, pre,
                                    data.protocols.get(name, "landmarks"), progress=progress)
           for name, faces in parts.items() for h in heads}
    gt = {"train": np.stack([f.points for f in tr])}
    gt.update({k: m(np.stack([f.points for f in fs])) if m is not None
               else np.stack([f.points for f in fs]) for k, (fs, m) in sets.items()})
    eyes = get_scheme(head).eye_corners

    def scored(points_of) -> dict:
        per = {k: float(nme_per_face(points_of(k), gt[k], eyes).mean()) for k in sets}
        return {"nme": float(np.mean(list(per.values()))), "sets": per}

    cands = [{"sources": [head], "ridge": None, **scored(lambda k: pts[k, head])}]
    if sources:
        subsets = [list(s) for s in sources]
    else:
        others = [h for h in heads if h != head]
        alone = [list(c) for r in range(1, len(others) + 1)
                 for c in itertools.combinations(others, r)]
        subsets = [[head], *alone, *([head, *c] for c in alone)]
    maps = {}
    for src, ridge in itertools.product(subsets, ridges):
        cat = lambda part: np.concatenate([pts[part, s] for s in src], 1)   # noqa: E731
        m = PointMap.fit(cat("train"), gt["train"], ridge)
        maps[len(cands)] = m
        cands.append({"sources": src, "ridge": ridge, **scored(lambda k: m(cat(k)))})
    best = min(range(len(cands)), key=lambda i: (cands[i]["nme"], i))
    chosen = cands[best]
    report = {"checkpoint": str(checkpoint), "head": head, "fitted_on": len(tr),
              "heldout_faces": {k: len(v[0]) for k, v in sets.items()},
              "criterion": "mean held-out NME over: " + ", ".join(
                  f"{k} ({'real labels' if m is None else ('real' if k in data.real_val else 'teacher')}"
                  f"{'' if m is None else ' points mapped to ' + head})"
                  for k, (_, m) in sets.items()),
              "candidates": cands, "chosen": chosen}
    out = dict(ck.raw)
    if chosen["ridge"] is not None:
        out["model"] = fold(ck.weights, head, chosen["sources"], maps[best])
    out["head_map"] = {k: report[k] for k in ("head", "fitted_on", "heldout_faces", "criterion",
                                             "chosen")}
    return out, report
