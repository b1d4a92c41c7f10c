"""Accuracy of landmark predictions: NME (outer-eye-corner normalised), FR and AUC at 0.10,
per-attribute subsets, CED curves, and `evaluate` which runs any predictor through the
runtime's own preprocessing on real faces.

Torch-free: the benchmark and the quantizer score engines with exactly this code.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from runtime.preprocess import Preprocess, landmark_box
from runtime.schemes import Scheme
from evaluation.data import WFLW_ATTRIBUTES, Face
from runtime.errors import ConfigError

PROTOCOLS = {
    "landmarks": "crop from the extent of the ground-truth landmarks",
    "rect": "crop from the official face rectangle (what a detector gives)",
}


def nme_per_face(pred: np.ndarray, gt: np.ndarray, eye_corners: tuple[int, int]) -> np.ndarray:
    """(N, K, 2) predictions and ground truth -> (N,) mean point error / outer-eye distance."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    d = np.linalg.norm(gt[:, eye_corners[0]] - gt[:, eye_corners[1]], axis=-1)
    return np.linalg.norm(pred - gt, axis=-1).mean(-1) / d


def fr_auc(nme: np.ndarray, threshold: float = 0.10, steps: int = 1000) -> tuple[float, float]:
    nme = np.asarray(nme)
    xs = np.linspace(0, threshold, steps + 1)
    ced = np.array([(nme <= x).mean() for x in xs])
    return float((nme > threshold).mean()), float(np.trapezoid(ced, xs) / threshold)


def summarize(nme: np.ndarray, attributes: np.ndarray | None = None) -> dict:
    nme = np.asarray(nme, np.float64)
    fr, auc = fr_auc(nme)
    out = {"nme": float(nme.mean()), "fr_0.10": fr, "auc_0.10": auc, "count": int(len(nme))}
    if attributes is not None and np.asarray(attributes).any():
        attributes = np.asarray(attributes)
        subsets = {}
        for j, name in enumerate(WFLW_ATTRIBUTES):
            m = attributes[:, j] == 1
            if m.any():
                subsets[name] = {"nme": float(nme[m].mean()), "count": int(m.sum())}
        out["subsets"] = subsets
    return out


def face_box(face: Face, protocol: str) -> np.ndarray:
    if protocol == "landmarks":
        return np.array(landmark_box(face.points))
    if protocol == "rect":
        if face.rect is None:
            raise ConfigError(f"{face.source}: no face rectangle; use protocol 'landmarks'")
        return face.rect
    raise ConfigError(f"unknown crop protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def predict_faces(predict: Callable[[np.ndarray], np.ndarray], faces: Sequence[Face],
                  pre: Preprocess, protocol: str = "landmarks", batch: int = 32,
                  progress: Callable[[int], None] | None = None,
                  confidences: list | None = None) -> np.ndarray:
    """Run `predict` (NCHW float batch -> (N, 2K)) on each face; (N, K, 2) image points.
    When `confidences` is a list and the predictor reports per-point confidences after a call
    (`predict.confidence`, heatmap outputs), each chunk's (n, K) array is appended to it."""
    out = []
    for i in range(0, len(faces), batch):
        chunk = faces[i:i + batch]
        mats = [pre.crop_matrix(face_box(f, protocol)) for f in chunk]
        x = pre.normalize(np.stack([pre.crop(f.image(), m) for f, m in zip(chunk, mats)]))
        out.append(pre.decode(np.asarray(predict(x)), mats))
        if confidences is not None:
            c = getattr(predict, "confidence", None)
            if c is not None:
                confidences.append(np.asarray(c, np.float64))
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for telling `positive` items from the rest
    (Mann-Whitney U with tied ranks averaged); None when one class is empty."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]     # 1-based, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confidence_quality(conf: np.ndarray, points: np.ndarray, faces: Sequence[Face],
                       eye_corners: tuple[int, int], threshold: float = 0.10,
                       gt: np.ndarray | None = None) -> dict:
    """How well a per-point confidence flags large point errors: ROC AUC of (1 - p) for the
    points whose error exceeds `threshold` x the outer-eye distance (1.0: every bad point has a
    lower p than every good one; 0.5: no information), over all faces and over the WFLW
    occlusion faces. Needs predictions in the faces' own scheme, or `gt` in the predictions'
    scheme (e.g. 98-point faces mapped to 68 points for a 68-point model)."""
    gt = np.stack([f.points for f in faces]).astype(np.float64) if gt is None else gt
    d = np.linalg.norm(gt[:, eye_corners[0]] - gt[:, eye_corners[1]], axis=-1)
    err = np.linalg.norm(np.asarray(points, np.float64) - gt, axis=-1) / d[:, None]
    bad = err > threshold
    out = {"threshold": threshold, "points": int(bad.size), "bad_points": int(bad.sum()),
           "auc_flag_bad": rank_auc(-conf, bad), "mean_p_good": float(conf[~bad].mean())
           if (~bad).any() else None, "mean_p_bad": float(conf[bad].mean()) if bad.any() else None}
    attrs = np.stack([f.attributes for f in faces])
    j = WFLW_ATTRIBUTES.index("occlusion")
    occ = attrs[:, j] == 1 if attrs.ndim == 2 and attrs.shape[1] > j else np.zeros(len(faces), bool)
    if occ.any():
        out["occlusion"] = {"faces": int(occ.sum()), "bad_points": int(bad[occ].sum()),
                            "auc_flag_bad": rank_auc(-conf[occ], bad[occ])}
    return out


def score(points: np.ndarray, faces: Sequence[Face], model_scheme: Scheme,
          data_scheme: Scheme, as68: bool = False) -> np.ndarray:
    """Per-face NME of predictions in `model_scheme` against ground truth in `data_scheme`.

    A 68-point model is scored on 98-point faces (and a 98-point model on 68-point faces)
    through the standard 98 -> 68 index map; `as68` scores a 98-point model on 98-point faces
    through that map too (both sides), comparable with a 68-point model's figure.
    """
    gt = np.stack([f.points for f in faces]).astype(np.float64)
    if as68 and model_scheme.to_68 is not None and data_scheme.to_68 is not None:
        from runtime.schemes import get_scheme
        return nme_per_face(model_scheme.as_68(points), data_scheme.as_68(gt),
                            get_scheme("300w68").eye_corners)
    if model_scheme.num_points == data_scheme.num_points:
        return nme_per_face(points, gt, data_scheme.eye_corners)
    if model_scheme.num_points == 68 and data_scheme.to_68 is not None:
        return nme_per_face(points, data_scheme.as_68(gt), model_scheme.eye_corners)
    if data_scheme.num_points == 68 and model_scheme.to_68 is not None:
        return nme_per_face(model_scheme.as_68(points), gt, data_scheme.eye_corners)
    raise ConfigError(f"cannot score {model_scheme.name} predictions on {data_scheme.name} faces")


def evaluate(predict, faces, pre: Preprocess, model_scheme: Scheme, data_scheme: Scheme,
             protocol: str = "landmarks", batch: int = 32, progress=None, as68: bool = False) -> dict:
    confs: list = []
    pts = predict_faces(predict, faces, pre, protocol, batch, progress, confs)
    nme = score(pts, faces, model_scheme, data_scheme, as68)
    res = summarize(nme, np.stack([f.attributes for f in faces]))
    if confs and not as68:
        if model_scheme.num_points == data_scheme.num_points:
            res["confidence"] = confidence_quality(np.concatenate(confs), pts, faces,
                                                   data_scheme.eye_corners)
        elif model_scheme.num_points == 68 and data_scheme.to_68 is not None:
            gt68 = data_scheme.as_68(np.stack([f.points for f in faces]).astype(np.float64))
            res["confidence"] = confidence_quality(np.concatenate(confs), pts, faces,
                                                   model_scheme.eye_corners, gt=gt68)
    res["protocol"] = protocol
    res["_nme"] = nme
    res["_points"] = pts
    return res


def plot_ced(curves: dict[str, np.ndarray], path, threshold: float = 0.10, title: str = "") -> None:
    """CED curves (label -> per-face NME) to a PNG, written atomically."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.bundle import atomic_write_bytes
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    xs = np.linspace(0, threshold, 201)
    for label, nme in curves.items():
        nme = np.asarray(nme)
        fr, auc = fr_auc(nme, threshold)
        ax.plot(xs * 100, [(nme <= x).mean() for x in xs],
                label=f"{label}: NME {nme.mean() * 100:.2f}%, AUC {auc:.3f}")
    ax.set_xlabel("NME (%)")
    ax.set_ylabel("fraction of faces")
    ax.set_xlim(0, threshold * 100)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Cumulative error distribution")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def face_batch(faces: Sequence[Face], pre: Preprocess, protocol: str = "rect") -> np.ndarray:
    """NCHW network input for real faces, cut by the runtime's own preprocessing."""
    mats = [pre.crop_matrix(face_box(f, protocol)) for f in faces]
    return pre.normalize(np.stack([pre.crop(f.image(), m) for f, m in zip(faces, mats)]))
