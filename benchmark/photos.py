"""The runtime on whole photos (../shared/photos): detection recall per face size and time per
photo, for every detector bundle at every detection size, and for the whole pipeline.

    python benchmark/photos.py choose     # the choosing part: sizes x detector bundles; the
                                          # default size by the rule below -> choose.json
    python benchmark/photos.py report     # the reporting part: detector bundles at their
                                          # default size, and the default pipeline end to end

Rule for the default size (`choose`): the smallest size whose recall of faces of 64 px and up,
with the FP32 ONNX bundle, is within 1 point of the best size's. The reporting part is never
used to choose. A face is found when a detection's box has IoU >= 0.4 with its annotated box
(evaluation.photos.match). Times: median over photos of the median of `--rounds` calls, one
thread, after a warm-up pass; every bundle is timed in the same process, interleaved photo by
photo, so the ratios between them hold on this machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from common import host_info, host_string, now  # noqa: E402
from evaluation.photos import (SIZES, load_photos, pct, read_images, recall_by_size,  # noqa: E402
                               rows_to_xyxy)
from runtime.bundle import atomic_write_json  # noqa: E402
from runtime.errors import LandmarkError  # noqa: E402

DETECTORS = ("onnx_sim_fp32", "onnx_int8", "openvino_fp32", "openvino_int8")
CHOICE_SIZES = (160, 224, 256, 320, 384, 448, 512, 640, 0)
RULE_BUNDLE, RULE_POINTS, RULE_KEY = "onnx_sim_fp32", 1.0, ">=64"


def time_photos(fns: dict, images: list[np.ndarray], rounds: int) -> tuple[dict, dict]:
    """{name: per-image median ms} and {name: first-round outputs}; each image is run by every
    fn in turn (order alternating by round), so drifts of the machine hit all alike."""
    names = list(fns)
    for f in fns.values():                    # warm-up: engines allocate per input shape
        for im in images[:3]:
            f(im)
    ms = {n: np.zeros((rounds, len(images))) for n in names}
    outs = {n: [None] * len(images) for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for i, im in enumerate(images):
            for n in order:
                t = time.perf_counter()
                res = fns[n](im)
                ms[n][r, i] = (time.perf_counter() - t) * 1e3
                if r == 0:
                    outs[n][i] = res
    return {n: np.median(v, 0) for n, v in ms.items()}, outs


def _stats(ms: np.ndarray) -> dict:
    return {"median_ms": round(float(np.median(ms)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3)}


def _detectors(bundle_dir: Path, names, sizes) -> dict:
    from runtime.yunet import YuNetBundleDetector
    fns = {}
    for b in names:
        if not (bundle_dir / b).is_dir():
            raise click.ClickException(f"{bundle_dir / b} does not exist: run `make detector` "
                                       "(export/detector.py, quantize/detector.py) first")
        for s in sizes:
            fns[(b, s)] = YuNetBundleDetector(bundle_dir / b, size=s)
    return fns


@click.group()
def cli():
    """Detection recall and time on whole photos."""
    cv2.setNumThreads(1)


@cli.command()
@click.option("--bundles", default="artifacts/yunet", type=click.Path(file_okay=False))
@click.option("--detector", "names", multiple=True, default=DETECTORS)
@click.option("--size", "sizes", multiple=True, type=int, default=CHOICE_SIZES)
@click.option("--rounds", default=3)
@click.option("--out", default="artifacts/photos/choose.json")
def choose(bundles, names, sizes, rounds, out):
    """Every detector bundle at every size on the choosing part; the default size."""
    photos = load_photos(part="choose")
    images = read_images(photos)
    fns = _detectors(Path(bundles), names, sizes)
    ms, outs = time_photos({f"{b}@{s}": d.raw for (b, s), d in fns.items()}, images, rounds)
    rows = []
    for (b, s) in fns:
        k = f"{b}@{s}"
        rec = recall_by_size(photos, [rows_to_xyxy(o) for o in outs[k]])
        rows.append({"bundle": b, "size": s, "recall": rec, **_stats(ms[k])})
    rule = [r for r in rows if r["bundle"] == RULE_BUNDLE]
    best = max(pct(r["recall"][RULE_KEY]) for r in rule)
    ok = [r for r in rule if pct(r["recall"][RULE_KEY]) >= best - RULE_POINTS]
    chosen = min(ok, key=lambda r: r["size"] or 10 ** 6)["size"]
    _print(rows, f"choosing part: {len(photos)} photos")
    click.echo(f"\nrule: smallest size with {RULE_BUNDLE} recall {RULE_KEY} within {RULE_POINTS} "
               f"point of the best ({best:.1f} %): size {chosen}")
    atomic_write_json(Path(out), {"created": now(), "host": host_string(host_info()),
                                  "command": " ".join(sys.argv), "part": "choose",
                                  "photos": len(photos), "rounds": rounds, "rows": rows,
                                  "rule": {"bundle": RULE_BUNDLE, "key": RULE_KEY,
                                           "points": RULE_POINTS, "best": round(best, 2),
                                           "chosen_size": chosen}})
    click.echo(f"wrote {out}", err=True)


@cli.command()
@click.option("--bundles", default="artifacts/yunet", type=click.Path(file_okay=False))
@click.option("--detector", "names", multiple=True, default=DETECTORS)
@click.option("--model", default=None, help="landmark bundle for the pipeline rows "
              "[default: common.defaults BUNDLES/onnx_int8]")
@click.option("--rounds", default=3)
@click.option("--part", default="report", type=click.Choice(["report", "choose"]))
@click.option("--out", default="artifacts/photos/report.json")
def report(bundles, names, model, rounds, part, out):
    """Detector bundles at their default size, and the default pipeline, on the reporting part."""
    from common import defaults
    from runtime.pipeline import Pipeline
    photos = load_photos(part=part)
    images = read_images(photos)
    dets = {f"{b} (detector)": d for (b, _), d in _detectors(Path(bundles), names, [None]).items()}
    fns = {k: d.raw for k, d in dets.items()}
    model = model or f"{defaults.BUNDLES}/onnx_int8"
    pipe = Pipeline(model, track=False, pose=False, max_faces=50)

    stages: list[dict] = []

    def whole(im):
        faces = pipe.process(im)
        stages.append(dict(pipe.last_ms, faces=len(faces)))
        return np.array([f["detector_box"] for f in faces]).reshape(-1, 4)

    fns["pipeline (detect + landmarks of every face)"] = whole
    ms, outs = time_photos(fns, images, rounds)
    rows = []
    for k in fns:
        boxes = outs[k] if k.startswith("pipeline") else [rows_to_xyxy(o) for o in outs[k]]
        rows.append({"bundle": k, "size": dets[k].size if k in dets else pipe.detector.size,
                     "recall": recall_by_size(photos, boxes), **_stats(ms[k])})
    _print(rows, f"{part} part: {len(photos)} photos; pipeline: {model}, detector "
                 f"{pipe.detector.runs_on} at size {pipe.detector.size}")
    split = {k: round(float(np.median([st[k] for st in stages])), 3)
             for k in ("detect", "crop", "landmarks", "faces")}
    click.echo(f"pipeline, median per photo over every call: detect {split['detect']:.2f} ms, "
               f"crop {split['crop']:.2f} ms, landmarks {split['landmarks']:.2f} ms "
               f"(faces per photo {split['faces']:.0f})")
    atomic_write_json(Path(out), {"created": now(), "host": host_string(host_info()),
                                  "command": " ".join(sys.argv), "part": part,
                                  "photos": len(photos), "rounds": rounds, "model": model,
                                  "detector": pipe.detector.runs_on, "rows": rows,
                                  "pipeline_stages_median": split})
    click.echo(f"wrote {out}", err=True)


def _print(rows, title):
    click.echo(f"\n{title}")
    keys = [f">={s}" for s in SIZES]
    click.echo("| detector | size | " + " | ".join(f"found {k} px" for k in keys)
               + " | median / p90 ms per photo |")
    click.echo("|---|---|" + "---|" * len(keys) + "---|")
    for r in rows:
        rec = " | ".join(f"{r['recall'][k][0]} / {r['recall'][k][1]} ({pct(r['recall'][k]):.1f} %)"
                         for k in keys)
        size = "full" if r["size"] == 0 else r["size"]
        click.echo(f"| {r['bundle']} | {size} | {rec} | {r['median_ms']:.2f} / {r['p90_ms']:.2f} |")


def main():
    try:
        cli()
    except LandmarkError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
