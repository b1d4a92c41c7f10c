"""Score a checkpoint on the real test faces: 300-W (68 points) and WFLW under both crop
protocols, per WFLW attribute subset. Each set is scored with the model's native head for it
(evaluation.sets.scorings): a 68-point model on WFLW through the 98 -> 68 map, a two-head
model with all 98 points on WFLW plus the "@68" figure."""
from __future__ import annotations

from pathlib import Path

from evaluation.metrics import evaluate, plot_ced
from evaluation.sets import scored_set, scorings
from runtime.bundle import atomic_write_json
from runtime.schemes import get_scheme
from train.checkpoint import Checkpoint
from train.engine import torch_predictor

SETS = ("wflw:test/landmarks", "wflw:test/rect")


def evaluate_checkpoint(checkpoint, wflw=None, w300=None, w300_split="helen_test", out=None,
                        sets=None, decoder: dict | None = None) -> dict:
    """decoder: for a model whose family has decoder settings (heatmap), settings to use
    instead of the checkpoint's (e.g. {"decoder": "argmax_quarter"} or {"window": 3}): the
    decoding ablation (Checkpoint.with_decoder; a PFLD ignores them)."""
    ck = Checkpoint.load(checkpoint).with_decoder(decoder)
    model = ck.build()
    pre = ck.preprocess
    names, schemes = ck.output_names, ck.heads
    keys = sets or (f"300w:{w300_split}/landmarks", *SETS)
    history = ck.raw.get("history")
    res, curves = {"checkpoint": str(checkpoint), "scheme": ck.scheme, "heads": schemes,
                   "width": ck.width, "params": ck.raw.get("params"),
                   "epochs": ck.raw.get("epoch"),
                   "train_time_s": history[-1].get("elapsed_s") if history else None}, {}
    for key in keys:
        s = scored_set(key, {"wflw": wflw, "300w": w300}.get(key.split(":")[0]))
        for sc in scorings(schemes, s.scheme):
            predict = torch_predictor(model, names[sc.output])
            r = evaluate(predict, s.faces(), pre, get_scheme(schemes[sc.output]),
                         get_scheme(s.scheme), s.protocol, as68=sc.as68)
            curves[s.key + sc.suffix] = r.pop("_nme")
            r.pop("_points")
            r["head"] = schemes[sc.output]
            res[s.key + sc.suffix] = r
    if out:
        out = Path(out)
        atomic_write_json(out / "eval.json", res)
        plot_ced(curves, out / "ced.png", title=f"{Path(checkpoint).name}")
    return res
