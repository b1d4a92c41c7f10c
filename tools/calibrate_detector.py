"""Measure how face detectors' boxes relate to the landmark crop, and YuNet's input size, on the
300-W training faces; write runtime/detectors/calibration.json (data the runtime reads).

A development-machine tool (it reads annotated faces through evaluation.data); the device never
runs it and the runtime never imports it. For each detector (Haar: each stage alone), on every
face of the 300-W train split: keep the detection whose centre is nearest the face's
landmark-extent centre (and inside the extent), and record extent side / box side and the
centre offset / box side. YuNet is fitted twice: "axis" (image axes) and "levelled" (the
ground-truth points rotated by the angle of YuNet's own eye points, the frame the runtime crops
in). The medians are the calibrations. YuNet's detection input size is chosen as the smallest
of --sizes that finds at least --min-found of these faces.

    python tools/calibrate_detector.py                 # print everything
    python tools/calibrate_detector.py --write         # ... and update calibration.json
"""
from __future__ import annotations

import json
import sys
import time

import click
import cv2
import numpy as np
from tqdm import tqdm

from runtime.bundle import atomic_write_json
from runtime.detector import CALIBRATION_FILE, HaarDetector, YuNetDetector, eye_angle
from runtime.preprocess import landmark_box


def _match(boxes: np.ndarray, centre: np.ndarray, side: float):
    """Index of the (x, y, w, h) box whose centre is nearest `centre` and within the extent."""
    if not len(boxes):
        return None
    c = boxes[:, :2] + boxes[:, 2:4] / 2
    d = np.abs(c - centre).max(1)
    i = int(np.argmin(d))
    return i if d[i] < side / 2 else None


def _summary(samples: list[tuple[float, float, float]], total: int) -> dict:
    a = np.asarray(samples, np.float64).reshape(-1, 3)
    if not len(a):
        return {"n": 0, "of": total}
    med = np.median(a, 0)
    q1, q3 = np.percentile(a, 25, 0), np.percentile(a, 75, 0)
    return {"scale": round(float(med[0]), 4), "dx": round(float(med[1]), 4),
            "dy": round(float(med[2]), 4), "n": int(len(a)), "of": total,
            "iqr": [round(float(v), 4) for v in (q3 - q1)]}


def calibrate_haar(faces, det: HaarDetector) -> dict[str, dict]:
    out = {}
    for st in det.stages:
        samples = []
        for f in tqdm(faces, desc=f"haar {st.name}", file=sys.stderr, mininterval=2):
            gray, s = det.prepare(f.image())
            rects, m = det.run_stage(gray, st)
            x0, y0, x1, y1 = landmark_box(f.points)
            c = (np.array([(x0 + x1) / 2, (y0 + y1) / 2]) * s) @ m[:, :2].T + m[:, 2]
            side = max(x1 - x0, y1 - y0) * s
            i = _match(rects, c, side)
            if i is None:
                continue
            x, y, w, h = rects[i]
            b = max(w, h)
            samples.append((side / b, (c[0] - x - w / 2) / b, (c[1] - y - h / 2) / b))
        out[st.name] = _summary(samples, len(faces))
    return out


def calibrate_yunet(faces, det: YuNetDetector) -> dict[str, dict]:
    """"axis" and "levelled" calibrations of YuNet at its input size."""
    axis, levelled = [], []
    for f in tqdm(faces, desc="yunet", file=sys.stderr, mininterval=2):
        rows, s = det.rows(f.image()), 1.0
        x0, y0, x1, y1 = landmark_box(f.points)
        c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        i = _match(rows[:, :4] / s, c, max(x1 - x0, y1 - y0))
        if i is None:
            continue
        x, y, w, h = rows[i, :4] / s
        b, bc = max(w, h), np.array([x + w / 2, y + h / 2])
        axis.append((max(x1 - x0, y1 - y0) / b, (c[0] - bc[0]) / b, (c[1] - bc[1]) / b))
        pts5 = rows[i, 4:14].reshape(5, 2) / s
        t = np.radians(eye_angle(pts5[0], pts5[1]))
        rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])   # image -> levelled
        q = (f.points - bc) @ rot.T
        lo, hi = q.min(0), q.max(0)
        mid = (lo + hi) / 2
        levelled.append((float((hi - lo).max()) / b, mid[0] / b, mid[1] / b))
    return {"levelled": _summary(levelled, len(faces)), "axis": _summary(axis, len(faces))}


def choose_size(faces, sizes: list[int], min_found: float) -> tuple[int, list[dict]]:
    """Found share and time of YuNet at each input size; the smallest that finds min_found."""
    table = []
    for size in sizes:
        det = YuNetDetector(max_side=size, level=False, min_face_px=0)
        found, times = 0, []
        for f in faces:
            img = f.image()
            t = time.perf_counter()
            rows, s = det.rows(img), 1.0
            times.append(time.perf_counter() - t)
            x0, y0, x1, y1 = landmark_box(f.points)
            found += _match(rows[:, :4] / s, np.array([(x0 + x1) / 2, (y0 + y1) / 2]),
                            max(x1 - x0, y1 - y0)) is not None
        table.append({"max_side": size, "found": found, "faces": len(faces),
                      "found_share": round(found / len(faces), 4),
                      "median_ms": round(float(np.median(times)) * 1e3, 3)})
    ok = [r for r in table if r["found_share"] >= min_found]
    return (ok[0] if ok else table[-1])["max_side"], table


@click.command()
@click.option("--w300", type=click.Path(file_okay=False), default=None,
              help="300-W root (default: LANDMARK_300W or ../shared/300w).")
@click.option("--split", default="train", show_default=True)
@click.option("--limit", type=int, default=0, show_default=True, help="Use only N faces (0: all).")
@click.option("--sizes", default="96,128,160,192,256", show_default=True,
              help="YuNet input sizes (longer image side) to try")
@click.option("--min-found", default=1.0, show_default=True,
              help="share of the faces YuNet must find at the chosen input size")
@click.option("--haar/--no-haar", default=True, show_default=True, help="also refit the Haar stages")
@click.option("--write", is_flag=True, help=f"Update {CALIBRATION_FILE.name} in runtime/detectors/.")
def main(w300, split, limit, sizes, min_found, haar, write):
    from evaluation.data import load_300w     # dev machine only
    cv2.setNumThreads(1)
    faces = load_300w(w300, split)
    if limit:
        faces = faces[:limit]
    click.echo(f"[1/3] {len(faces)} faces of 300-W {split}", err=True)
    size, size_table = choose_size(faces, [int(v) for v in sizes.split(",")], min_found)
    for r in size_table:
        click.echo(json.dumps(r), err=True)
    click.echo(f"[2/3] YuNet at {size} px", err=True)
    yunet = calibrate_yunet(faces, YuNetDetector(max_side=size, level=False, min_face_px=0))
    out = json.loads(CALIBRATION_FILE.read_text())
    if haar:
        click.echo("[3/3] Haar stages", err=True)
        out["haar"] = calibrate_haar(faces, HaarDetector())
    cmd = "python tools/calibrate_detector.py " + " ".join(sys.argv[1:])
    out.update({"yunet": yunet, "yunet_max_side": size, "yunet_sizes": size_table,
                "command": cmd, "fitted_on": f"300-W {split}, {len(faces)} faces"})
    click.echo(json.dumps({k: out[k] for k in ("yunet", "yunet_max_side")}, indent=1))
    if write:
        atomic_write_json(CALIBRATION_FILE, out)
        click.echo(f"wrote {CALIBRATION_FILE}", err=True)


if __name__ == "__main__":
    main()
