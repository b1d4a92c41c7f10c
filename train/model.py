"""PFLD in plain torch.nn: MobileNetV2 inverted-residual backbone, multi-scale FC head.

Activations are ReLU6, as in MobileNetV2: with plain ReLU a channel that is dead on the training
faces ends with a BatchNorm running variance near 0 and amplifies an unusual input by ~300x per
layer (seen: one HELEN face whose outputs left the image); ReLU6 bounds every layer.

The auxiliary branch regresses head pose (yaw, pitch, roll) from the 4th block's features and
is used only in training; `forward` returns points alone unless `with_pose=True`, so the
exported graph has one output: (N, 2K) point coordinates in crop-normalised [0, 1] units.

A multi-head PFLD (`heads={"300w68": 68, "wflw98": 98}`) shares the backbone and has one
fully-connected head per point scheme; `forward` then returns one (N, 2K) tensor per head, in
the order of `heads` (an exported graph has one output per head), and `forward_heads` a dict.

This module registers the "pfld" model family (train/family.py): its builder, output
descriptions, training-time builder (`build_for_training`: --init across head layouts, a
narrower neck widened) and loss (`batch_loss`: coordinate regression + head pose).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.errors import ConfigError
from runtime.schemes import get_scheme
from train.family import Family, is_family, register_family
from train.loss import LOSSES


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width / 8)) * 8) if width < 1 else int(c * width)


def conv_bn(cin, cout, k, s, p=None, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if p is None else p, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(conv_bn(cin, hid, 1, 1), conv_bn(hid, hid, 3, stride, groups=hid),
                                   conv_bn(hid, cout, 1, 1, act=False))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class PFLD(nn.Module):
    def __init__(self, num_points: int = 68, width: float = 1.0, input_size: int = 112,
                 heads: dict[str, int] | None = None, neck: int | None = None,
                 tail: int | None = None):
        """neck: channels of the last (7 x 7 -> 1 x 1) stage, the only one whose features reach
        the heads with their spatial layout (the others are averaged); default 128 x width.
        It costs next to no latency (one 7 x 7 conv on a 7 x 7 map).
        tail: channels of the 14 x 14 stage's output, through which every spatial feature
        passes on its way to the neck (the 7 x 7 stage gets twice as many); default 16 x width,
        8 channels at width 0.5."""
        super().__init__()
        if input_size != 112:
            raise ConfigError("PFLD's head assumes a 112 x 112 input")
        if neck is not None and neck < 8:
            raise ConfigError(f"neck {neck}: at least 8 channels")
        if tail is not None and tail < 8:
            raise ConfigError(f"tail {tail}: at least 8 channels")
        self.num_points, self.width, self.neck, self.tail = num_points, width, neck, tail
        self.head_points = dict(heads) if heads else None
        c64, c128, c16, c32 = (_ch(c, width) for c in (64, 128, 16, 32))
        a32 = c32                  # the pose branch (training only) keeps its width either way
        if tail:
            c16, c32 = tail, 2 * tail
        cn = neck or c128
        self.stem = nn.Sequential(conv_bn(3, c64, 3, 2), conv_bn(c64, c64, 3, 1, groups=c64))
        self.block4 = nn.Sequential(InvertedResidual(c64, c64, 2, 2),
                                    *[InvertedResidual(c64, c64, 1, 2) for _ in range(4)])  # 28x28
        self.block5 = nn.Sequential(InvertedResidual(c64, c128, 2, 2),
                                    *[InvertedResidual(c128, c128, 1, 4) for _ in range(6)],
                                    InvertedResidual(c128, c16, 1, 2))                      # 14x14
        self.s2 = conv_bn(c16, c32, 3, 2)                                                   # 7x7
        self.s3 = nn.Sequential(nn.Conv2d(c32, cn, 7, 1, 0), nn.BatchNorm2d(cn),
                                nn.ReLU6(inplace=True))                                      # 1x1
        if self.head_points:
            self.heads = nn.ModuleDict({k: nn.Linear(c16 + c32 + cn, n * 2)
                                        for k, n in self.head_points.items()})
            for fc in self.heads.values():
                nn.init.constant_(fc.bias, 0.5)
        else:
            self.fc = nn.Linear(c16 + c32 + cn, num_points * 2)
            nn.init.constant_(self.fc.bias, 0.5)   # start from the crop centre, not the corner
        # auxiliary pose branch (training only)
        self.aux = nn.Sequential(conv_bn(c64, c128, 3, 2), conv_bn(c128, c128, 3, 1),
                                 conv_bn(c128, a32, 3, 2), conv_bn(a32, c128, 7, 1, p=1),
                                 nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                 nn.Linear(c128, 32), nn.Linear(32, 3))

    def _features(self, x: torch.Tensor):
        x = self.stem(x)
        f4 = self.block4(x)
        s1 = self.block5(f4)
        s2 = self.s2(s1)
        s3 = self.s3(s2)
        return torch.cat([s1.mean((2, 3)), s2.mean((2, 3)), s3.flatten(1)], 1), f4

    def forward_heads(self, x: torch.Tensor, with_pose: bool = False):
        """{head name: (N, 2K)} for every head (a single-head model: {"points": ...})."""
        feats, f4 = self._features(x)
        out = ({k: fc(feats) for k, fc in self.heads.items()} if self.head_points
               else {"points": self.fc(feats)})
        return (out, self.aux(f4)) if with_pose else out

    def forward(self, x: torch.Tensor, with_pose: bool = False):
        out, pose = self.forward_heads(x, with_pose=True)
        pts = tuple(out.values()) if self.head_points else out["points"]
        return (pts, pose) if with_pose else pts

    @property
    def arch(self) -> dict:
        """The 'arch' dict a checkpoint stores; build(arch) makes the same network."""
        a = {"width": self.width, "input_size": 112, **({"neck": self.neck} if self.neck else {}),
             **({"tail": self.tail} if self.tail else {})}
        if self.head_points:
            return {"heads": dict(self.head_points), **a}
        return {"num_points": self.num_points, **a}


def build(arch: dict) -> PFLD:
    """PFLD from the 'arch' dict its checkpoints store (any family's network:
    train.family.family_of(arch).build(arch), or train.checkpoint.Checkpoint.build)."""
    if not is_family(arch, FAMILY):
        raise ConfigError(f"arch {arch} is not a PFLD; build it with its own family "
                          "(train.family.family_of(arch).build)")
    heads = arch.get("heads")
    return PFLD(int(arch.get("num_points", 0) or 68), float(arch["width"]),
                int(arch.get("input_size", 112)), {k: int(v) for k, v in heads.items()} if heads else None,
                int(arch["neck"]) if arch.get("neck") else None,
                int(arch["tail"]) if arch.get("tail") else None)


def named_heads(arch: dict) -> list[str]:
    """The point scheme of each head of a multi-head PFLD; [] for a single-head one."""
    return list(arch.get("heads") or {})


def output_names(arch: dict) -> list[str]:
    """The output names of a PFLD: one per head, or ["points"]."""
    return named_heads(arch) or ["points"]


def describe_outputs(arch: dict, scheme: str, model=None) -> list:
    """One OutputSpec per output: "points_<scheme>" per head (index = output position), or
    one "points" output of the checkpoint's scheme."""
    from runtime.bundle import OutputSpec
    heads = named_heads(arch)
    if heads:
        return [OutputSpec(f"points_{h}", "points", h, index=i) for i, h in enumerate(heads)]
    return [OutputSpec(output_names(arch)[0], "points", scheme)]


def load_partial(model: PFLD, state: dict) -> list[str]:
    """Load the tensors of `state` that fit `model` (fine-tuning across head layouts): the
    backbone and pose branch always, a single-head model's fc into a head of the same size.
    Returns the names of the model's tensors left at their initial values."""
    own = model.state_dict()
    src = dict(state)
    if model.head_points and "fc.weight" in src:
        for k, n in model.head_points.items():
            if src["fc.weight"].shape[0] == 2 * n:
                src[f"heads.{k}.weight"], src[f"heads.{k}.bias"] = src["fc.weight"], src["fc.bias"]
                break
    fit = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fit, strict=False)
    return [k for k in own if k not in fit]


def _segments(c16: int, c32: int, cn: int) -> list[tuple[int, int]]:
    """(start, length) of the s1 / s2 / s3 features in the heads' input."""
    return [(0, c16), (c16, c32), (c16 + c32, cn)]


def widen_neck(model: PFLD, state: dict) -> list[str]:
    """Load a PFLD with a narrower neck and/or tail into `model`, preserving its function
    (Net2Net-style): the old channels are copied, the new ones start at their initialisation,
    and every weight that reads a new channel (the next convolution's, the heads') starts at
    zero, so the network computes exactly what the old one did and training grows the new
    channels from there. Returns the widened tensors' names."""
    own, state = model.state_dict(), dict(state)
    last = f"block5.{len(model.block5) - 1}.block.2."
    old_c16 = state[f"{last}0.weight"].shape[0] if f"{last}0.weight" in state else None
    old_c32 = state["s2.0.weight"].shape[0] if "s2.0.weight" in state else None
    old_cn = state["s3.0.weight"].shape[0] if "s3.0.weight" in state else None
    grown = []
    for k, v in list(state.items()):
        head = k.startswith(("heads.", "fc."))
        if k not in own or own[k].shape == v.shape or own[k].dim() != v.dim() \
                or not (head or k.startswith(("s2.", "s3.", last))) \
                or not all(a >= b for a, b in zip(own[k].shape, v.shape)):
            continue
        t = own[k].clone()
        if head and k.endswith(".weight"):
            t.zero_()
            new_c16, new_c32 = model.s2[0].in_channels, model.s2[0].out_channels
            for (o0, n), (n0, _) in zip(_segments(old_c16, old_c32, old_cn),
                                        _segments(new_c16, new_c32, model.s3[0].out_channels)):
                t[: v.shape[0], n0:n0 + n] = v[:, o0:o0 + n]
        else:
            if t.dim() == 4 and t.shape[1] > v.shape[1]:
                t[:, v.shape[1]:] = 0          # reads a new channel: starts at zero
            t[tuple(slice(0, n) for n in v.shape)] = v
        state[k] = t
        grown.append(k)
    missing = [k for k in load_partial(model, state) if not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"an --init with a neck wider than {model.s3[0].out_channels} channels "
                         f"or a tail wider than {model.s2[0].in_channels} cannot be widened into "
                         f"it (no source for {', '.join(missing)})")
    return grown


def count_params(model: nn.Module, inference_only: bool = True) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if not (inference_only and n.startswith("aux.")))


def build_for_training(cfg, heads: list[str]) -> PFLD:
    """The PFLD of a training run (cfg: train.engine.TrainConfig): one head of the dataset's
    scheme, or one per --heads scheme; from --init weights when given (the same arch loaded,
    a narrower neck or tail widened keeping its function, other head layouts partially)."""
    from train.checkpoint import Checkpoint
    neck, tail = cfg.neck or None, cfg.tail or None
    if len(heads) == 1 and not cfg.heads:
        model = PFLD(get_scheme(heads[0]).num_points, cfg.width, neck=neck, tail=tail)
    else:
        model = PFLD(0, cfg.width, heads={h: get_scheme(h).num_points for h in heads}, neck=neck,
                     tail=tail)
    if cfg.init:
        init = Checkpoint.load(cfg.init)
        if init.arch == model.arch:
            model.load_state_dict(init.weights)
        elif {k: v for k, v in init.arch.items() if k not in ("neck", "tail")} == \
                {k: v for k, v in model.arch.items() if k not in ("neck", "tail")}:
            grown = widen_neck(model, init.weights)
            print(f"--init {cfg.init}: neck {model.s3[0].out_channels}, tail "
                  f"{model.s2[0].in_channels} channels, function kept ({', '.join(grown)})",
                  flush=True)
        else:
            if float(init.width) != cfg.width:
                raise ConfigError(f"--init {cfg.init} holds a width-{init.width} PFLD, "
                                 f"not width {cfg.width}")
            fresh = load_partial(model, init.weights)
            print(f"--init {cfg.init}: {init.arch} -> {model.arch}; left at their initial "
                  f"values: {', '.join(fresh) or 'none'}", flush=True)
    return model


def batch_loss(cfg, model, heads: list[str], x, targets, pose, attrs):
    """Sum over heads of weight x loss on the faces labelled for that head, + the pose loss.
    Returns (loss, summed mean point distance of the heads)."""
    preds, pose_pred = model(x.to(memory_format=torch.channels_last), with_pose=True)
    if not isinstance(preds, tuple):
        preds = (preds,)
    loss_fn = LOSSES[cfg.loss]
    hw = cfg.head_weights or (1.0,) * len(heads)
    loss = torch.zeros(())
    nme = 0.0
    for h, w, pred in zip(heads, hw, preds):
        y, mask, pw = targets[h]
        if not mask.any():
            continue
        if cfg.loss == "pfld":
            loss = loss + w * loss_fn(pred[mask], y[mask], pose_pred=pose_pred[mask],
                                      pose_target=pose[mask], attributes=attrs[mask])
        else:
            loss = loss + w * loss_fn(pred[mask], y[mask], weights=pw[mask])
        with torch.no_grad():
            nme += float((pred.detach()[mask] - y[mask]).reshape(int(mask.sum()), -1, 2)
                         .norm(dim=-1).mean())
    if cfg.loss != "pfld":
        loss = loss + cfg.pose_weight * (pose_pred - pose).abs().mean()
    return loss, nme


FAMILY = register_family(Family(
    name="pfld", summary="coordinate regression", build=build, output_names=output_names,
    named_heads=named_heads, describe_outputs=describe_outputs,
    build_for_training=build_for_training, loss=batch_loss, multi_head=True))
