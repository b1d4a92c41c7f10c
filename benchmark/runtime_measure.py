"""Reproducible speed and detection figures of the device runtime (runtime.pipeline.Pipeline).

    python benchmark/runtime_measure.py make-video --out /tmp/faces.avi      # real faces, moving
    python benchmark/runtime_measure.py video --model B1 --model B2 --video /tmp/faces.avi
    python benchmark/runtime_measure.py images --model B --ground-truth wflw # the 505 WFLW crops
    python benchmark/runtime_measure.py smoothing --model B                  # One Euro filter

A development-machine tool beside the benchmark (it reads annotations through evaluation/);
the device folder runtime/ holds only what runs on a device.

`video`: per-frame milliseconds per stage (detect / crop / landmarks / pose, median and p90)
and frames per second of Pipeline.process, with and without tracking, per bundle (engine).
`images`: every image on its own (no tracking): median ms per image of detect + crop +
landmarks (pose is reported apart) and the share of images in which a face is found; with
--ground-truth wflw|helen (development machine: reads the annotations through evaluation.data) also
the share in which the *right* face is found (its points' centroid inside the annotated
extent) and the NME of those faces, to compare --refine/--no-refine.

Each run prints a markdown table and can write JSON records (--out). Stage times are wall
clock, or process CPU time with --clock cpu, which stays close to an idle machine's wall time
when other jobs share the cores (single-threaded work; an engine's idle spinning threads would
add to it); the "cpu ms" columns are always process CPU time of the whole process() call. The
first --warmup frames are not counted.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import cv2
import numpy as np

from common import host_info, host_string, now
from runtime.bundle import atomic_write_json
from runtime.detector import DEFAULT_HAAR_CHAIN, DETECTORS, HAAR_DEFAULTS, make_detector
from runtime.engines import ENGINES
from runtime.media import open_video, read_image
from runtime.pipeline import STAGES, Pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARTS = STAGES + ("total",)


def _stats(v) -> dict:
    a = np.asarray(v, np.float64)
    if not len(a):
        return {"median": None, "p90": None, "mean": None}
    return {"median": round(float(np.median(a)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "mean": round(float(a.mean()), 3)}


def make_pipeline(bundle, engine, threads, precision, detector, detector_model, haar,
                  clock="wall", yunet_size=None, **kw):
    if "refine" in kw:
        kw["refine"] = {"on": True, "off": False}.get(kw["refine"], kw["refine"])
    opts = haar if detector == "haar" else ({"max_side": yunet_size} if yunet_size else {})
    det = make_detector(detector, detector_model, **opts)
    pipe = Pipeline(bundle, engine=engine, threads=threads, precision=precision, detector=det, **kw)
    if clock == "cpu":
        pipe.clock = time.process_time
    return pipe


def _engine_label(pipe: Pipeline) -> str:
    e = pipe.engine
    prec = ""
    if e.reports_precision:     # OpenVINO: what the device really runs
        p = e.execution_precision()
        prec = f" (executes {p.split(chr(39))[1] if chr(39) in p else p})"
    return f"{e.name} {pipe.meta.precision}{prec}"


# -- video -----------------------------------------------------------------------------------
def time_video(pipe: Pipeline, frames: list[np.ndarray], warmup: int = 5) -> dict:
    pipe.reset()
    per = {k: [] for k in PARTS}
    cpu, found = [], 0
    for i, f in enumerate(frames):
        c0 = time.process_time()
        faces = pipe.process(f)
        c1 = time.process_time()
        if i < warmup:
            continue
        found += bool(faces)
        cpu.append((c1 - c0) * 1e3)
        for k in PARTS:
            per[k].append(pipe.last_ms[k])
    n = len(per["total"])
    return {"frames": n, "frames_with_face": found, "detector_runs": pipe.detector_runs,
            "ms": {k: _stats(v) for k, v in per.items()}, "cpu_ms": _stats(cpu),
            "fps": round(n / (sum(per["total"]) / 1e3), 1) if n else None,
            "fps_cpu": round(n / (sum(cpu) / 1e3), 1) if n else None}


def read_frames(path: str, limit: int = 0) -> list[np.ndarray]:
    cap, _, what = open_video(path)
    frames = []
    while not limit or len(frames) < limit:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    if not frames:
        raise click.ClickException(f"{what}: no frames")
    return frames


def make_video(images: list[Path], out: Path, frames: int = 300, size=(640, 480),
               per_face: int = 60, fps: float = 30.0, seed: int = 0) -> Path:
    """Real face crops moving smoothly (shift, scale, roll) over a grey frame, one face per
    `per_face` frames, written as MJPG .avi (decodable by any OpenCV build)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise click.ClickException(f"cannot write {out}")
    order = rng.permutation(len(images))
    for i in range(frames):
        img, _ = read_image(images[order[(i // per_face) % len(images)]])
        t = i / fps
        side = 0.55 * h * (1 + 0.12 * np.sin(2 * np.pi * t / 4.0))
        cx = w / 2 + 0.18 * w * np.sin(2 * np.pi * t / 5.0)
        cy = h / 2 + 0.08 * h * np.sin(2 * np.pi * t / 3.0)
        m = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2),
                                    10 * np.sin(2 * np.pi * t / 6.0), side / max(img.shape[:2]))
        m[:, 2] += np.array([cx, cy]) - np.array([img.shape[1] / 2, img.shape[0] / 2])
        writer.write(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=(90, 90, 90)))
    writer.release()
    tmp.replace(out)
    return out


# -- images ----------------------------------------------------------------------------------
def time_images(pipe: Pipeline, images: list[np.ndarray], warmup: int = 5,
                truth: list | None = None) -> dict:
    """Each image alone. truth: per image a (K, 2) ground-truth array in the model's scheme
    layout plus the eye-corner indices, to score found faces."""
    for img in images[:warmup]:
        pipe.process(img)
    per = {k: [] for k in PARTS}
    cpu, found, right, nme, stages = [], 0, 0, [], {}
    for i, img in enumerate(images):
        c0 = time.process_time()
        faces = pipe.process(img)
        cpu.append((time.process_time() - c0) * 1e3)
        for k in PARTS:
            per[k].append(pipe.last_ms[k])
        if not faces:
            continue
        found += 1
        stages[faces[0]["stage"]] = stages.get(faces[0]["stage"], 0) + 1
        if truth is not None:
            gt, eyes = truth[i]
            lo, hi = gt.min(0), gt.max(0)
            ok = [f for f in faces
                  if np.all((lo <= f["points"].mean(0)) & (f["points"].mean(0) <= hi))]
            if ok:
                right += 1
                d = np.linalg.norm(gt[eyes[0]] - gt[eyes[1]])
                nme.append(float(np.linalg.norm(ok[0]["points"] - gt, axis=-1).mean() / d))
    n = len(images)
    no_pose = np.asarray(per["total"]) - np.asarray(per["pose"])
    rec = {"images": n, "found": found, "found_share": round(found / n, 4),
           "ms": {k: _stats(v) for k, v in per.items()},
           "ms_per_image": _stats(no_pose), "cpu_ms": _stats(cpu),
           "found_by_stage": stages}
    if truth is not None:
        rec.update({"right_face": right, "right_share": round(right / n, 4),
                    "nme_found": round(float(np.mean(nme)), 5) if nme else None,
                    "nme_found_median": round(float(np.median(nme)), 5) if nme else None})
    return rec


GROUND_TRUTH = {"wflw": "wflw:test", "helen": "300w:helen_test", "300w-train": "300w:train"}


def annotated_faces(dataset: str, model_scheme):
    """(image paths, per image (points in the model's layout, eye corners)) of annotated faces:
    "wflw" (the 505 test crops), "helen" (the 330 300-W HELEN test crops) or "300w-train" (the
    2,012 training faces: where runtime settings are chosen)."""
    from evaluation.sets import set_info      # development machine only
    from runtime.schemes import get_scheme
    info = set_info(GROUND_TRUTH[dataset])
    faces, data = info.load(None), get_scheme(info.scheme)
    out = []
    for f in faces:
        gt = np.asarray(f.points, np.float64)
        if model_scheme.num_points != data.num_points:
            gt = (data if data.num_points > model_scheme.num_points else model_scheme).as_68(gt) \
                if data.num_points == 98 else gt
        out.append((gt, model_scheme.eye_corners if model_scheme.num_points == len(gt)
                    else get_scheme(68).eye_corners))
    return [f.image_path for f in faces], out


# -- CLI -------------------------------------------------------------------------------------
def _common(f):
    f = click.option("--model", "bundles", multiple=True, required=True, type=click.Path(),
                     help="Bundle folder; repeat to measure several (e.g. one per engine).")(f)
    f = click.option("--engine", type=click.Choice(sorted(ENGINES)), default=None,
                     help="Override the bundle's engine.")(f)
    f = click.option("--threads", type=click.IntRange(1), default=1, show_default=True)(f)
    f = click.option("--precision", default=None, help="Engine precision hint (OpenVINO "
                     "'f32' pins full precision; default: the device's own, bf16 on some "
                     "CPUs).")(f)
    f = click.option("--detector", type=click.Choice(sorted(DETECTORS)), default="yunet",
                     show_default=True)(f)
    f = click.option("--yunet-size", type=int, default=None,
                     help="YuNet input size (longer side)  [default: calibration.json's]")(f)
    f = click.option("--level/--no-level", default=True, show_default=True,
                     help="Upright crops (rotated by the face's roll).")(f)
    f = click.option("--max-faces", type=int, default=10, show_default=True)(f)
    f = click.option("--detector-model", type=click.Path(dir_okay=False), default=None)(f)
    f = click.option("--chain", default=",".join(DEFAULT_HAAR_CHAIN), show_default=True,
                     help="Haar stages, in order.")(f)
    f = click.option("--min-face", type=float, default=HAAR_DEFAULTS["min_face"],
                     show_default=True)(f)
    f = click.option("--search-px", type=int, default=HAAR_DEFAULTS["search_px"],
                     show_default=True)(f)
    f = click.option("--scale-factor", type=float, default=HAAR_DEFAULTS["scale_factor"],
                     show_default=True)(f)
    f = click.option("--min-neighbors", type=int, default=HAAR_DEFAULTS["min_neighbors"],
                     show_default=True)(f)
    f = click.option("--refine", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True)(f)
    f = click.option("--warmup", type=int, default=5, show_default=True)(f)
    f = click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall",
                     show_default=True, help="Stage timer: wall clock, or process CPU time "
                     "(close to an idle machine's wall time when other jobs share the cores).")(f)
    f = click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help="Write the records as JSON.")(f)
    return f


def _haar(chain, min_face, search_px, scale_factor, min_neighbors) -> dict:
    return {"chain": tuple(c for c in chain.split(",") if c), "min_face": min_face,
            "search_px": search_px, "scale_factor": scale_factor, "min_neighbors": min_neighbors}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


@click.group()
def cli():
    """Speed and detection figures of the device runtime."""


@cli.command("make-video")
@click.option("--faces", "faces_dir", type=click.Path(file_okay=False),
              default=str(SHARED / "300w" / "helen" / "testset"), show_default=True,
              help="Folder of real face crops.")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--frames", type=int, default=300, show_default=True)
@click.option("--per-face", type=int, default=60, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_video_cmd(faces_dir, out, frames, per_face, seed):
    """A test video from real face crops moving smoothly (no real video ships with the repo)."""
    images = sorted(p for p in Path(faces_dir).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not images:
        raise click.ClickException(f"no .jpg/.png images under {faces_dir}")
    make_video(images, Path(out), frames, per_face=per_face, seed=seed)
    used = min(len(images), -(-frames // per_face))
    click.echo(f"wrote {out}: {frames} frames from {used} faces")


@cli.command("video")
@_common
@click.option("--video", required=True, help="Video file (see make-video) or camera index.")
@click.option("--max-frames", type=int, default=0, show_default=True)
def video_cmd(bundles, engine, threads, precision, detector, yunet_size, level, max_faces,
              detector_model, chain, min_face, search_px, scale_factor, min_neighbors, refine,
              warmup, clock, out, video, max_frames):
    """Per-frame stage split and fps, with and without tracking, per bundle."""
    cv2.setNumThreads(threads)
    frames = read_frames(video, max_frames)
    haar = _haar(chain, min_face, search_px, scale_factor, min_neighbors)
    records = []
    click.echo(f"{video}: {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, "
               f"{threads} thread(s), first {warmup} not counted", err=True)
    for i, b in enumerate(bundles, 1):
        for track in (True, False):
            pipe = make_pipeline(b, engine, threads, precision, detector, detector_model, haar,
                                 clock, yunet_size, track=track, refine=refine, level=level,
                                 max_faces=max_faces)
            click.echo(f"[{i}/{len(bundles)}] {b} track={track} ...", err=True)
            rec = time_video(pipe, frames, warmup)
            rec.update({"bundle": str(b), "engine": _engine_label(pipe), "track": track,
                        "refine": refine, "threads": threads, "clock": clock, "detector": detector,
                        "haar": haar if detector == "haar" else None, "video": str(video)})
            records.append(rec)
    click.echo("\n| engine | tracking | detect | crop | landmarks | pose | total ms | fps | "
               "cpu ms | fps (cpu) | detector runs / frames |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        m = r["ms"]
        click.echo(f"| {r['engine']} | {'on' if r['track'] else 'off'} | "
                   + " | ".join(_fmt(m[k]["mean"]) for k in STAGES)
                   + f" | {_fmt(m['total']['median'])} | {r['fps']} | {_fmt(r['cpu_ms']['median'])}"
                   f" | {r['fps_cpu']} | {r['detector_runs']} / {r['frames'] + warmup} |")
    click.echo("(stage columns: mean ms per frame, so they add up with detection running on "
               "only some frames; total: median ms per frame)")
    _write(out, records)


@cli.command("images")
@_common
@click.option("--images", "images_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of images (default: the WFLW crops in ../shared/wflw).")
@click.option("--ground-truth", type=click.Choice(["none", *GROUND_TRUTH]), default="none",
              show_default=True, help="Use these annotated faces (instead of --images) and "
              "score the found ones (development machine: reads them through evaluation.data).")
@click.option("--no-pose", is_flag=True, help="Skip head pose.")
def images_cmd(bundles, engine, threads, precision, detector, yunet_size, level, max_faces,
               detector_model, chain, min_face, search_px, scale_factor, min_neighbors, refine,
               warmup, clock, out, images_dir, ground_truth, no_pose):
    """Median ms per image (detect + crop + landmarks) and the share of images with a face."""
    cv2.setNumThreads(threads)
    haar = _haar(chain, min_face, search_px, scale_factor, min_neighbors)
    records = []
    for i, b in enumerate(bundles, 1):
        pipe = make_pipeline(b, engine, threads, precision, detector, detector_model, haar,
                             clock, yunet_size, track=False, refine=refine, pose=not no_pose,
                             level=level, max_faces=max_faces)
        truth = None
        if ground_truth != "none":
            paths, truth = annotated_faces(ground_truth, pipe.scheme)
        else:
            root = Path(images_dir) if images_dir else SHARED / "wflw" / "WFLW_images"
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
            if not paths:
                raise click.ClickException(f"no .jpg/.png images under {root}")
        images = [read_image(p)[0] for p in paths]
        click.echo(f"[{i}/{len(bundles)}] {b}: {len(images)} images ...", err=True)
        rec = time_images(pipe, images, warmup, truth)
        rec.update({"bundle": str(b), "engine": _engine_label(pipe), "refine": refine,
                    "level": level, "threads": threads, "clock": clock, "detector": detector,
                    "yunet_size": getattr(pipe.detector, "max_side", None),
                    "haar": haar if detector == "haar" else None})
        records.append(rec)
    click.echo("\n| engine | level | refine | images | face found | right face | NME mean / median | "
               "ms/image median | p90 | detect | landmarks | cpu ms median |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        right = f"{r['right_face']} ({r['right_share']:.1%})" if "right_face" in r else "-"
        nme = f"{r['nme_found']:.4f} / {r['nme_found_median']:.4f}" \
            if r.get("nme_found") is not None else "-"
        click.echo(f"| {r['engine']} | {r['level']} | {r['refine']} | {r['images']} | {r['found']} "
                   f"({r['found_share']:.1%}) | {right} | {nme} | "
                   f"{_fmt(r['ms_per_image']['median'])} | {_fmt(r['ms_per_image']['p90'])} | "
                   f"{_fmt(r['ms']['detect']['median'])} | "
                   f"{_fmt(r['ms']['landmarks']['median'])} | "
                   f"{_fmt(r['cpu_ms']['median'])} |")
    _write(out, records)


def still_then_moving(face, n: int = 120, size: int = 400, noise: float = 4.0):
    """A real face held still for n/2 frames (with sensor noise), then swinging sideways
    (60 px, period 2 s at 30 fps): (frames, ground-truth points per frame)."""
    img = face.image()
    frames, truth = [], []
    s = 220 / img.shape[1]
    for i in range(n):
        dx = 60 * np.sin(2 * np.pi * (i - n // 2) / 60) if i >= n // 2 else 0.0
        m = np.array([[s, 0, 90 + dx], [0, s, 90]])
        f = cv2.warpAffine(img, m, (size, size), borderValue=(90, 90, 90)).astype(np.float64)
        f += np.random.default_rng(i).normal(0, noise, f.shape)
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
        truth.append(np.asarray(face.points, np.float64) @ m[:, :2].T + m[:, 2])
    return frames, truth


@cli.command("smoothing")
@click.option("--model", "bundle", required=True, type=click.Path())
@click.option("--faces", type=int, default=6, show_default=True,
              help="HELEN test faces (every 30th) to build clips from.")
@click.option("--setting", "settings", multiple=True, default=("off", "1.0,4", "1.0,10", "0.5,10"),
              show_default=True, help="'off' or 'MIN_CUTOFF,BETA' of the One Euro filter.")
def smoothing_cmd(bundle, faces, settings):
    """Jitter of a still face and error on a moving one, per smoothing setting (development
    machine: reads HELEN test faces through evaluation.data)."""
    from runtime.tracker import TrackerConfig
    from evaluation.data import load_300w
    cv2.setNumThreads(1)
    chosen = load_300w(split="helen_test")[::30][:faces]
    clips = [still_then_moving(f) for f in chosen]
    click.echo("| smoothing | NME still | NME moving | jitter (still face) |\n|---|---|---|---|")
    for setting in settings:
        if setting == "off":
            cfg = TrackerConfig(smooth=False)
        else:
            cutoff, beta = (float(v) for v in setting.split(","))
            cfg = TrackerConfig(min_cutoff=cutoff, beta=beta)
        still, moving, jitter = [], [], []
        for frames, truth in clips:
            pipe = Pipeline(bundle, tracker=cfg, pose=False)
            prev = None
            for i, (f, gt) in enumerate(zip(frames, truth)):
                res = pipe.process(f)
                if not res:
                    prev = None
                    continue
                p, d = res[0]["points"], np.linalg.norm(gt[36] - gt[45])
                (moving if i >= len(frames) // 2 else still).append(
                    np.linalg.norm(p - gt, axis=1).mean() / d)
                if 10 <= i < len(frames) // 2 and prev is not None:
                    jitter.append(np.linalg.norm(p - prev, axis=1).mean() / d)
                prev = p
        click.echo(f"| {setting} | {np.mean(still):.4f} | {np.mean(moving):.4f} | "
                   f"{np.mean(jitter):.4f} |")
    click.echo("(NME: mean point error / outer-eye distance; jitter: mean frame-to-frame point "
               "motion of the still face, same units)")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise click.ClickException("no /proc/self/status here: the soak needs Linux")


@cli.command("soak")
@click.option("--model", "bundle", required=True, type=click.Path())
@click.option("--video", required=True, help="Video file (see make-video); looped to --frames.")
@click.option("--frames", type=int, default=10000, show_default=True)
@click.option("--every", type=int, default=250, show_default=True, help="RSS sample interval")
@click.option("--out", type=click.Path(dir_okay=False), default=None)
def soak_cmd(bundle, video, frames, every, out):
    """Many frames through the tracking path, resident memory sampled: its slope (MB per 1,000
    frames, least squares over the second half) should be about zero."""
    cv2.setNumThreads(1)
    clip = read_frames(video)
    pipe = Pipeline(bundle)
    samples, found = [], 0
    t0 = time.perf_counter()
    for i in range(frames):
        found += bool(pipe.process(clip[i % len(clip)]))
        if i % every == 0 or i == frames - 1:
            samples.append((i, _rss_mb()))
    wall = time.perf_counter() - t0
    a = np.asarray(samples[len(samples) // 2:], np.float64)
    slope = float(np.polyfit(a[:, 0], a[:, 1], 1)[0] * 1000)
    rec = {"bundle": str(bundle), "frames": frames, "frames_with_face": found,
           "detector_runs": pipe.detector_runs, "seconds": round(wall, 1),
           "rss_mb_first": round(samples[0][1], 1), "rss_mb_last": round(samples[-1][1], 1),
           "rss_mb_max": round(max(v for _, v in samples), 1),
           "rss_slope_mb_per_1000_frames": round(slope, 4), "samples": samples}
    click.echo(f"{frames} frames in {wall:.1f} s, a face in {found}; RSS {rec['rss_mb_first']} -> "
               f"{rec['rss_mb_last']} MB (max {rec['rss_mb_max']}), slope over the second half "
               f"{slope:+.4f} MB per 1,000 frames")
    _write(out, [rec])


def _write(out, records) -> None:
    if out:
        atomic_write_json(out, {"host": host_string(host_info()), "created": now(),
                                "command": " ".join(sys.argv), "records": records})
        click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    cli()
