"""MediaPipe face mesh (BlazeFace detector + 468 points) as a benchmark/runtime_vs.py worker.

Runs in its own virtual environment (`make peers`: mediapipe 0.10.21 brings its own OpenCV,
which cannot share a venv with opencv-python-headless 4.14); never a runtime dependency.

    PEER_CORE=0 .venv-peers/bin/python benchmark/peers/mediapipe_worker.py
"""
from __future__ import annotations

import sys

import cv2
import mediapipe as mp
import numpy as np
from protocol import serve

MAX_FACES = 10      # --max-faces N raises it (whole photos: let it return every face)


def _points(result, shape) -> list[np.ndarray]:
    h, w = shape[:2]
    return [np.array([[p.x * w, p.y * h] for p in lm.landmark])
            for lm in (result.multi_face_landmarks or [])]


def main() -> None:
    global MAX_FACES
    if "--max-faces" in sys.argv:
        MAX_FACES = int(sys.argv[sys.argv.index("--max-faces") + 1])
    still = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=MAX_FACES,
                                            refine_landmarks=False)

    def image(bgr):
        return _points(still.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), bgr.shape)

    def video():
        mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=MAX_FACES,
                                               refine_landmarks=False)
        return lambda bgr: _points(mesh.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), bgr.shape)

    serve(image, video)


if __name__ == "__main__":
    main()
