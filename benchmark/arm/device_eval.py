"""Runs inside the emulated aarch64 root (benchmark/arm/check.py): every bundle on the same
preprocessed real-face crops, through the copied runtime/ only.

    python device_eval.py CROPS.npz OUT.json BUNDLE [BUNDLE ...]

CROPS.npz holds one NCHW float32 batch per preprocessing rule (cut by the host with the
bundles' own preprocessing); each bundle folder's crops.key names its batch. For each
bundle the decoded points of every output (crop-normalised) go to OUT.json, with the machine,
the engine's own execution precision where it reports one, and the error of a bundle that does
not load or run (e.g. OpenVINO INT8 on ARM): the check records it instead of stopping.
"""
from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from runtime.bundle import BundleMeta
from runtime.decode import Landmarker    # the copied runtime/ (PYTHONPATH=its parent folder)
from runtime.engines import get_engine


def main(crops: str, out: str, bundles: list[str]) -> None:
    data = np.load(crops)
    res = {"machine": platform.machine(), "python": platform.python_version(), "bundles": {}}
    for b in bundles:
        name = Path(b).name
        t = time.perf_counter()
        try:
            # loaded without the runtime's machine check: this run is what verifies the
            # `architectures` a bundle declares
            meta = BundleMeta.load(b)
            lm = Landmarker(meta, get_engine(meta.engine)(meta.model_file, threads=1))
            x = data[(Path(b) / "crops.key").read_text().strip()]
            outs = {}
            for i, o in enumerate(lm.meta.outputs):
                head = Landmarker(lm.meta, lm.engine, i)
                outs[o.scheme] = np.asarray(head(x), np.float64).tolist()
            ex = lm.engine.execution_precision() if lm.engine.reports_precision else None
            res["bundles"][name] = {"status": "ok", "outputs": outs, "exec_precision": ex,
                                    "seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001 - a bundle that fails here is a finding
            res["bundles"][name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:600],
                                    "traceback": traceback.format_exc(limit=3)[-1500:]}
        print(f"{name}: {res['bundles'][name]['status']}", flush=True)
    Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
