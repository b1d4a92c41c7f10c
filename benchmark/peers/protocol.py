"""The worker side of benchmark/runtime_vs.py, shared by every runtime it compares.

A worker is a long-lived process pinned to one core (PEER_CORE) that reads one JSON command a
line on stdin and answers one JSON line on stdout:
  {"op": "images", "paths": [...]}  -> per image: ms of the whole call (detection + landmarks)
                                      and each found face's point centroid and extent side
  {"op": "video", "path": P, "frames": N} -> per frame: ms, faces found (tracking mode)
  {"op": "quit"}
Images and frames are decoded before the clock starts. Standalone (numpy + cv2 only), so that a
peer's own virtual environment can run it without this repository's packages.
"""
from __future__ import annotations

import json
import os
import sys
import time

import cv2
import numpy as np


def _faces(points_list) -> list[dict]:
    out = []
    for p in points_list:
        p = np.asarray(p, np.float64)
        out.append({"c": [float(v) for v in p.mean(0)], "side": float((p.max(0) - p.min(0)).max())})
    return out


def serve(process_image, video_processor, warmup: int = 5) -> None:
    """process_image(bgr) -> list of (K, 2) point arrays; video_processor() -> a callable like
    process_image that keeps state between frames (tracking)."""
    core = os.environ.get("PEER_CORE")
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(core)})
    cv2.setNumThreads(1)
    out = sys.stdout
    sys.stdout = sys.stderr            # libraries' prints must not corrupt the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "images":
            images = [cv2.imread(p, cv2.IMREAD_COLOR) for p in cmd["paths"]]
            for img in images[:warmup]:
                process_image(img)
            res = []
            for img in images:
                t = time.perf_counter()
                pts = process_image(img)
                res.append({"ms": (time.perf_counter() - t) * 1e3, "faces": _faces(pts)})
        elif cmd["op"] == "video":
            cap = cv2.VideoCapture(cmd["path"])
            frames = []
            while len(frames) < cmd.get("frames", 10 ** 9):
                ok, f = cap.read()
                if not ok:
                    break
                frames.append(f)
            cap.release()
            proc = video_processor()
            res = []
            for f in frames:
                t = time.perf_counter()
                pts = proc(f)
                res.append({"ms": (time.perf_counter() - t) * 1e3, "n": len(pts)})
        else:
            res = {"error": f"unknown op {cmd['op']!r}"}
        out.write(json.dumps({"results": res}) + "\n")
        out.flush()
