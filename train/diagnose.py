"""Where a student's error comes from: how well it fits its own training faces, and how far it
is from its teacher.

    python train/run.py fit-report --checkpoint models/student_w05.pt \
        --teacher artifacts/pfld_ghostone/onnx_sim_fp32

1. Fit: each head's NME on (a fixed sample of) the faces it trained on against the targets it
   trained on, next to the same head on the run's held-out faces; for held-out pool faces also
   from their detector boxes ("rect" protocol with the pool's own detector box, the runtime's
   path; training's held-out figures crop from the teacher's points). Training NME close to the
   held-out NME means the network underfits (capacity or optimisation is the limit, not the
   amount of data); a large gap means it overfits (more faces would help). Faces are cut by
   the "landmarks" protocol from their targets, as training's canonical crop, no augmentation.
2. Teacher distance (with --teacher): on the WFLW test faces, the student's NME, the teacher's
   and the distance between the two (mean point distance over the ground truth's eye
   distance). A student trained on the teacher's points cannot be expected to beat the
   teacher by much; its distance to the teacher bounds how close it can come. This is an
   analysis of test faces: nothing is chosen by it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from evaluation.metrics import nme_per_face, predict_faces
from evaluation.sets import load_set, set_info
from runtime.schemes import get_scheme
from train.checkpoint import Checkpoint
from train.engine import torch_predictor
from train.refit import checkpoint_data
from runtime.errors import ConfigError

TEACHER_SET = "wflw:test"


def _sample(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def fit_report(checkpoint, sample: int = 600, teacher=None, data_root=None, wflw=None,
               pool: bool = True, progress=None) -> dict:
    """{"fit": {set: {head, targets, train_faces, train_nme, heldout_faces, heldout_nme,
    heldout_box_nme (pool sets)}},
    "teacher": {protocol: {student_nme, teacher_nme, student_to_teacher}}} (NME fractions).
    `pool` False: the labelled faces only (no teacher labels needed)."""
    ck = Checkpoint.load(checkpoint)
    heads = ck.named_heads
    if not ck.family.multi_head or not heads:
        raise ConfigError(f"{checkpoint}: fit-report needs a PFLD trained with --heads "
                         "(its run config names its training faces)")
    data = checkpoint_data(ck.raw, checkpoint, data_root, pool)
    model = ck.build()
    pre = ck.preprocess
    labelled = {str(f.image_path) for f in data.labelled}
    own = ck.scheme
    logged = {**data.val, **data.extra}
    groups = {}          # held-out set -> (head, [(training face, its target)], held-out faces)
    for name, (faces, head) in data.val.items():
        if name in data.protocols:        # a detector-box set: scored with its pool set below
            continue
        # "val" holds out labelled faces, every other set pool faces: train on the same kind
        train = [(it.face, it.targets[head]) for it in data.items if head in it.targets
                 and (str(it.face.image_path) in labelled) == (name == "val")]
        groups[name] = (head, train, faces)
    out = {"checkpoint": str(checkpoint), "sample": sample, "fit": {}}
    for name, (head, train, held) in groups.items():
        eyes = get_scheme(head).eye_corners
        pick = [train[i] for i in _sample(len(train), sample)]
        faces = [f for f, _ in pick]
        tgt = np.stack([t for _, t in pick]).astype(np.float64)
        predict = torch_predictor(model, head)
        # the crop is cut from the training target (pool faces carry the teacher's points)
        crop_faces = [_with_points(f, t) for f, t in pick]
        p_tr = predict_faces(predict, crop_faces, pre, "landmarks", progress=progress)
        p_ho = predict_faces(predict, held, pre, "landmarks", progress=progress)
        gt_ho = np.stack([f.points for f in held])
        out["fit"][name] = {
            "head": head, "targets": "real labels" if head == own and name == "val"
            else "teacher labels",
            "train_faces": len(faces), "train_nme": float(nme_per_face(p_tr, tgt, eyes).mean()),
            "heldout_faces": len(held),
            "heldout_nme": float(nme_per_face(p_ho, gt_ho, eyes).mean())}
        boxed = logged.get(f"{name}_box")          # prepare_data's detector-box set
        if boxed is not None:
            p_box = predict_faces(predict, boxed[0], pre, "rect", progress=progress)
            out["fit"][name]["heldout_box_nme"] = float(nme_per_face(p_box, gt_ho, eyes).mean())
    if teacher is not None:
        out["teacher"] = teacher_distance(model, pre, heads, teacher, wflw, progress)
    return out


def _with_points(face, points):
    return dataclasses.replace(face, points=np.asarray(points, np.float32))


def teacher_distance(model, pre, heads, teacher, wflw=None, progress=None) -> dict:
    """`teacher`: a train.pseudo_label.Teacher (load_teacher: a bundle, or a model file and
    its spec)."""
    t = teacher.model
    faces = load_set(TEACHER_SET, wflw)
    scheme = get_scheme(set_info(TEACHER_SET).scheme)
    if scheme.name not in heads or t.scheme.name != scheme.name:
        raise ConfigError(f"teacher distance needs a {scheme.name} head on both models (student: "
                         f"{', '.join(heads)}; teacher {teacher.name}: {t.scheme.name})")
    gt = np.stack([f.points for f in faces]).astype(np.float64)
    e = scheme.eye_corners
    eye = np.linalg.norm(gt[:, e[0]] - gt[:, e[1]], axis=-1)
    res = {"set": TEACHER_SET, "faces": len(faces), "head": scheme.name,
           "teacher": teacher.name, "teacher_sha256": teacher.sha256}
    for prot in ("landmarks", "rect"):
        ps = predict_faces(torch_predictor(model, scheme.name), faces, pre, prot,
                           progress=progress)
        pt = predict_faces(t, faces, t.pre, prot, progress=progress)
        res[prot] = {"student_nme": float(nme_per_face(ps, gt, e).mean()),
                     "teacher_nme": float(nme_per_face(pt, gt, e).mean()),
                     "student_to_teacher": float((np.linalg.norm(ps - pt, axis=-1).mean(-1)
                                                  / eye).mean())}
    return res
