"""The training loop: seeded, resumable from atomic checkpoints, evaluated every epoch,
and data-parallel through torch DDP when started by `torchrun` (gloo on CPU).

Used by train/run.py; tests call `train(TrainConfig(...))` directly.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime.pose import head_pose
from runtime.preprocess import Preprocess
from runtime.schemes import get_scheme
from evaluation import data as D
from train.augment import AugmentConfig, augment_sets
from train.checkpoint import Checkpoint, save_checkpoint
from train.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: F401 - re-exported
from train.family import FAMILIES, family_of
from evaluation.metrics import evaluate
from train.model import count_params
from runtime.errors import ConfigError

SCHEME_OF = {"wflw": "wflw98", "300w": "300w68"}


@dataclass
class TrainConfig:
    dataset: str = "300w"                # wflw | 300w
    data_root: str | None = None         # default: LANDMARK_<DATASET> or ../shared/<dataset>
    train_split: str = "train"
    val_fraction: float = D.HELDOUT_FRACTION   # held out of the training faces, for model selection
    eval_sets: tuple[str, ...] = ()      # extra "dataset:split" sets scored each epoch (logged)
    width: float = 1.0
    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "wing"
    pose_weight: float = 1.0             # aux pose L1 (radians) added to non-PFLD losses
    seed: int = 0
    out: str = "runs/train"
    threads: int = 0                     # 0: torch's default
    max_steps: int = 0                   # stop after this many steps in total (0: no limit)
    limit_faces: int = 0                 # use only the first N training faces (tests)
    progress: bool = True
    init: str | None = None              # start from these weights (fine-tuning); not a resume
    ema: float = 0.0                     # decay of an exponential moving average of the weights
                                         # (0: off); when on, the average is evaluated and saved
    heads: tuple[str, ...] = ()          # point schemes with a head each, e.g. ("300w68",
                                         # "wflw98"); empty: one head of the dataset's scheme
    labels: tuple[str, ...] = ()         # teacher label files (train/run.py pseudo-label --out):
                                         # ones for the training faces add their scheme's
                                         # targets, others (a pool) add unlabelled faces
    pool_68: str = "linear"              # 68-point targets of pool faces from teacher 98:
                                         # none | index (98 -> 68 map) | linear (fitted map)
    head_weights: tuple[float, ...] = () # loss weight per head (default 1 each)
    disagreement_tau: float = 0.0        # per-point weight 1 / (1 + (d / tau)^2) from the
                                         # teacher's flip disagreement d (0: off)
    max_disagreement: float = 0.2        # drop pool faces whose mean flip disagreement is larger
    real: tuple[str, ...] = ()           # extra really labelled sets mixed in (REAL_SETS keys,
                                         # e.g. "wflw:train"), each with its own hash hold-out;
                                         # a pool face that is one of their faces is dropped
    real_repeat: int = 1                 # each real face appears this many times an epoch
    real_mapped: bool = False            # also train the own head on real faces through the
                                         # pool's 98 -> 68 map (off: only their own scheme's head)
    select_on_boxes: bool = False        # the held-out pool faces cropped from their detector
                                         # boxes join the selection mean (always logged)
    neck: int = 0                        # PFLD's last-stage channels (0: 128 x width; train/model.py)
    tail: int = 0                        # PFLD's 14 x 14 output channels (0: 16 x width)
    family: str = "pfld"                 # train.family.FAMILIES: pfld (coordinate regression) |
                                         # heatmap (train/heatmap.py)
    hm_encoding: str = "continuous"      # heatmap targets: continuous | rounded (the baseline)
    hm_decoder: str = "local_soft_argmax"   # runtime.decode.HEATMAP_DECODERS
    hm_window: int = 5                   # local soft-argmax window
    siamese: bool = False                # heatmap: two augmentations, warped back, averaged
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_holdout(faces: list[D.Face], fraction: float) -> tuple[list[D.Face], list[D.Face]]:
    """Deterministic split by a hash of each face's annotation source (stable across runs)."""
    return D.holdout_split(faces, fraction)


def training_faces(dataset: str, split: str, data_root: str | None, limit: int,
                   fraction: float) -> tuple[list[D.Face], list[D.Face]]:
    """The training faces and the held-out faces of a run: the first `limit` faces (0: all)
    of dataset:split, split by split_holdout. train() and train/soup.py both use it, so the
    soup is chosen on exactly the faces training selected on."""
    faces = D.load(dataset, split, data_root)
    return split_holdout(faces[:limit] if limit else faces, fraction)


def steps_per_rank(n_faces: int, world: int, batch: int) -> int:
    """Optimizer steps per epoch; a last batch of one face is dropped (BatchNorm needs two)."""
    per_rank = n_faces // world
    return per_rank // batch + (1 if per_rank % batch > 1 else 0)


def _parse_set(spec: str):
    ds, _, split = spec.partition(":")
    if ds not in SCHEME_OF or not split:
        raise ConfigError(f"evaluation set {spec!r}: expected DATASET:SPLIT, e.g. 300w:helen_test")
    return ds, split


@dataclass
class Item:
    """One training face: its image and, per head (point scheme), the target points in image
    pixels and per-point loss weights. A head the face has no labels for is absent."""
    face: D.Face
    targets: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]


def make_batch(items: list[Item], idx, heads: list[str], pre: Preprocess, rng,
               aug: AugmentConfig):
    """Augmented batch: x (N,3,H,W), per head (y (N,2K), mask (N,), w (N,K)), pose, attributes.

    The head-pose label comes from the first labelled head of each face (pose works for any
    scheme)."""
    n = pre.input_size
    schemes = {h: get_scheme(h) for h in heads}
    crops, poses, attrs = [], [], []
    ys = {h: np.zeros((len(idx), 2 * schemes[h].num_points), np.float32) for h in heads}
    ws = {h: np.zeros((len(idx), schemes[h].num_points), np.float32) for h in heads}
    for r, i in enumerate(idx):
        it = items[i]
        c, pts = augment_sets(it.face.image(), it.targets, schemes, n, rng, aug)
        crops.append(c)
        for h, p in pts.items():
            ys[h][r] = (p / n).reshape(-1)
            ws[h][r] = it.weights[h]
        ref = next(iter(pts))
        poses.append(np.radians(head_pose(pts[ref], schemes[ref], (n, n))))
        attrs.append(it.face.attributes)
    x = torch.from_numpy(pre.normalize(np.stack(crops)))
    targets = {h: (torch.from_numpy(ys[h]), torch.from_numpy(ws[h].sum(1) > 0),
                   torch.from_numpy(ws[h])) for h in heads}
    pose = torch.from_numpy(np.nan_to_num(np.stack(poses)).astype(np.float32))
    return x, targets, pose, torch.from_numpy(np.stack(attrs).astype(np.float32))


class WeightAverage:
    """Exponential moving average of every float tensor in a model's state (weights and
    BatchNorm statistics), warmed up as decay_t = min(decay, (1 + t) / (10 + t)) so the first
    steps do not drag the average towards the starting weights for long."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)


def torch_predictor(model, head: str | None = None):
    """NCHW numpy batch -> (N, 2K) numpy points of one head (default: the only/first one); the
    outputs of a family with a decoder (a heatmap model's maps) are decoded by the runtime's."""
    decode = family_of(getattr(model, "arch", {})).decoder(model)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model.forward_heads(torch.from_numpy(x))
            y = out[head if head else next(iter(out))].numpy()
        return decode(y) if decode is not None else y
    return predict




# -- a run, step by step -----------------------------------------------------------------------
@dataclass
class RunData:
    heads: list[str]                       # head names (= point schemes), model output order
    items: list[Item]                      # training faces
    val: dict[str, tuple[list[D.Face], str]]   # held-out set -> (faces, head that scores it)
    extra: dict[str, tuple[list[D.Face], str]]  # --eval-set sets, logged only
    notes: dict = field(default_factory=dict)
    pool_map: object = None                # PointMap: the pool faces' targets of the own head
    labelled: list[D.Face] = field(default_factory=list)   # the labelled faces it trains on
    real_val: set = field(default_factory=set)  # held-out sets with real labels (from --real)
    protocols: dict[str, str] = field(default_factory=dict)  # held-out/extra set -> crop protocol
                                                             # (default "landmarks")


# Really labelled sets a run can mix in (--real): key -> (scheme, (train, held out) loader)
REAL_SETS = {"wflw:train": ("wflw98", D.wflw_train_split)}


def _real_sets(cfg: TrainConfig, heads: list[str]) -> list[tuple[str, str, list, list]]:
    """[(key, scheme, train faces, held-out faces)] of cfg.real."""
    out = []
    for key in cfg.real:
        if key not in REAL_SETS:
            raise ConfigError(f"--real {key!r}: not a known labelled set (known: {', '.join(REAL_SETS)})")
        scheme, split = REAL_SETS[key]
        if scheme not in heads:
            raise ConfigError(f"--real {key} has {scheme} labels but the heads are {', '.join(heads)}; "
                             f"add --heads ...,{scheme}")
        tr, ho = split(None)
        out.append((key, scheme, tr[:cfg.limit_faces] if cfg.limit_faces else tr, ho))
    return out


def _pool_faces(labels: dict, scheme: str) -> list[D.Face]:
    """Pool faces with their teacher points; the hold-out key is each path relative to the
    folder all of them share, so the split does not depend on where the pool lies."""
    paths = [Path(p) for p in labels["paths"]]
    common = Path(os.path.commonpath([p.parent for p in paths])) if paths else None
    return [D.Face(p, pts, None, np.zeros(6, np.int64), str(p),
                   D.split_key("pool", p.relative_to(common)))
            for p, pts in zip(paths, labels["points"])]


def pool_of(faces: list[D.Face]) -> tuple[Path, dict] | None:
    """(root, {resolved image path: PoolFace}) of the pool the faces come from: the nearest
    folder above the first image holding a faces.tsv. None if they are not pool faces."""
    from train.pseudo_label import POOL_TSV, load_pool
    if not faces:
        return None
    root = next((d for d in Path(faces[0].image_path).resolve().parents
                 if (d / POOL_TSV).is_file()), None)
    if root is None:
        return None
    return root, {Path(p.image_path).resolve(): p for p in load_pool(root)}


def pool_detector_boxes(faces: list[D.Face]) -> list[D.Face] | None:
    """The faces with `rect` = their detector box from their pool's faces.tsv, for the "rect"
    protocol: the crop a detector gives, as in the runtime. None if they are not pool faces."""
    from train.pseudo_label import POOL_TSV
    pool = pool_of(faces)
    if pool is None:
        return None
    root, by_path = pool
    box = {k: p.box for k, p in by_path.items()}
    out = []
    for f in faces:
        b = box.get(Path(f.image_path).resolve())
        if b is None:
            raise D.DataError(f"{f.image_path}: not in {root / POOL_TSV}")
        out.append(replace(f, rect=np.asarray(b, np.float32)))
    return out


def prepare_data(cfg: TrainConfig) -> RunData:
    """Training items and held-out sets of a run: the labelled faces (hash hold-out), teacher
    labels attached to them, and pool faces (their own hash hold-out, scored against the
    teacher's labels)."""
    from train.pointmap import PointMap
    from train.pseudo_label import read_labels
    own = SCHEME_OF[cfg.dataset]
    heads = list(cfg.heads) or [own]
    for h in heads:
        get_scheme(h)
    train_faces, val_faces = training_faces(cfg.dataset, cfg.train_split, cfg.data_root,
                                            cfg.limit_faces, cfg.val_fraction)
    if not train_faces:
        raise D.DataError(f"{cfg.dataset}:{cfg.train_split} has no training faces "
                          f"(all {len(val_faces)} went to the hold-out)")
    k_own = get_scheme(own).num_points
    items = [Item(f, {own: f.points}, {own: np.ones(k_own, np.float32)}) for f in train_faces]
    by_path = {str(f.image_path): it for f, it in zip(train_faces, items)}
    held = {str(f.image_path) for f in val_faces}
    data = RunData(heads, [], {}, {}, labelled=train_faces)
    if val_faces and own in heads:
        data.val["val"] = (val_faces, own)
    pools = []
    for stem in cfg.labels:
        lab = read_labels(stem)
        scheme = lab["info"]["scheme"]
        if scheme not in heads:
            raise ConfigError(f"labels {stem} are {scheme} points but the heads are {', '.join(heads)}")
        w = _point_weights(lab["dis_flip"], cfg.disagreement_tau)
        attached = 0
        for p, pts, wp in zip(lab["paths"], lab["points"], w):
            if p in by_path:
                by_path[p].targets[scheme], by_path[p].weights[scheme] = pts, wp
                attached += 1
        if attached:
            data.notes[stem] = f"{attached} training faces got {scheme} targets"
            continue
        pools.append((stem, lab, scheme, w))
    pmap = None
    if pools and own in heads and cfg.pool_68 != "none":
        if cfg.pool_68 == "index":
            pmap = PointMap.index(pools[0][2])
        else:
            paired = [it for it in items if len(it.targets) > 1 and pools[0][2] in it.targets]
            if len(paired) < 10:
                raise ConfigError("--pool-68 linear needs teacher labels of the training faces "
                                 "(a --labels file for them)")
            pmap = PointMap.fit(np.stack([it.targets[pools[0][2]] for it in paired]),
                                np.stack([it.targets[own] for it in paired]))
    real_faces = []
    for key, scheme, tr, ho in _real_sets(cfg, heads):
        k = get_scheme(scheme).num_points
        for f in tr:
            t, wt = {scheme: f.points}, {scheme: np.ones(k, np.float32)}
            if cfg.real_mapped and pmap is not None and own != scheme:   # mapped, as pool faces
                t[own], wt[own] = pmap(f.points), np.ones(k_own, np.float32)
            items.extend(Item(f, t, wt) for _ in range(max(1, cfg.real_repeat)))
        if ho:
            data.val[f"val_{key.split(':')[0]}"] = (ho, scheme)
            data.real_val.add(f"val_{key.split(':')[0]}")
        real_faces += tr + ho
        data.notes[key] = (f"{len(tr)} real {scheme} faces to train (x{max(1, cfg.real_repeat)} an "
                           f"epoch), {len(ho)} held out")
    for stem, lab, scheme, w in pools:
        keep = lab["dis_flip"].mean(1) <= cfg.max_disagreement
        n_disagree = int((~keep).sum())
        pool_faces = _pool_faces(lab, scheme)
        pool = pool_of(pool_faces) if real_faces else None
        if pool is not None:    # the real label wins: drop pool faces that are one of the real faces
            from train.samefaces import same_faces
            paths = [Path(f.image_path).resolve() for f in pool_faces]
            same = {Path(p).resolve() for p in same_faces(real_faces, [pool[1][p] for p in paths
                                                                       if p in pool[1]])}
            real_same = np.array([p in same for p in paths])
            keep = keep & ~real_same
            data.notes[f"{stem} same as real"] = (f"{int(real_same.sum())} pool faces dropped: "
                                                  "the same face has a real label")
        faces = [f for f, k in zip(pool_faces, keep) if k]
        weights = {f.source: wp for f, wp in zip(pool_faces, w)}
        tr, ho = split_holdout(faces, cfg.val_fraction)
        for f in tr:
            if f.source in held:
                continue
            t = {scheme: f.points}
            wt = {scheme: weights[f.source]}
            if pmap is not None:
                t[own], wt[own] = pmap(f.points), np.ones(k_own, np.float32)
            items.append(Item(f, t, wt))
        if ho:
            data.val[f"val_{Path(stem).name}"] = (ho, scheme)
            boxed = pool_detector_boxes(ho)
            if boxed is not None:
                name = f"val_{Path(stem).name}_box"
                (data.val if cfg.select_on_boxes else data.extra)[name] = (boxed, scheme)
                data.protocols[name] = "rect"
        data.notes[stem] = (f"{len(tr)} pool faces to train, {len(ho)} held out, "
                            f"{n_disagree} dropped (disagreement > {cfg.max_disagreement})")
    if pools and pmap is not None:
        data.notes["pool_68"] = cfg.pool_68
        data.pool_map = pmap
    for it in items:
        it.targets = {h: it.targets[h] for h in heads if h in it.targets}
        it.weights = {h: it.weights[h] for h in heads if h in it.weights}
    data.items = [it for it in items if it.targets]
    for spec in cfg.eval_sets:
        ds, split = _parse_set(spec)
        scheme = SCHEME_OF[ds]
        data.extra[spec] = (D.load(ds, split), scheme if scheme in heads else heads[0])
    return data


def _point_weights(dis: np.ndarray, tau: float) -> np.ndarray:
    if tau <= 0:
        return np.ones(dis.shape, np.float32)
    return (1.0 / (1.0 + (dis / tau) ** 2)).astype(np.float32)


def build_model(cfg: TrainConfig, heads: list[str]) -> torch.nn.Module:
    """The network of a run (its family's builder), from --init weights when given."""
    family = FAMILIES[cfg.family]
    if not family.multi_head and len(heads) != 1:
        raise ConfigError(f"the {family.name} family has one head (one point scheme)")
    model = family.build_for_training(cfg, heads)
    return model.to(memory_format=torch.channels_last)


def _schedule(opt, total: int, steps_per_epoch: int):
    warm = min(steps_per_epoch, max(1, total // 10))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))


def _siamese_step(cfg: TrainConfig, model, data: "RunData", idx, pre: Preprocess, rng):
    """Two augmentations of every face; the loss on their heatmaps warped back and averaged."""
    from train.heatmap import canonical_matrix, siamese_loss
    n, head = pre.input_size, data.heads[0]
    scheme = get_scheme(head)
    xs, mats, canon, ws = ([], []), ([], []), [], []
    for i in idx:
        it = data.items[i]
        pts = it.targets[head]
        mc = canonical_matrix(pts, n)
        canon.append(pts @ mc[:, :2].T + mc[:, 2])
        ws.append(it.weights[head])
        for k in range(2):
            crop, moved = augment_sets(it.face.image(), {head: pts}, {head: scheme}, n, rng,
                                       cfg.augment, return_matrix=True)
            m = moved["_matrix"]
            xs[k].append(crop)
            mats[k].append(np.vstack([mc, [0, 0, 1]]) @ np.linalg.inv(np.vstack([m, [0, 0, 1]])))
    x0, x1 = (torch.from_numpy(pre.normalize(np.stack(v))) for v in xs)
    m0, m1 = (torch.from_numpy(np.stack(v)[:, :2].astype(np.float32)) for v in mats)
    cl = torch.from_numpy(np.stack(canon).astype(np.float32))
    w = torch.from_numpy(np.stack(ws))
    p0 = model(x0.to(memory_format=torch.channels_last))
    p1 = model(x1.to(memory_format=torch.channels_last))
    return siamese_loss(p0, p1, m0, m1, cl, w, model.sigma, cfg.hm_encoding == "continuous",
                        scheme.mirror)


def _batch_loss(cfg: TrainConfig, model, heads: list[str], x, targets, pose, attrs):
    """The family's loss of a batch: (loss, mean point distance or 0.0)."""
    return FAMILIES[cfg.family].loss(cfg, model, heads, x, targets, pose, attrs)


def _evaluate(model, data: RunData, pre: Preprocess) -> dict:
    out = {}
    for name, (faces, head) in {**data.val, **data.extra}.items():
        ds_scheme = get_scheme(head if name.startswith("val") else
                               SCHEME_OF[_parse_set(name)[0]])
        key = head if model.head_points else None
        r = evaluate(torch_predictor(model, key), faces, pre, get_scheme(head), ds_scheme,
                     data.protocols.get(name, "landmarks"))
        out[name] = {k: v for k, v in r.items() if not k.startswith("_")}
        out[name]["head"] = head
    return out


def _selection_metric(entry: dict, data: RunData) -> float:
    """Mean held-out NME over the run's held-out sets (the training loss if there are none)."""
    vals = [entry[k]["nme"] for k in data.val]
    return float(np.mean(vals)) if vals else entry["loss"]


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final history entry."""
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, rank])
    out = Path(cfg.out)
    pre = Preprocess()

    data = prepare_data(cfg)
    if rank == 0 and data.notes:
        print(json.dumps({"data": data.notes, "train_items": len(data.items)}), flush=True)
    for it in data.items:        # read every image now: a bad file fails before training
        it.face.image()

    model = build_model(cfg, data.heads)
    steps_per_epoch = steps_per_rank(len(data.items), world, cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, total, steps_per_epoch)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    evaluated = family_of(model).build(model.arch) if ema else model   # holds the average

    start_epoch, step, best, history = 0, 0, float("inf"), []
    last = out / "last.pt"
    if last.is_file():
        start_epoch, step, best, history, rng = _resume(last, cfg, model, ema, opt, sched, rng,
                                                        rank, world)

    t_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    entry = history[-1] if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.items))
        order = order[:len(order) // world * world][rank::world]   # equal steps on every rank
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=not cfg.progress or rank != 0, mininterval=1 if sys.stderr.isatty() else 30)
        sums = np.zeros(2)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if cfg.siamese:
                loss, nme = _siamese_step(cfg, ddp, data, idx, pre, rng), 0.0
            else:
                x, targets, pose, attrs = make_batch(data.items, idx, data.heads, pre, rng,
                                                     cfg.augment)
                loss, nme = _batch_loss(cfg, ddp, data.heads, x, targets, pose, attrs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            sums += (float(loss.detach()), nme)
            bar.set_postfix(loss=f"{sums[0] / (b + 1):.4f}", refresh=False)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        entry = {"epoch": epoch + 1, "step": step, "loss": float(sums[0] / max(1, b + 1)),
                 "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t_start, 1)}
        if rank == 0:
            if ema is not None:
                evaluated.load_state_dict(ema.state)
            evaluated.eval()
            entry.update(_evaluate(evaluated, data, pre))
            metric = _selection_metric(entry, data)
            entry["selection_nme"] = metric
            history.append(entry)
            improved = metric < best
            best = min(best, metric)
            _save(out, cfg, model, evaluated, ema, opt, sched, epoch, step, best, history, rng,
                  data, improved)
        if world > 1:
            dist.barrier()
        if cfg.max_steps and step >= cfg.max_steps:
            break
    return entry


def _resume(last: Path, cfg, model, ema, opt, sched, rng, rank, world):
    loaded = Checkpoint.load(last)
    if loaded.arch != model.arch:
        raise ConfigError(f"{last} holds a different architecture {loaded.arch}; "
                         "use another --out or delete it")
    ck = loaded.raw
    if ema is not None and "train_model" not in ck:
        raise ConfigError(f"{last} was written without --ema; resume it without --ema "
                         "or use another --out")
    if ema is None and "train_model" in ck:
        raise ConfigError(f"{last} was written with --ema {ck['config'].get('ema')}; "
                         "resume it with the same --ema")
    model.load_state_dict(ck["train_model"] if ema else ck["model"])
    if ema:
        ema.state = {k: v.clone() for k, v in ck["model"].items()}
        ema.updates = ck["step"]
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if world == 1:
        rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
    else:   # other ranks' streams are not saved: re-seed them per epoch
        rng = np.random.default_rng([cfg.seed, rank, ck["epoch"]])
    if rank == 0:
        print(f"resumed from {last}: epoch {ck['epoch']}, step {ck['step']}", flush=True)
    return ck["epoch"], ck["step"], ck["best"], ck["history"], rng


def _save(out: Path, cfg, model, evaluated, ema, opt, sched, epoch, step, best, history, rng,
          data: RunData, improved: bool) -> None:
    state = {
        "arch": model.arch, "scheme": data.heads[0], "heads": data.heads,
        "preprocess": Preprocess().to_meta(),
        "model": evaluated.state_dict(),        # the weights that were scored
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "epoch": epoch + 1, "step": step, "best": best, "history": history,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "params": count_params(model),
        "rng": {"torch": torch.get_rng_state(), "numpy": json.dumps(rng.bit_generator.state)},
    }
    if ema is not None:                           # the optimised weights, for resuming
        state["train_model"] = model.state_dict()
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "last.pt", state)
    if improved:
        save_checkpoint(out / "best.pt", state)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(history[-1]) + "\n")
    print(json.dumps(history[-1]), flush=True)
