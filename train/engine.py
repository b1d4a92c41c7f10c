"""The training loop: seeded, resumable from atomic checkpoints, evaluated every epoch,
and data-parallel through torch DDP when started by `torchrun` (gloo on CPU).

Used by train/run.py; tests call `train(TrainConfig(...))` directly.
"""
from __future__ import annotations

import io
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime.bundle import atomic_write_bytes
from runtime.pose import head_pose
from runtime.preprocess import Preprocess
from runtime.schemes import Scheme, get_scheme
from train import data as D
from train.augment import AugmentConfig, augment
from train.loss import LOSSES
from train.metrics import evaluate
from train.model import PFLD, build, count_params

SCHEME_OF = {"wflw": "wflw98", "300w": "300w68"}


@dataclass
class TrainConfig:
    dataset: str = "300w"                # wflw | 300w
    data_root: str | None = None         # default: LANDMARK_<DATASET> or ../shared/<dataset>
    train_split: str = "train"
    val_fraction: float = 0.05           # held out of the training faces, for model selection
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_holdout(faces: list[D.Face], fraction: float) -> tuple[list[D.Face], list[D.Face]]:
    """Deterministic split by a hash of each face's annotation source (stable across runs)."""
    if fraction <= 0:
        return faces, []
    key = [zlib.crc32(f.source.encode()) % 10000 / 10000 for f in faces]
    return ([f for f, k in zip(faces, key) if k >= fraction],
            [f for f, k in zip(faces, key) if k < fraction])


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
        raise ValueError(f"evaluation set {spec!r}: expected DATASET:SPLIT, e.g. 300w:helen_test")
    return ds, split


def make_batch(faces, idx, scheme: Scheme, pre: Preprocess, rng, aug: AugmentConfig):
    n = pre.input_size
    crops, pts, poses, attrs = [], [], [], []
    for i in idx:
        f = faces[i]
        c, p = augment(f.image(), f.points, scheme, n, rng, aug)
        crops.append(c)
        pts.append(p / n)
        poses.append(np.radians(head_pose(p, scheme, (n, n))))
        attrs.append(f.attributes)
    x = torch.from_numpy(pre.normalize(np.stack(crops)))
    y = torch.from_numpy(np.stack(pts).reshape(len(idx), -1).astype(np.float32))
    pose = torch.from_numpy(np.nan_to_num(np.stack(poses)).astype(np.float32))
    return x, y, pose, torch.from_numpy(np.stack(attrs).astype(np.float32))


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    for key in ("arch", "model", "scheme", "preprocess"):
        if not isinstance(ck, dict) or key not in ck:
            raise ValueError(f"{path} is not a landmark checkpoint of this project (no {key!r})")
    return ck


def model_from_checkpoint(ck: dict) -> PFLD:
    m = build(ck["arch"])
    try:
        m.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit the PFLD architecture {ck['arch']}: "
                         f"{str(e).splitlines()[0]}") from None
    return m.eval()


class WeightAverage:
    """Exponential moving average of every float tensor in a model's state (weights and
    BatchNorm statistics), warmed up as decay_t = min(decay, (1 + t) / (10 + t)) so the first
    steps do not drag the average towards the starting weights for long."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
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


def torch_predictor(model):
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return predict


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final history entry."""
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, rank])
    out = Path(cfg.out)
    scheme = get_scheme(SCHEME_OF[cfg.dataset])
    pre = Preprocess()

    train_faces, val_faces = training_faces(cfg.dataset, cfg.train_split, cfg.data_root,
                                            cfg.limit_faces, cfg.val_fraction)
    if not train_faces:
        raise D.DataError(f"{cfg.dataset}:{cfg.train_split} has no training faces "
                          f"(all {len(val_faces)} went to the hold-out)")
    extra = {s: D.load(*_parse_set(s)) for s in cfg.eval_sets}
    for f in train_faces:        # read every image now: a bad file fails before training
        f.image()

    model = PFLD(scheme.num_points, cfg.width).to(memory_format=torch.channels_last)
    if cfg.init:
        init = load_checkpoint(cfg.init)
        if init["arch"] != {"num_points": scheme.num_points, "width": cfg.width, "input_size": 112}:
            raise ValueError(f"--init {cfg.init} holds {init['arch']}, not a width-{cfg.width} "
                             f"{scheme.num_points}-point PFLD")
        model.load_state_dict(init["model"])
    steps_per_epoch = steps_per_rank(len(train_faces), world, cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(steps_per_epoch, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    evaluated = PFLD(scheme.num_points, cfg.width) if ema else model   # holds the average
    loss_fn = LOSSES[cfg.loss]

    start_epoch, step, best, history = 0, 0, float("inf"), []
    last = out / "last.pt"
    if last.is_file():
        ck = load_checkpoint(last)
        if ck["arch"] != {"num_points": scheme.num_points, "width": cfg.width, "input_size": 112}:
            raise ValueError(f"{last} holds a different architecture {ck['arch']}; "
                             "use another --out or delete it")
        if ema is not None and "train_model" not in ck:
            raise ValueError(f"{last} was written without --ema; resume it without --ema "
                             "or use another --out")
        if ema is None and "train_model" in ck:
            raise ValueError(f"{last} was written with --ema {ck['config'].get('ema')}; "
                             "resume it with the same --ema")
        model.load_state_dict(ck["train_model"] if ema else ck["model"])
        if ema:
            ema.state = {k: v.clone() for k, v in ck["model"].items()}
            ema.updates = ck["step"]
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, best, history = ck["epoch"], ck["step"], ck["best"], ck["history"]
        torch.set_rng_state(ck["rng"]["torch"])
        if world == 1:
            rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
        else:   # other ranks' streams are not saved: re-seed them per epoch
            rng = np.random.default_rng([cfg.seed, rank, start_epoch])
        if rank == 0:
            print(f"resumed from {last}: epoch {start_epoch}, step {step}", flush=True)

    t_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    log = out / "log.jsonl"
    entry = history[-1] if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_faces))
        order = order[:len(order) // world * world][rank::world]   # equal steps on every rank
        n_steps = steps_per_rank(len(train_faces), world, cfg.batch_size)
        bar = tqdm(range(n_steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=not cfg.progress or rank != 0, mininterval=1 if sys.stderr.isatty() else 30)
        sums = np.zeros(2)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y, pose, attrs = make_batch(train_faces, idx, scheme, pre, rng, cfg.augment)
            pred, pose_pred = ddp(x.to(memory_format=torch.channels_last), with_pose=True)
            if cfg.loss == "pfld":
                loss = loss_fn(pred, y, pose_pred=pose_pred, pose_target=pose, attributes=attrs)
            else:
                loss = loss_fn(pred, y) + cfg.pose_weight * (pose_pred - pose).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            with torch.no_grad():
                nme_batch = (pred.detach() - y).reshape(len(idx), -1, 2).norm(dim=-1).mean()
            sums += (float(loss.detach()), float(nme_batch))
            bar.set_postfix(loss=f"{sums[0] / (b + 1):.4f}", refresh=False)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        entry = {"epoch": epoch + 1, "step": step, "loss": float(sums[0] / max(1, b + 1)),
                 "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t_start, 1)}
        if rank == 0:
            if ema is not None:
                evaluated.load_state_dict(ema.state)
            evaluated.eval()
            pred_fn = torch_predictor(evaluated)
            evals = {"val": (val_faces, scheme)} if val_faces else {}
            evals.update({s: (fs, get_scheme(SCHEME_OF[_parse_set(s)[0]])) for s, fs in extra.items()})
            for name, (fs, ds_scheme) in evals.items():
                r = evaluate(pred_fn, fs, pre, scheme, ds_scheme, "landmarks")
                entry[name] = {k: v for k, v in r.items() if not k.startswith("_")}
            metric = entry["val"]["nme"] if "val" in entry else entry["loss"]
            history.append(entry)
            improved = metric < best
            best = min(best, metric)
            state = {
                "arch": {"num_points": scheme.num_points, "width": cfg.width, "input_size": 112},
                "scheme": scheme.name, "preprocess": pre.to_meta(),
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
            save_checkpoint(last, state)
            if improved:
                save_checkpoint(out / "best.pt", state)
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(json.dumps(entry), flush=True)
        if world > 1:
            dist.barrier()
        if cfg.max_steps and step >= cfg.max_steps:
            break
    return entry
