"""Facial landmarks and head pose on an image, a video or a camera, as JSON lines on stdout.

    python runtime/run.py --model BUNDLE --input face.jpg [--draw out.jpg]
    python runtime/run.py --model BUNDLE --input clip.mp4 --draw out.avi
    python runtime/run.py --model BUNDLE --input photos/            # or 'photos/*.jpg': one line each
    python runtime/run.py --model BUNDLE --input 0                     # camera 0, Ctrl-C stops

One line per frame (or image, with its "file"): {"frame", "faces": [{"box", "angle", "points",
"pose": {"yaw", "pitch", "roll"}, "yaw_coefficient", "source", "stage", "track"}], "ms":
{"detect", "crop", "landmarks", "pose", "total"}}. Every face the detector finds (up to
--max-faces) is reported. A folder or a pattern: one line per image; an unreadable image gets a
line {"frame", "file", "error"} and the others go on (exit status 1 at the end).
Notes (conversions, "no face found") go to stderr. Exit status: 0 on success, also when no face
is found (the JSON line then has "faces": []: an empty result is an answer, not a failure);
1 when the bundle, the input or an output cannot be used; 2 for bad flags.

Runs from a copied runtime/ folder with numpy, opencv and one engine; never imports torch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python runtime/run.py` from anywhere: import this folder as the package `runtime`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# FFmpeg's own log lines would repeat what the error message says; the user can still ask
# for them with OPENCV_FFMPEG_LOGLEVEL.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import click  # noqa: E402
import cv2  # noqa: E402

from runtime.bundle import BundleError  # noqa: E402
from runtime.detector import DETECTORS, make_detector  # noqa: E402
from runtime.engines import ENGINES  # noqa: E402
from runtime.media import (InputError, draw_faces, expand_images, is_image,  # noqa: E402
                           open_video, read_image, to_bgr, video_writer, write_image)
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.errors import LandmarkError  # noqa: E402


def face_json(f: dict, digits: int = 2) -> dict:
    pose = f["pose"] and {k: round(v, digits) for k, v in f["pose"].items()}
    yc = f.get("yaw_coefficient")
    conf = f.get("confidence")
    pts = [[round(float(x), digits), round(float(y), digits)] for x, y in f["points"]]
    if conf is not None:          # heatmap models: [x, y, p] with p the heatmap's peak
        pts = [q + [round(float(c), 3)] for q, c in zip(pts, conf)]
    return {"box": [round(v, digits) for v in f["box"]], "angle": round(f.get("angle", 0.0), digits),
            "points": pts,
            "pose": pose, "yaw_coefficient": None if yc is None else round(yc, 4),
            "source": f["source"], "stage": f["stage"], "track": f["track"]}


def emit(frame: int, faces: list[dict], ms: dict, file: str | None = None) -> None:
    line = {"frame": frame, **({"file": file} if file is not None else {}),
            "faces": [face_json(f) for f in faces],
            "ms": {k: round(v, 3) for k, v in ms.items()}}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def note(msg: str) -> None:
    click.echo(f"note: {msg}", err=True)


def run_image(pipe: Pipeline, path: str, draw: str | None) -> None:
    img, conv = read_image(path)
    if conv:
        note(f"{path}: {conv}")
    faces = pipe.process(img)
    if not faces:
        note(f"{path}: no face found")
    emit(0, faces, pipe.last_ms)
    if draw:
        write_image(draw, draw_faces(img, faces))


def run_images(pipe: Pipeline, paths: list, draw: str | None) -> int:
    """A folder's or a pattern's images, one JSON line each with its file name; an image that
    cannot be read gets a line with "error" and the rest go on. Returns how many failed."""
    if draw:
        Path(draw).mkdir(parents=True, exist_ok=True)
    failed = 0
    for i, path in enumerate(paths):
        try:
            img, conv = read_image(path)
        except InputError as e:
            note(str(e))
            sys.stdout.write(json.dumps({"frame": i, "file": str(path), "error": str(e)}) + "\n")
            failed += 1
            continue
        if conv:
            note(f"{path}: {conv}")
        faces = pipe.process(img)
        emit(i, faces, pipe.last_ms, file=str(path))
        if draw:
            write_image(Path(draw) / f"{Path(path).stem}.jpg", draw_faces(img, faces))
    note(f"{len(paths)} images, {failed} unreadable" if failed else f"{len(paths)} images")
    return failed


def run_video(pipe: Pipeline, spec: str, draw: str | None, max_frames: int) -> None:
    cap, fps, what = open_video(spec)
    pipe.fps = fps
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not spec.isdigit() else 0
    writer, empty, n, told, failed = None, 0, 0, False, ""
    try:
        while not max_frames or n < max_frames:
            try:
                ok, frame = cap.read()
            except cv2.error as e:          # a backend that raises instead of returning False
                ok, failed = False, str(e).strip().splitlines()[-1]
            if not ok:
                break
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != "uint8":
                frame, conv = to_bgr(frame)
                if conv and not told:
                    note(f"{what}: {conv}")
                    told = True
            faces = pipe.process(frame)
            empty += not faces
            emit(n, faces, pipe.last_ms)
            if draw:
                if writer is None:
                    writer = video_writer(draw, fps, (frame.shape[1], frame.shape[0]))
                writer.write(draw_faces(frame, faces))
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if n == 0:
        raise InputError(f"{what}: no frame could be decoded (not a video, or an empty one)")
    if failed or (declared and n < declared and (not max_frames or n < max_frames)):
        note(f"{what}: the stream ended after {n} frames" + (f" of {declared}" if declared else "")
             + (f" ({failed})" if failed else " (truncated or corrupt?)")
             + "; the frames read were processed")
    if empty:
        note(f"{what}: no face found in {empty} of {n} frames")
    note(f"{what}: {n} frames, detector ran on {pipe.detector_runs}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "bundle", required=True, type=click.Path(),
              help="Model bundle folder (model file + meta.json).")
@click.option("--input", "source", required=True,
              help="Image file, folder of images, glob pattern (quoted: 'photos/*.jpg'), video "
              "file, or camera index (0, 1, ...).")
@click.option("--engine", type=click.Choice(sorted(ENGINES)), default=None,
              help="Override the bundle's engine.  [default: from meta.json]")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Threads for the engine and OpenCV.")
@click.option("--device", default=None, help="Engine device: onnxruntime provider, OpenVINO "
              "device (CPU, GPU, NPU) or a TFLite delegate library.")
@click.option("--detector", type=click.Choice(sorted(DETECTORS)), default="yunet",
              show_default=True, help="yunet: the CNN shipped in runtime/detectors/; haar: "
              "OpenCV's cascades (no model file needed).")
@click.option("--detector-model", type=click.Path(dir_okay=False), default=None,
              help="Another YuNet ONNX file.  [default: runtime/detectors/face_detection_yunet_2023mar.onnx]")
@click.option("--detector-size", type=click.IntRange(0), default=None,
              help="YuNet: detect at this fixed longer side in px (0: full resolution).  "
              "[default: follows the image: 3/8 of its longer side, 128 to 384 px]")
@click.option("--min-face", type=float, default=None,
              help="Smallest face: YuNet, box side in pixels [default 16]; Haar, fraction of the "
              "frame's shorter side [default 0.3].")
@click.option("--level/--no-level", default=True, show_default=True,
              help="Cut each crop upright (rotated by the face's roll); points are rotated back.")
@click.option("--points", "points", default=None,
              help="Which head of a multi-head model to output: a point count (68, 98) or a "
              "scheme name.  [default: the bundle's first output]")
@click.option("--track/--no-track", default=True, show_default=True,
              help="Video: place crops from the previous frame's points (re-detect when lost).")
@click.option("--pose/--no-pose", default=True, show_default=True, help="Head pose per face.")
@click.option("--refine", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="Second landmark pass on a crop cut from a new face's "
              "first-pass points: auto = only for faces rolled more than 10 degrees from their "
              "crop (see runtime/pipeline.py).")
@click.option("--max-faces", type=click.IntRange(1), default=10, show_default=True,
              help="Most faces per frame: every face found, up to this many.")
@click.option("--max-frames", type=click.IntRange(0), default=0, show_default=True,
              help="Stop a video or camera after N frames (0: run to the end / Ctrl-C).")
@click.option("--draw", type=click.Path(), default=None,
              help="Write the input with points drawn (image: .jpg/.png; video: .avi/.mp4; "
              "a folder or pattern of images: a folder, one .jpg per image).")
def main(bundle, source, engine, threads, device, detector, detector_model, detector_size,
         min_face, level, points, track, pose, refine, max_faces, max_frames, draw):
    """Facial landmarks and head pose as JSON lines (one per frame) on stdout."""
    cv2.setNumThreads(threads)
    try:
        many = None if source.isdigit() else expand_images(source)
        image = many is not None or (not source.isdigit() and is_image(source))
        try:
            opts = {"threads": threads} if detector == "yunet" else {}
            if detector_size is not None:
                if detector != "yunet":
                    raise click.UsageError("--detector-size applies to --detector yunet")
                opts["size"] = detector_size
            det = make_detector(detector, detector_model, min_face=min_face, **opts)
            # a single image has no previous frame: tracking does not apply
            pipe = Pipeline(bundle, engine=engine, threads=threads, device=device, detector=det,
                            track=track and not image, pose=pose,
                            refine={"on": True, "off": False}.get(refine, refine),
                            max_faces=max_faces, level=level,
                            points=int(points) if points and points.isdigit() else points)
        except (LandmarkError, click.UsageError):
            raise
        except Exception as e:  # noqa: BLE001 - engines raise their own types for a bad model
            raise BundleError(f"cannot load the model of bundle {bundle}: "
                              f"{type(e).__name__}: {e}") from None
        if many is not None:
            if run_images(pipe, many, draw):
                sys.exit(1)
        elif image:
            run_image(pipe, source, draw)
        else:
            run_video(pipe, source, draw, max_frames)
    except BrokenPipeError:      # e.g. `| head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (LandmarkError, OSError) as e:      # anything else is a bug: its traceback shows
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
