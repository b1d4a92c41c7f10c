"""The torch FP32 reference as one engine the benchmark runs like every deployment engine.

It runs a checkpoint's network (train.checkpoint; models/pfld68_w05.pt), so the benchmark measures the
reference exactly like the others: same preprocessing, same decoding, same timing loop. torch
is imported only when the engine is built, so the worker's memory baseline (and the torch-free
runtime) do not pay for it. It is not registered in runtime.engines.ENGINES (what a device
uses): the benchmark asks `bench_engines()` for the union.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from runtime.bundle import BundleMeta, FileInfo, InputSpec, Lineage
from runtime.engines import ENGINES, Engine, EngineUnavailable


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

        from train.checkpoint import Checkpoint
        torch.set_num_threads(max(1, threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:   # already set in this process: harmless
            pass
        self._torch = torch
        self.model = Checkpoint.load(self.path).build()

    def run(self, batch):
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            y = self.model(x)
            return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


def bench_engines() -> dict[str, type[Engine]]:
    """The runtime's engines (with any registered plugin) plus the torch reference."""
    return {**ENGINES, TorchEngine.name: TorchEngine}


def checkpoint_meta(path: str | Path) -> BundleMeta:
    """A checkpoint described as a bundle (preprocess, outputs per head) for the planner: the
    outputs its export would record (train.checkpoint.Checkpoint.outputs)."""
    from runtime.bundle import sha256
    from train.checkpoint import Checkpoint
    path = Path(path)
    ck = Checkpoint.load(path)
    n = ck.input_size
    meta = BundleMeta(path.stem, TorchEngine.name, "fp32",
                      {path.name: FileInfo(sha256(path), path.stat().st_size)},
                      ck.preprocess, ck.outputs(), InputSpec("input", "NCHW", [-1, 3, n, n]),
                      lineage=Lineage(stage="checkpoint",
                                      source_checkpoint={"path": str(path), "sha256": sha256(path)}))
    meta.folder = path.parent
    return meta
