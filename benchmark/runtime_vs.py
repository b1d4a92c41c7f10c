"""Our device runtime side by side with MediaPipe's face mesh, in one run, on the same inputs.

    make peers                         # once: MediaPipe 0.10.21 in its own venv (.venv-peers)
    python benchmark/runtime_vs.py --model artifacts/pfld68_w05/onnx_int8

Both run as long-lived worker processes (benchmark/peers/), each pinned to the same core
(--core), fed the same decoded images, interleaved set by set for --rounds rounds (ours,
MediaPipe, ours, ...). Per image the time of one call (detection + landmarks, no head pose) is
the median over the rounds; the tables give the median and p90 over images and the ratio
ours / MediaPipe. A face counts as found when an output face's point centroid lies inside the
annotated landmark extent and its size is within a factor of 2 of it; for our runtime the NME of
the found faces is given too (68 points; a 68-point model on WFLW through the 98 -> 68 map).

Sets: the 505 WFLW crops, the 330 HELEN test crops, scenes with several faces (2 x 2
mosaics of HELEN test crops, 4 annotated faces each), and whole photos (the reporting part of
../shared/photos; a face of at least 64 px counts as found when an output face's point centroid
lies in its annotated box and its point extent is within a factor of 2 of the box side; both
runtimes may return up to --max-faces faces). Tracking: a video of real HELEN faces
moving (benchmark/runtime_measure.py make-video), both in their tracking modes, ms per frame.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import cv2
import numpy as np

from common import defaults, host_info, host_string, now
from evaluation.sets import set_info
from runtime.bundle import atomic_write_json
from runtime.preprocess import landmark_box
from runtime.schemes import get_scheme

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "benchmark" / "peers"


class Worker:
    def __init__(self, name: str, argv: list[str], core: int):
        env = dict(os.environ, PEER_CORE=str(core), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(PEERS), str(REPO)]))
        self.name = name
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env)
        ready = self.p.stdout.readline()
        if not ready:
            raise click.ClickException(f"the {name} worker did not start: {' '.join(argv)}")

    def ask(self, **cmd) -> list:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise click.ClickException(f"the {self.name} worker died on {cmd['op']}")
        return json.loads(line)["results"]

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=30)


def labelled_set(name: str) -> tuple[list[str], list[list[np.ndarray]]]:
    """(image paths, per image the annotated faces' 68-point layouts)."""
    info = set_info(name)
    faces = info.load(None)
    s = get_scheme(info.scheme)
    return [str(f.image_path) for f in faces], [[s.as_68(np.asarray(f.points, np.float64))]
                                                for f in faces]


def mosaics(folder: Path, count: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """2 x 2 mosaics of HELEN test crops (256 px each), 4 annotated faces per image."""
    faces = set_info("300w:helen_test").load(None)
    paths, truth = [], []
    for m in range(count):
        tiles, gts = [], []
        for k in range(4):
            f = faces[(4 * m + k) % len(faces)]
            img = cv2.resize(f.image(), (256, 256))
            sx, sy = 256 / f.image().shape[1], 256 / f.image().shape[0]
            tiles.append(img)
            off = np.array([(k % 2) * 256, (k // 2) * 256], np.float64)
            gts.append(np.asarray(f.points, np.float64) * [sx, sy] + off)
        img = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
        p = folder / f"mosaic_{m:03d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(str(p))
        truth.append(gts)
    return paths, truth


def photo_set(part: str, min_face: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """Whole photos (evaluation.photos, one part) and, per photo, the annotated boxes of faces
    at least min_face px (smaller faces count neither way)."""
    from evaluation.photos import load_photos
    photos = load_photos(part=part)
    return ([str(p.path) for p in photos],
            [[b for b, s in zip(p.boxes, p.sizes()) if s >= min_face] for p in photos])


def score(results_rounds: list[list[dict]], truth) -> dict:
    """Found faces, timing (median over rounds per image) and, with points, NME. A truth item
    is a face's 68 points, or (whole photos) its annotated box x0, y0, x1, y1."""
    ms = np.median(np.array([[r["ms"] for r in rr] for rr in results_rounds]), 0)
    found, total, nme = 0, 0, []
    for res, gts in zip(results_rounds[0], truth):
        for gt in gts:
            total += 1
            box = np.ndim(gt) == 1
            x0, y0, x1, y1 = gt if box else landmark_box(gt)
            side = max(x1 - x0, y1 - y0)
            hits = [i for i, f in enumerate(res["faces"]) if x0 <= f["c"][0] <= x1
                    and y0 <= f["c"][1] <= y1 and side / 2 <= f["side"] <= side * 2]
            if not hits:
                continue
            found += 1
            if "points" in res and not box:
                p = np.asarray(res["points"][hits[0]])
                p = get_scheme(len(p)).as_68(p) if len(p) != 68 else p
                nme.append(float(np.linalg.norm(p - gt, axis=-1).mean()
                                 / np.linalg.norm(gt[36] - gt[45])))
    out = {"images": len(ms), "faces": total, "found": found,
           "median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
           "mean_ms": round(float(ms.mean()), 3)}
    if nme:
        out.update(nme_found_mean=round(float(np.mean(nme)), 5),
                   nme_found_median=round(float(np.median(nme)), 5))
    return out


@click.command()
@click.option("--model", default=f"{defaults.BUNDLES}/onnx_int8", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="our bundle")
@click.option("--ours-arg", "ours_args", multiple=True,
              help="extra flag for our worker, e.g. --refine=on")
@click.option("--peer-python", default=str(REPO / ".venv-peers" / "bin" / "python"),
              show_default=True, help="the Python of the MediaPipe venv (`make peers`)")
@click.option("--rounds", default=3, show_default=True)
@click.option("--core", default=0, show_default=True, help="the core both workers are pinned to")
@click.option("--mosaics", "n_mosaics", default=40, show_default=True)
@click.option("--video-frames", default=300, show_default=True)
@click.option("--photos", "photos_part", default="report", show_default=True,
              type=click.Choice(["report", "choose", "none"]),
              help="whole photos (../shared/photos), the reporting part; faces >= --photo-face px")
@click.option("--photo-face", default=64, show_default=True)
@click.option("--max-faces", default=50, show_default=True,
              help="most faces per image, for both (so that both may return every face)")
@click.option("--out", default="artifacts/runtime_vs.json", show_default=True)
def main(model, ours_args, peer_python, rounds, core, n_mosaics, video_frames, photos_part,
         photo_face, max_faces, out):
    """Per image and per tracked frame, ours vs MediaPipe face mesh, one run."""
    if not Path(peer_python).is_file():
        raise click.ClickException(f"{peer_python} does not exist: run `make peers` first")
    from benchmark.runtime_measure import make_video
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"WFLW crops (505)": labelled_set("wflw:test"),
                "HELEN test crops (330)": labelled_set("300w:helen_test"),
                f"2x2 mosaics of HELEN faces ({n_mosaics} images, 4 faces each)":
                    mosaics(tmp, n_mosaics)}
        if photos_part != "none":
            paths, truth = photo_set(photos_part, photo_face)
            sets[f"whole photos, {photos_part} part ({len(paths)} photos, faces >= "
                 f"{photo_face} px)"] = (paths, truth)
        helen = sorted(Path(p) for p in sets["HELEN test crops (330)"][0])
        video = make_video(helen, tmp / "faces.avi", video_frames)
        workers = {"ours": Worker("ours", [sys.executable, str(PEERS / "ours_worker.py"), model,
                                           "--max-faces", str(max_faces), *ours_args], core),
                   "mediapipe": Worker("mediapipe", [peer_python, str(PEERS / "mediapipe_worker.py"),
                                                     "--max-faces", str(max_faces)], core)}
        try:
            raw = {w: {s: [] for s in sets} for w in workers}
            video_ms = {w: [] for w in workers}
            video_found = {}
            for r in range(rounds):
                for s, (paths, _) in sets.items():
                    for w, worker in workers.items():
                        click.echo(f"round {r + 1}/{rounds}: {w} on {s}", err=True)
                        raw[w][s].append(worker.ask(op="images", paths=paths))
                for w, worker in workers.items():
                    click.echo(f"round {r + 1}/{rounds}: {w} on the video", err=True)
                    res = worker.ask(op="video", path=str(video), frames=video_frames)
                    video_ms[w].append(float(np.median([x["ms"] for x in res])))
                    video_found[w] = sum(1 for x in res if x["n"])
        finally:
            for worker in workers.values():
                worker.close()
        # our points for the NME of found faces (not timed: one extra pass in this process)
        from runtime.pipeline import Pipeline
        refine = [a.split("=")[1] for a in ours_args if a.startswith("--refine=")]
        pipe = Pipeline(model, track=False, pose=False, max_faces=max_faces,
                        **({"refine": {"on": True, "off": False}.get(refine[0], refine[0])}
                           if refine else {}))
        for s, (paths, _) in sets.items():
            for res, p in zip(raw["ours"][s][0], paths):
                res["points"] = [f["points"].tolist() for f in pipe.process(cv2.imread(p))]
    table = {s: {w: score(raw[w][s], truth) for w in workers} for s, (_, truth) in sets.items()}
    vid = {w: {"median_ms_per_frame": round(float(np.median(v)), 3), "rounds": v,
               "frames_with_face": video_found[w], "frames": video_frames}
           for w, v in video_ms.items()}
    click.echo(f"\nours: {model} {' '.join(ours_args)}; {rounds} rounds, both pinned to core {core}")
    click.echo("| set | ours ms median / p90 | MediaPipe ms median / p90 | ratio | faces found ours / MediaPipe | NME found (ours) |")
    click.echo("|---|---|---|---|---|---|")
    for s, t in table.items():
        o, m = t["ours"], t["mediapipe"]
        nme = f"{o['nme_found_mean']:.4f} / {o['nme_found_median']:.4f}" if "nme_found_mean" in o else "-"
        click.echo(f"| {s} | {o['median_ms']:.2f} / {o['p90_ms']:.2f} | {m['median_ms']:.2f} / "
                   f"{m['p90_ms']:.2f} | {o['median_ms'] / m['median_ms']:.2f} | "
                   f"{o['found']} / {m['found']} of {o['faces']} | {nme} |")
    o, m = vid["ours"], vid["mediapipe"]
    click.echo(f"| tracking, ms per frame ({video_frames} frames) | {o['median_ms_per_frame']:.2f} | "
               f"{m['median_ms_per_frame']:.2f} | {o['median_ms_per_frame'] / m['median_ms_per_frame']:.2f} | "
               f"frames with a face {o['frames_with_face']} / {m['frames_with_face']} | - |")
    atomic_write_json(Path(out), {"created": now(), "host": host_string(host_info()),
                                  "command": " ".join(sys.argv), "model": model,
                                  "ours_args": list(ours_args), "rounds": rounds, "core": core,
                                  "max_faces": max_faces,
                                  "sets": table, "video": vid})
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
