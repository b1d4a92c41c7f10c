"""Quantization-aware fine-tuning: the escalation's last step (quantize.search), for a bundle
exported from a checkpoint trained here (an imported model has no weights to train).

A short fine-tune of the checkpoint's network with fake quantization where the INT8 backends
quantize: every Conv2d / Linear weight, symmetric int8 per output channel (or per tensor, as the
PTQ options say), with the BatchNorm that follows it folded in first, as the export folds it
(per channel the fold changes nothing; per tensor it decides the range); and every Conv2d /
Linear input per tensor, uint8, its range the min/max over the fine-tune crops (as the backends
calibrate). Gradients pass through the rounding (straight-through, clipped outside the range:
torch.fake_quantize_*). BatchNorm statistics stay frozen. The target is the float network's own
outputs (self-distillation: no labels) on training faces (Settings.qat_set, default wflw:fit:
never a face that scores the bundle, qat_faces checks), with flips and brightness/contrast
jitter. The fine-tuned float weights go into a new checkpoint, which the staged export
(export.stages) turns into the backend's FP32 parent, parity-checked as always; that parent is
then quantized with the same post-training options, and its drift is measured against the
original FP32 bundle.

    qat_checkpoint("models/heatmap_w05.pt", calib_x, "work/qat.pt", QatOptions(steps=200))
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantize.backends import QuantizeError


@dataclass(frozen=True)
class QatOptions:
    steps: int = 300
    batch: int = 32
    lr: float = 1e-4             # a tenth of the training rate: the weights only adapt
    per_channel: bool = True    # weights per output channel (as the PTQ options say)
    seed: int = 0
    threads: int = 1


def _fake_quant_weight(torch, w, per_channel: bool = True):
    if not per_channel:
        scale = max(float(w.detach().abs().max()) / 127.0, 1e-8)
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)
    dims = tuple(range(1, w.dim()))
    scale = (w.detach().abs().amax(dim=dims) / 127.0).clamp_min(1e-8)
    zp = torch.zeros(len(scale), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zp, 0, -127, 127)


class _Fake:
    """Fake quantization on one module: its weight (a parametrization; per channel or per
    tensor, a following BatchNorm folded in) and its input (per tensor)."""

    def __init__(self, torch, module, per_channel: bool = True, bn=None):
        import torch.nn.utils.parametrize as P
        self.torch, self.module = torch, module
        self.lo = self.hi = None
        self.enabled, self.calibrating = True, False

        class W(torch.nn.Module):
            def forward(_, w):
                if not self.enabled:
                    return w
                if bn is None:
                    return _fake_quant_weight(torch, w, per_channel)
                # the weight the backend quantizes is the one with the (frozen) BatchNorm
                # folded in: quantize that, then divide the BatchNorm's scale back out
                f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
                f = torch.where(f.abs() < 1e-12, torch.full_like(f, 1e-12), f)
                shape = (-1,) + (1,) * (w.dim() - 1)
                return _fake_quant_weight(torch, w * f.view(shape), per_channel) / f.view(shape)

        P.register_parametrization(module, "weight", W())
        self.handle = module.register_forward_pre_hook(self._input)

    def _input(self, module, args):
        x = args[0]
        if self.calibrating:          # min/max over the fine-tune crops, as the backends do
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
            return None
        if not self.enabled:
            return None
        t = self.torch
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = int(np.clip(round(-lo / scale), 0, 255))
        return (t.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255),) + tuple(args[1:])

    def remove(self):
        import torch.nn.utils.parametrize as P
        self.handle.remove()
        P.remove_parametrizations(self.module, "weight", leave_parametrized=False)


def _conv_bn_pairs(torch, model) -> dict:
    """id(conv) -> the BatchNorm2d that directly follows it in a Sequential (what the export
    folds into the convolution's weight)."""
    pairs = {}
    for m in model.modules():
        kids = list(m.children()) if isinstance(m, torch.nn.Sequential) else []
        for a, b in zip(kids, kids[1:]):
            if type(a) is torch.nn.Conv2d and isinstance(b, torch.nn.BatchNorm2d) \
                    and b.num_features == a.out_channels and b.affine and b.track_running_stats:
                pairs[id(a)] = b
    return pairs


def _flatten(out) -> list:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return [out]


def _augment(torch, x, gen):
    """Horizontal flips and brightness/contrast jitter of normalized NCHW crops."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    gain = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    shift = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return x * gain + shift


def qat_checkpoint(checkpoint: str | Path, calib_x: np.ndarray, out: str | Path,
                   opts: QatOptions = QatOptions(), log=print) -> dict:
    """Fine-tune `checkpoint`'s network with fake quantization on the calibration crops
    `calib_x` (N, 3, H, W float32, the network's input; NHWC is transposed), write the
    fine-tuned float weights as a checkpoint at `out` (atomically) and return the record."""
    import torch

    from train.checkpoint import Checkpoint, save_checkpoint
    x_all = np.asarray(calib_x, np.float32)
    if x_all.ndim != 4:
        raise QuantizeError(f"QAT needs a batch of crops (N, C, H, W), got shape {x_all.shape}")
    if x_all.shape[1] not in (1, 3) and x_all.shape[3] in (1, 3):
        x_all = x_all.transpose(0, 3, 1, 2)
    try:
        ck = Checkpoint.load(checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise QuantizeError(f"QAT: {e}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(opts.seed)
        gen = torch.Generator().manual_seed(opts.seed)
        teacher = ck.build().eval()
        student = copy.deepcopy(teacher)
        bns = _conv_bn_pairs(torch, student)
        fakes = [_Fake(torch, m, opts.per_channel, bns.get(id(m)))
                 for m in student.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
        if not fakes:
            raise QuantizeError(f"QAT: {checkpoint} has no Conv2d or Linear layer to quantize")
        x_all = torch.from_numpy(np.ascontiguousarray(x_all))
        for f in fakes:
            f.calibrating = True
        with torch.no_grad():
            for i in range(0, len(x_all), 64):
                student(x_all[i:i + 64])
        for f in fakes:
            f.calibrating = False
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=opts.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts.steps)
        losses = []
        for step in range(opts.steps):
            student.train()
            for m in student.modules():              # frozen BatchNorm statistics
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            idx = torch.randint(0, len(x_all), (min(opts.batch, len(x_all)),), generator=gen)
            x = _augment(torch, x_all[idx], gen)
            with torch.no_grad():
                target = _flatten(teacher(x))
            got = _flatten(student(x))
            loss = sum(torch.nn.functional.smooth_l1_loss(g, t, beta=0.01) /
                       (t.detach().abs().mean() + 1e-6) for g, t in zip(got, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % max(1, opts.steps // 5) == 0 or step == opts.steps - 1:
                log(f"      QAT step {step + 1}/{opts.steps}: distillation loss {losses[-1]:.4f}")
        for f in fakes:
            f.remove()
        state = student.eval().state_dict()
    finally:
        torch.set_num_threads(threads)
    raw = dict(ck.raw)
    raw["model"] = {k: v.detach().clone() for k, v in state.items()}
    record = {"options": asdict(opts), "seconds": round(time.perf_counter() - t0, 2),
              "faces": int(len(x_all)), "layers_fake_quantized": len(fakes),
              "batchnorms_folded": len(bns),
              "loss_first": round(float(np.mean(losses[:10])), 5),
              "loss_last": round(float(np.mean(losses[-10:])), 5),
              "source_checkpoint": str(checkpoint),
              "target": "the float network's own outputs (self-distillation)"}
    raw["qat"] = record
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, raw)
    return record


# -- the escalation's QAT step for a quantize.core.Job ----------------------------------------
def qat_faces(job) -> list:
    """The faces QAT fine-tunes on (job: a quantize.core.Job): Settings.qat_set, which must
    share no face with a gated or reported set (checked by image path and point extent)."""
    from evaluation.data import DataError
    from evaluation.sets import SetError, set_info
    from quantize.data import MIN_CALIB_FACES
    s = job.settings
    name = s.qat_set
    root = s.wflw_root if name.startswith("wflw:") else s.w300_root
    try:
        faces = set_info(name).load(root)
    except (SetError, DataError, OSError) as e:
        raise QuantizeError(f"--qat-set {name}: {e}") from None
    if len(faces) < MIN_CALIB_FACES:
        raise QuantizeError(f"--qat-set {name} has {len(faces)} faces; QAT needs at least "
                            f"{MIN_CALIB_FACES}")
    def ident(f):
        return str(f.image_path), tuple(np.round(np.asarray(f.points).min(0), 1))
    ids = {ident(f) for f in faces}
    for g in job.figures:
        shared = sum(ident(f) in ids for f in g.faces)
        if shared:
            raise QuantizeError(f"--qat-set {name} shares {shared} face(s) with {g.key}, which "
                                "scores the bundle; fine-tune on training faces it does not hold")
    return faces


def qat_source(job) -> tuple:
    """(a function work, log -> (the QAT parent's BundleMeta, record), or None; why not): the
    QAT step needs the checkpoint the FP32 parent was exported from, unchanged."""
    from runtime.bundle import sha256
    src = job.meta.lineage.source_checkpoint
    if not src or not src.get("path"):
        return None, ("an imported model (no checkpoint to fine-tune); its INT8 comes from "
                      "post-training quantization only")
    path = Path(src["path"])
    if not path.is_file():
        return None, f"its checkpoint {path} (meta.json lineage) is not here"
    if src.get("sha256") and sha256(path) != src["sha256"]:
        return None, (f"its checkpoint {path} has changed since {job.parent_dir} was exported "
                      "(sha256 differs); re-export first")

    def run_qat(work: Path, log):
        from evaluation.metrics import face_batch
        from export.stages import export_all
        from runtime.bundle import BundleMeta
        opts = QatOptions(steps=job.settings.qat_steps, threads=job.settings.threads,
                          per_channel=job.settings.per_channel)
        exp = job.meta.export or {}
        faces = qat_faces(job)
        log(f"      QAT on {len(faces)} {job.settings.qat_set} faces (landmark crops)")
        x = []
        for i in range(0, len(faces), 100):        # images are read once and let go
            x.append(face_batch(faces[i:i + 100], job.meta.preprocess, "landmarks"))
            for f in faces[i:i + 100]:
                f._image = None
        x = np.concatenate(x)
        record = qat_checkpoint(path, x, work / "qat.pt", opts, log)
        record["set"] = job.settings.qat_set
        stage = job.parent_dir.name
        export_all(work / "qat.pt", work / "export", targets=[stage],
                   opset=int(exp.get("opset", 18)),
                   dynamic_batch=exp.get("batch", "dynamic") == "dynamic",
                   progress=lambda m: log(f"      QAT export: {m}"))
        meta = BundleMeta.load(work / "export" / stage)
        record["qat_parent_sha256"] = meta.sha256
        return meta, record
    return run_qat, ""
