"""Reading images, videos and cameras for the runtime, and drawing results on frames.

Every failure is an InputError whose message names the input and what to do; images that are
not 8-bit BGR (grayscale, with alpha, 16-bit) are converted and the conversion is reported.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from runtime.errors import LandmarkError

VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "MJPG", ".mov": "mp4v"}


class InputError(LandmarkError):
    """An input (image, video, camera, output path) cannot be used; the message says why."""


def to_bgr(image: np.ndarray) -> tuple[np.ndarray, str]:
    """Any decoded image -> (uint8 BGR, note about the conversion or "")."""
    notes = []
    img = image
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img // 257).astype(np.uint8)
        else:
            img = cv2.normalize(img.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX)
            img = img.astype(np.uint8)
        notes.append(f"{image.dtype} pixels scaled to 8 bits")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        img = cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
        notes.append("grayscale image converted to 3-channel BGR")
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        notes.append("4-channel image: alpha channel dropped")
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise InputError(f"unsupported image shape {image.shape}; expected H x W x 1, 3 or 4")
    return img, "; ".join(notes)


def read_image(path: str | Path) -> tuple[np.ndarray, str]:
    """(BGR uint8 image, note on any conversion); EXIF orientation is applied as cv2.imread does."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise InputError(f"{path} could not be decoded as an image")
    img, note = to_bgr(raw)
    # IMREAD_COLOR does the same conversions and also applies the EXIF orientation
    color = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return (img if color is None else color), note


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                  ".pgm", ".ppm", ".pbm", ".pnm", ".pxm", ".jp2", ".exr", ".hdr", ".pic", ".sr",
                  ".ras", ".avif"}


def is_image(path: str | Path) -> bool:
    """Image by file name, else by content (OpenCV knows the header); else a video."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return bool(cv2.haveImageReader(str(path)))
    except cv2.error:
        return False


GLOB_CHARS = set("*?[")


def expand_images(spec: str) -> list[Path] | None:
    """A folder (its image files, by suffix, sorted) or a glob pattern (its matching files,
    sorted; ** recurses) -> the image paths; None when `spec` is neither (one file, a video
    or a camera). InputError when a folder or pattern holds no image."""
    import glob
    p = Path(spec)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"folder {p} holds no image file (by suffix: "
                             f"{', '.join(sorted(IMAGE_SUFFIXES)[:6])}, ...)")
        return found
    if GLOB_CHARS & set(spec) and not p.exists():
        found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise InputError(f"no file matches the pattern {spec!r}")
        return found
    return None


def open_video(spec: str) -> tuple[cv2.VideoCapture, float, str]:
    """A video file or a camera index -> (capture, fps, description)."""
    if spec.isdigit():
        cap = cv2.VideoCapture(int(spec))
        if not cap.isOpened():
            cap.release()
            raise InputError(f"camera {spec} cannot be opened (no such device, in use, or no "
                             "permission); list cameras with `v4l2-ctl --list-devices` on Linux")
        what = f"camera {spec}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"input {path} does not exist (expected an image, a video file or "
                             "a camera index such as 0)")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            cap.release()
            raise InputError(f"{path} is neither a readable image nor a readable video")
        what = f"video {path}"
    fps = cap.get(cv2.CAP_PROP_FPS)
    return cap, (fps if fps and 0 < fps < 1000 else 30.0), what


def video_writer(path: str | Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise InputError(f"--draw {path}: video output must end in "
                         f"{', '.join(VIDEO_CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not out.isOpened():
        raise InputError(f"--draw {path}: cannot write a {codec} video there")
    return out


def write_image(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    if not cv2.haveImageWriter(str(path)):
        raise InputError(f"--draw {path}: OpenCV cannot write images of type "
                         f"'{path.suffix or '(none)'}'; use .jpg or .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, image)
    if not ok:
        raise InputError(f"--draw {path}: encoding failed")
    from .bundle import atomic_write_bytes
    atomic_write_bytes(path, buf.tobytes())


def draw_faces(image: np.ndarray, faces: list[dict]) -> np.ndarray:
    """A copy of the frame with each face's box, points and head pose drawn on it."""
    out = image.copy()
    scale = max(1, round(max(out.shape[:2]) / 500))
    for f in faces:
        x0, y0, x1, y1 = f["box"]
        color = (0, 200, 0) if f["source"] == "track" else (0, 160, 255)
        # the crop square, rotated by the face's roll when the crop was levelled
        corners = cv2.boxPoints((((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0),
                                 float(f.get("angle") or 0.0)))
        cv2.polylines(out, [np.round(corners).astype(np.int32)], True, color, scale, cv2.LINE_AA)
        x0, y0 = int(round(corners[:, 0].min())), int(round(corners[:, 1].min()))
        for x, y in np.asarray(f["points"]):
            cv2.circle(out, (int(round(x)), int(round(y))), scale + 1, (0, 0, 255), -1,
                       cv2.LINE_AA)
        if f.get("pose"):
            p = f["pose"]
            yc = f.get("yaw_coefficient")
            cv2.putText(out, f"yaw {p['yaw']:+.0f} pitch {p['pitch']:+.0f} roll {p['roll']:+.0f}"
                        + (f" yc {yc:.2f}" if yc is not None else ""),
                        (x0, max(12 * scale, y0 - 4 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * scale, color, scale, cv2.LINE_AA)
    return out
