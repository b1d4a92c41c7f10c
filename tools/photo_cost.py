"""Where the runtime's time goes on whole photos: per stage (detect, crop, landmarks), faces
found per photo, landmark network runs per photo (first pass + the second pass of `--refine
auto`), one landmark call's cost, and, with --small, what the second pass is worth on small
faces (held-out WFLW train faces shrunk to a given size, mean NME of the found faces with the
second pass on its default rule and off).

    python tools/photo_cost.py --model artifacts/student_w05/onnx_int8
    python tools/photo_cost.py --model artifacts/student_w05/onnx_int8 --small 32 --small 48

Pinned to one core (--core), 1 thread, pose off (as benchmark/runtime_vs.py runs it), the
reporting part of ../shared/photos. Team tool; nothing is written.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _photos(pipe, rounds: int) -> None:
    from evaluation.photos import load_photos
    photos = load_photos(part="report")
    images = [cv2.imread(str(p.path)) for p in photos]
    runs: list[int] = []
    orig = pipe._landmarks                       # count the network's faces per call

    def counted(image, boxes, angles, ms):
        runs[-1] += len(boxes)
        return orig(image, boxes, angles, ms)
    pipe._landmarks = counted
    stages, faces = [], []
    for r in range(rounds + 1):                  # round 0 warms up
        for im in images:
            runs.append(0)
            n = len(pipe.process(im))
            if r:
                stages.append(dict(pipe.last_ms))
                faces.append(n)
            else:
                runs.pop()
    pipe._landmarks = orig
    per = len(images)
    runs_arr, faces_arr = np.array(runs[-per:]), np.array(faces[-per:])
    click.echo(f"{per} photos, {rounds} round(s): ms per photo, median / mean")
    for k in ("detect", "crop", "landmarks", "total"):
        v = np.array([s[k] for s in stages])
        click.echo(f"  {k:9s} {np.median(v):6.2f} / {v.mean():6.2f}")
    click.echo(f"  faces per photo: median {np.median(faces_arr):.0f}, "
               f"mean {faces_arr.mean():.2f}; landmark runs per photo: mean {runs_arr.mean():.2f} "
               f"({runs_arr.sum() - faces_arr.sum()} second passes on {faces_arr.sum()} faces)")
    found = next(((im, f) for im in images for f in pipe.process(im)), None)
    if found is not None:
        x, _ = pipe.pre(found[0], [found[1]["box"]], [found[1]["angle"]])
        for _ in range(10):
            pipe.model(x)
        t = []
        for _ in range(100):
            t0 = time.perf_counter()
            pipe.model(x)
            t.append((time.perf_counter() - t0) * 1e3)
        click.echo(f"  one landmark call, batch 1: {np.median(t):.2f} ms")


def _small(model: str, sizes: list[int]) -> None:
    from evaluation.sets import set_info
    from runtime.pipeline import Pipeline
    from runtime.preprocess import landmark_box
    from runtime.schemes import get_scheme
    info = set_info("wflw:heldout")
    faces, scheme = info.load(None), get_scheme(info.scheme)
    click.echo(f"second pass on small faces ({len(faces)} wflw:heldout faces, shrunk so the "
               "landmark extent is SIZE px): mean NME (68 points, inter-ocular) of found faces")
    for size in sizes:
        row = []
        for refine in ("auto", False):
            pipe = Pipeline(model, track=False, pose=False, max_faces=5, refine=refine)
            nme = []
            for f in faces:
                gt = scheme.as_68(np.asarray(f.points, np.float64))
                x0, y0, x1, y1 = landmark_box(gt)
                s = min(1.0, size / max(x1 - x0, y1 - y0))
                im = cv2.resize(f.image(), None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
                g = gt * s
                best = None
                for o in pipe.process(im):
                    p = o["points"]
                    p = get_scheme(len(p)).as_68(p) if len(p) != 68 else p
                    d = np.linalg.norm(p.mean(0) - g.mean(0))
                    if d < size / 2 and (best is None or d < best[0]):
                        best = (d, p)
                if best is not None:
                    nme.append(np.linalg.norm(best[1] - g, axis=-1).mean()
                               / np.linalg.norm(g[36] - g[45]))
            row.append(f"refine {refine or 'off'}: {np.mean(nme):.4f} ({len(nme)} found)")
        click.echo(f"  {size:4d} px  " + "; ".join(row))


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--rounds", default=2, show_default=True)
@click.option("--core", default=None, type=int, help="pin to this core (default: no pinning)")
@click.option("--small", "small", multiple=True, type=int,
              help="also measure the second pass on faces of this size (px), repeatable")
def main(model, rounds, core, small):
    """Per-stage cost of the runtime on the reporting photos."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    from runtime.pipeline import Pipeline
    _photos(Pipeline(model, track=False, pose=False, max_faces=50, threads=1), rounds)
    if small:
        _small(model, list(small))


if __name__ == "__main__":
    main()
