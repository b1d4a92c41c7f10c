"""The torch FP32 reference as one engine of the shared runtime registry.

It runs train.model on a checkpoint (models/pfld68_w05.pt), so the benchmark measures the
reference exactly like every deployment engine: same preprocessing, same decoding, same
timing loop. torch is imported only when the engine is built, so the worker's memory
baseline (and the torch-free runtime) do not pay for it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from runtime.engines import Engine, EngineUnavailable, register


@register
class TorchEngine(Engine):
    name, package, suffixes = "torch", "torch", (".pt", ".pth")
    precisions = ("fp32",)          # the checkpoint is the FP32 reference; nothing else runs here

    @classmethod
    def available(cls):
        if importlib.util.find_spec("torch") is None:
            return False, "torch reference needs the Python package 'torch' (pip install torch)"
        return True, ""

    def __init__(self, path, threads=1, device=None, precision=None):
        super().__init__(path, threads, device, precision)
        if device and device.upper() != "CPU":
            raise EngineUnavailable(f"the torch reference runs on CPU only, not on {device}")
        import torch

        from train.engine import load_checkpoint, model_from_checkpoint
        torch.set_num_threads(max(1, threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:   # already set in this process: harmless
            pass
        self._torch = torch
        self.model = model_from_checkpoint(load_checkpoint(self.path))

    def __call__(self, batch):
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            return self.model(x).numpy()


def checkpoint_meta(path: str | Path) -> dict:
    """A bundle-like description of a checkpoint (preprocess, scheme, points) for the planner."""
    from train.engine import load_checkpoint
    ck = load_checkpoint(path)
    return {"name": Path(path).stem, "engine": TorchEngine.name, "precision": "fp32",
            "preprocess": ck["preprocess"], "scheme": ck["scheme"],
            "num_points": int(ck["arch"]["num_points"]),
            "input": {"layout": "NCHW", "shape": [-1, 3, ck["arch"].get("input_size", 112),
                                                   ck["arch"].get("input_size", 112)]},
            "arch": ck["arch"], "epoch": ck.get("epoch"), "params": ck.get("params")}
