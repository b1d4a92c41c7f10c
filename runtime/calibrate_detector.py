"""Measure how a face detector's boxes relate to the landmark-extent crop convention.

A development-machine tool (it reads annotated faces through evaluation.data); the device never
runs it. For each detector stage, on every face of the 300-W train split: run the stage alone,
keep the detection whose centre is nearest the face's landmark-extent centre (and inside the
extent), and record extent side / box side and the centre offset / box side in the frame the
stage saw. The medians are the stage's BoxCalibration.

    python runtime/calibrate_detector.py                      # Haar: print the table
    python runtime/calibrate_detector.py --write              # ... and update runtime/detector.py
    python runtime/calibrate_detector.py --detector yunet --detector-model yunet.onnx --write
                                                              # writes yunet.onnx.calibration.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


import click
import cv2
import numpy as np
from tqdm import tqdm

from runtime.bundle import atomic_write_json, atomic_write_text
from runtime.detector import (HaarDetector, YuNetDetector, calibration_file,
                              make_detector)
from runtime.preprocess import landmark_box

DETECTOR_PY = Path(__file__).resolve().parent / "detector.py"


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
        return {"n": 0, "faces": total}
    med = np.median(a, 0)
    q1, q3 = np.percentile(a, 25, 0), np.percentile(a, 75, 0)
    return {"n": int(len(a)), "faces": total, "scale": round(float(med[0]), 4),
            "dx": round(float(med[1]), 4), "dy": round(float(med[2]), 4),
            "iqr": [round(float(v), 4) for v in (q3 - q1)]}


def calibrate_haar(faces, det: HaarDetector) -> dict[str, dict]:
    out = {}
    for st in det.stages:
        samples = []
        for f in tqdm(faces, desc=f"stage {st.name}", file=sys.stderr, mininterval=2):
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
    samples = []
    for f in tqdm(faces, desc="yunet", file=sys.stderr, mininterval=2):
        rows, s = det.raw_detect(f.image())
        x0, y0, x1, y1 = landmark_box(f.points)
        c = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) * s
        side = max(x1 - x0, y1 - y0) * s
        i = _match(rows[:, :4], c, side)
        if i is None:
            continue
        x, y, w, h = rows[i, :4]
        b = max(w, h)
        samples.append((side / b, (c[0] - x - w / 2) / b, (c[1] - y - h / 2) / b))
    return {"yunet": _summary(samples, len(faces))}


def write_haar(table: dict[str, dict], command: str) -> None:
    """Replace the constants between the @calibration markers of runtime/detector.py."""
    src = DETECTOR_PY.read_text()
    lines = ["    # @calibration-start (rewritten by calibrate_detector.py --write)",
             f"    # {command}"]
    for name, r in table.items():
        if r["n"] == 0:
            lines += [f'    # no detection in {r["faces"]} faces',
                      f'    "{name}": BoxCalibration(1.0, 0.0, 0.0, measured=False),']
        else:
            lines += [f'    # n={r["n"]}/{r["faces"]}, IQR of scale, dx, dy: {r["iqr"][0]:.3f} '
                      f'{r["iqr"][1]:.3f} {r["iqr"][2]:.3f}',
                      f'    "{name}": BoxCalibration({r["scale"]}, {r["dx"]}, {r["dy"]}),']
    lines.append("    # @calibration-end")
    new, n = re.subn(r"    # @calibration-start.*?# @calibration-end", "\n".join(lines), src,
                     flags=re.S)
    if n != 1:
        raise click.ClickException(f"{DETECTOR_PY} lacks the @calibration-start/-end markers")
    atomic_write_text(DETECTOR_PY, new)


@click.command()
@click.option("--detector", type=click.Choice(["haar", "yunet"]), default="haar", show_default=True)
@click.option("--detector-model", type=click.Path(dir_okay=False), default=None,
              help="YuNet ONNX file (for --detector yunet).")
@click.option("--w300", type=click.Path(file_okay=False), default=None,
              help="300-W root (default: LANDMARK_300W or ../shared/300w).")
@click.option("--split", default="train", show_default=True)
@click.option("--limit", type=int, default=0, show_default=True, help="Use only N faces (0: all).")
@click.option("--write", is_flag=True, help="Store the constants (detector.py, or the YuNet "
              "model's .calibration.json).")
def main(detector, detector_model, w300, split, limit, write):
    from evaluation.data import load_300w     # dev machine only
    cv2.setNumThreads(1)
    faces = load_300w(w300, split)
    if limit:
        faces = faces[:limit]
    click.echo(f"[1/2] {len(faces)} faces of 300-W {split}", err=True)
    det = make_detector(detector, detector_model)
    click.echo(f"[2/2] running {detector}", err=True)
    table = calibrate_haar(faces, det) if detector == "haar" else calibrate_yunet(faces, det)
    click.echo(json.dumps(table, indent=1))
    if write:
        cmd = "python runtime/calibrate_detector.py " + " ".join(sys.argv[1:])
        if detector == "haar":
            write_haar(table, cmd)
            click.echo(f"wrote {DETECTOR_PY}", err=True)
        else:
            r = table["yunet"]
            if r["n"] == 0:
                raise click.ClickException("YuNet found none of the faces; nothing written")
            path = calibration_file(detector_model)
            atomic_write_json(path, {"scale": r["scale"], "dx": r["dx"], "dy": r["dy"],
                                     "n": r["n"], "faces": r["faces"], "command": cmd})
            click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
