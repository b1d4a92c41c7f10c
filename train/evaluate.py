"""Score a checkpoint on the real test faces: 300-W (68 points) and WFLW under both crop
protocols (through the 98 -> 68 map for a 68-point model), per WFLW attribute subset."""
from __future__ import annotations

from pathlib import Path

from runtime.bundle import atomic_write_json
from runtime.preprocess import Preprocess
from runtime.schemes import get_scheme
from train import data as D
from train.engine import load_checkpoint, model_from_checkpoint, torch_predictor
from train.metrics import evaluate, plot_ced


def evaluate_checkpoint(checkpoint, wflw=None, w300=None, w300_split="helen_test", out=None) -> dict:
    ck = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ck)
    pre = Preprocess.from_meta(ck)
    scheme = get_scheme(ck["scheme"])
    predict = torch_predictor(model)
    sets = [("300w:" + w300_split, D.load_300w(w300, w300_split), get_scheme("300w68"), "landmarks")]
    wflw_faces = D.load_wflw(wflw, "test")
    sets += [("wflw:test", wflw_faces, get_scheme("wflw98"), p) for p in ("landmarks", "rect")]
    res, curves = {"checkpoint": str(checkpoint), "scheme": scheme.name,
                   "width": ck["arch"]["width"], "params": ck.get("params"),
                   "epochs": ck.get("epoch"), "train_time_s": ck["history"][-1].get("elapsed_s")
                   if ck.get("history") else None}, {}
    for name, faces, ds_scheme, protocol in sets:
        r = evaluate(predict, faces, pre, scheme, ds_scheme, protocol)
        key = f"{name}/{protocol}"
        curves[key] = r.pop("_nme")
        r.pop("_points")
        res[key] = r
    if out:
        out = Path(out)
        atomic_write_json(out / "eval.json", res)
        plot_ced(curves, out / "ced.png", title=f"{Path(checkpoint).name}")
    return res
